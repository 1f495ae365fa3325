"""No Docker engine runs here: check what the Dockerfiles need exists and their commands are real."""

import re

import pytest

from .conftest import REPO_ROOT

DOCKERFILES = sorted((REPO_ROOT / "docker").glob("*.Dockerfile"))


def test_there_is_a_training_image():
    assert REPO_ROOT / "docker" / "train.Dockerfile" in DOCKERFILES


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_copied_files_exist(dockerfile):
    for line in dockerfile.read_text().splitlines():
        match = re.match(r"COPY\s+(?!--from)(.+)\s+\S+$", line.strip())
        if not match:
            continue
        for source in match.group(1).split():
            if source != ".":
                assert (REPO_ROOT / source).exists(), f"{dockerfile.name} copies missing {source}"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_default_command_is_dvc_repro_or_the_cli(dockerfile):
    cmd = re.search(r'^CMD \["([^"]+)"', dockerfile.read_text(), re.M)
    assert cmd and cmd.group(1) in {"dvc", "synermix"}
