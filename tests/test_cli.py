"""The `synermix` command itself: its version line."""

import subprocess
import sys
from importlib.metadata import version

import synermix


def test_version_names_synermix_and_its_packages_and_exits_0():
    proc = subprocess.run(
        [sys.executable, "-m", "synermix.cli", "--version"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.strip()
    assert line.startswith(f"synermix {synermix.__version__} (") and "\n" not in line
    for name in ("torch", "onnxruntime-gpu", "mlflow", "dvc", "optuna", "great-expectations"):
        assert f"{name} {version(name)}" in line


def run_params(cwd, *extra):
    return subprocess.run(
        [sys.executable, "-m", "synermix.cli", "params", *extra],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
    )


def test_params_shows_the_tuned_values_train_will_use_and_marks_them(tmp_path):
    import yaml

    (tmp_path / "params.yaml").write_text("train: {beta: 0.3, lr: 0.05}\n")
    before = run_params(tmp_path)
    assert before.returncode == 0, before.stderr
    assert before.stdout.startswith("# tune.enabled: train will use the tuned values")
    assert "  beta: 0.3\n" in before.stdout

    (tmp_path / "tuning").mkdir()
    (tmp_path / "tuning" / "best_params.yaml").write_text(
        yaml.safe_dump({"tuned": True, "study": "s1", "best_trial": 8, "params": {"beta": 0.47, "lr": 0.01}})
    )
    after = run_params(tmp_path)
    assert after.returncode == 0, after.stderr
    out = after.stdout
    assert out.splitlines()[0].startswith("# train.beta, train.lr come from tuning/best_params.yaml")
    assert "study s1, trial 8" in out.splitlines()[0]
    assert (
        "  beta: 0.47  # tuned; params.yaml: 0.3\n" in out
        and "  lr: 0.01  # tuned; params.yaml: 0.05\n" in out
    )
    assert "  momentum: 0.9\n" in out  # untouched keys stay unmarked
    assert yaml.safe_load(out)["train"]["beta"] == 0.47  # still YAML

    # the tune stage kept params.yaml's values (keep_baseline): nothing is marked as tuned
    (tmp_path / "tuning" / "best_params.yaml").write_text(
        yaml.safe_dump({"tuned": True, "study": "s2", "best_trial": -1, "params": {"beta": 0.3, "lr": 0.05}})
    )
    kept = run_params(tmp_path).stdout
    assert kept.startswith("# the tune stage kept params.yaml's values") and "# tuned" not in kept
    assert "  beta: 0.3\n" in kept

    (tmp_path / "params.yaml").write_text("tune: {enabled: false}\ntrain: {method: erm, beta: 0.3}\n")
    off = run_params(tmp_path).stdout
    assert "  beta: 0.3\n" in off and "# tuned" not in off and not off.startswith("#")  # tune off: no overlay


def faulty_folder(root):
    """crack 30, ok 40 + a truncated PNG + a black frame (and a text file), scratch 3: 75 images."""
    import numpy as np
    from PIL import Image

    from .helpers import noise_image

    seed = 0
    for label, count in (("crack", 30), ("ok", 40), ("scratch", 3)):
        (root / label).mkdir(parents=True)
        for i in range(count):
            seed += 1
            noise_image(seed).save(root / label / f"{i}.png")
    (root / "ok" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    Image.fromarray(np.full((32, 32), 2, np.uint8)).save(root / "ok" / "black.png")
    (root / "ok" / "notes.txt").write_text("not a photo")
    return root


def test_check_data_says_what_validate_would_without_writing(tmp_path, monkeypatch, capsys, make_params):
    """The verdict and each rule's status equal those of a real prepare + validate of the same
    folder; the faulty files are named; nothing is written; exit 1 on a failing rule."""
    import pytest

    from synermix.cli import main
    from synermix.errors import CheckFailed
    from synermix.stages.prepare import run_prepare
    from synermix.stages.validate import run_validate

    photos = faulty_folder(tmp_path / "photos")
    project = tmp_path / "project"
    project.mkdir()
    monkeypatch.chdir(project)
    before = sorted(p for p in tmp_path.rglob("*"))
    assert main(["check-data", str(photos)]) == 1
    out = capsys.readouterr().out
    assert sorted(p for p in tmp_path.rglob("*")) == before  # nothing written
    assert "75 image(s) in 3 class(es), 1 undecodable, 1 other file(s) skipped" in out
    assert "decodable: FAILED" in out and "ok/broken.png" in out
    assert "exposure: FAILED" in out and "ok/black.png" in out
    assert "min_per_class: FAILED" in out and "'scratch' 1 image(s) in train, need 10" in out
    assert "validate would FAIL" in out

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    params = make_params(data={"source": f"folder:{photos}"})
    run_prepare(params, project)
    with pytest.raises(CheckFailed):
        run_validate(params, project)
    import json

    from synermix.paths import VALIDATION_JSON

    real = json.loads((project / VALIDATION_JSON).read_text())
    for rule, result in real["rules"].items():
        if result["status"] == "off":
            continue
        shown = "FAILED" if result["status"] == "failed" else result["status"]
        assert f"  {rule}: {shown} (" in out, rule


def test_check_data_on_a_healthy_folder_and_a_missing_one(tmp_path, monkeypatch, capsys):
    from synermix.cli import main

    from .helpers import noise_image

    seed = 100
    for label in ("crack", "ok"):
        (tmp_path / "good" / label).mkdir(parents=True)
        for i in range(20):
            seed += 1
            noise_image(seed).save(tmp_path / "good" / label / f"{i}.png")
    monkeypatch.chdir(tmp_path)
    assert main(["check-data", "good"]) == 0
    assert "validate would pass: 40 of 40 image(s) usable" in capsys.readouterr().out
    import pytest

    with pytest.raises(SystemExit) as stop:
        main(["check-data", "nowhere"])
    assert stop.value.code == 2 and "nowhere: no such folder" in capsys.readouterr().err


def test_each_stage_command_says_what_it_reads_and_writes(capsys):
    """The --help of every stage names the data files dvc.yaml gives it as deps, the params
    sections it reads and every output dvc.yaml declares for it."""
    import pytest
    import yaml

    from synermix.cli import main
    from synermix.paths import STAGE_OUTPUTS

    from .helpers import REPO_ROOT

    stages = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]
    for name, spec in stages.items():
        with pytest.raises(SystemExit) as stop:
            main([name, "--help"])
        assert stop.value.code == 0
        text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
        reads, writes = text.split("Reads:", 1)[1].split("Writes:", 1)
        for dep in spec["deps"]:
            if not dep.startswith(("src/", "pipeline/", "requirements.lock")):
                assert dep in reads, f"{name} --help does not say it reads {dep}"
        for key in spec.get("params", []):
            section = key.split(".")[0]
            assert section in reads, f"{name} --help does not say it reads params {section}"
        for out in STAGE_OUTPUTS[name]:
            assert str(out) in writes, f"{name} --help does not say it writes {out}"
