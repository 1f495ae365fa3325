"""Every bad input of the foundation issue, through prepare + validate (real GX suites)."""

import io
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from synermix.data.manifest import read_manifest, read_quarantine, usable_rows
from synermix.errors import CheckFailed, UserError
from synermix.paths import PREPARED_DIR, QUARANTINE_CSV, VALIDATION_JSON, VALIDATION_MD
from synermix.stages.prepare import run_prepare
from synermix.stages.validate import run_validate

from .helpers import huge_png_header, noise_image, png_bytes


@pytest.fixture
def pipeline(tmp_path, make_dataset, make_params):
    """Run prepare + validate on tmp_path/photos; return (report or CheckFailed, tmp_path)."""

    def run(validate=None, data=None, expect_failure=True):
        photos = tmp_path / "photos"
        if not photos.exists():
            make_dataset()
        params = make_params(data={"source": f"folder:{photos}", **(data or {})}, validate=validate or {})
        run_prepare(params, tmp_path)
        if expect_failure:
            with pytest.raises(CheckFailed) as info:
                run_validate(params, tmp_path)
            return str(info.value)
        return run_validate(params, tmp_path)

    return run


def add(tmp_path, rel: str, data: bytes) -> None:
    path = tmp_path / "photos" / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def saved(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def summary(tmp_path) -> dict:
    return json.loads((tmp_path / VALIDATION_JSON).read_text())


def test_healthy_dataset_passes_and_writes_reports(tmp_path, pipeline):
    report = pipeline(expect_failure=False)
    assert report.passed and report.usable_images == 60
    data = summary(tmp_path)
    assert data["passed"] and data["rules"]["decodable"]["status"] == "passed"
    assert data["rules"]["declared_labels"]["status"] == "off"
    assert "**Verdict: PASSED**" in (tmp_path / VALIDATION_MD).read_text()
    assert read_quarantine(tmp_path / QUARANTINE_CSV).empty


@pytest.mark.parametrize(
    ("name", "content", "rule", "reason"),
    [
        (
            "crack/truncated.png",
            lambda: png_bytes(noise_image(99, (64, 64)))[:300],
            "decodable",
            "cannot decode",
        ),
        ("crack/zero.png", lambda: b"", "decodable", "empty file (0 bytes)"),
        ("crack/notes.jpg", lambda: b"shift report: all good\n", "decodable", "not an image file"),
        (
            "crack/cmyk.jpg",
            lambda: saved(noise_image(98, mode="RGB").convert("CMYK"), "JPEG"),
            "allowed_modes",
            "mode CMYK",
        ),
        (
            "crack/deep.png",
            lambda: saved(Image.fromarray(np.full((32, 32), 40000, np.uint16)), "PNG"),
            "allowed_modes",
            "mode I;16",
        ),
        ("crack/dot.png", lambda: png_bytes(Image.new("L", (1, 1), 128)), "size_limits", "1x1 px"),
        ("crack/black.png", lambda: png_bytes(Image.new("L", (32, 32), 0)), "exposure", "mean 0.0, std 0.0"),
        ("crack/white.png", lambda: png_bytes(Image.new("RGB", (32, 32), "white")), "exposure", "mean 255.0"),
        ("crack/bomb.png", lambda: huge_png_header(30_000, 30_000), "decodable", "decompression-bomb guard"),
    ],
)
def test_bad_image_fails_naming_rule_file_and_reason(
    tmp_path, make_dataset, pipeline, name, content, rule, reason
):
    make_dataset()
    add(tmp_path, name, content())
    message = pipeline()
    assert f"validation rule '{rule}' failed" in message
    assert name in message
    entry = summary(tmp_path)["rules"][rule]
    assert entry["status"] == "failed" and entry["unexpected_count"] == 1
    assert entry["offending"][0]["file"] == name and reason in entry["offending"][0]["reason"]
    assert name in (tmp_path / VALIDATION_MD).read_text()


def test_pixel_limit_from_params(tmp_path, make_dataset, pipeline):
    make_dataset()
    add(tmp_path, "ok/large.png", png_bytes(noise_image(97, (200, 100))))
    message = pipeline(data={"max_pixels": 19_999})
    assert "ok/large.png" in message
    assert "200x100 = 20000 pixels is past data.max_pixels=19999" in (tmp_path / VALIDATION_MD).read_text()


def test_class_folder_with_one_image(tmp_path, make_dataset, pipeline):
    make_dataset({"scratch": 20, "crack": 20, "lonely": 1})
    message = pipeline()
    assert "validation rule 'min_per_class' failed" in message
    assert "'lonely' 0 image(s) in val, need 2" in message
    offending = summary(tmp_path)["rules"]["min_per_class"]["offending"]
    assert {o["file"] for o in offending} == {"lonely/train", "lonely/val", "lonely/test"}


def test_empty_class_folder(tmp_path, make_dataset, make_params):
    root = make_dataset({"scratch": 20, "crack": 20})
    (root / "dent").mkdir()
    params = make_params(data={"source": f"folder:{root}"})
    with pytest.raises(UserError, match=r"class folder\(s\) with no images in .*: dent; add images"):
        run_prepare(params, tmp_path)


def test_class_not_in_declared_list(tmp_path, pipeline):
    message = pipeline(data={"classes": ["scratch", "crack"]})
    assert "validation rule 'declared_labels' failed" in message
    assert "undeclared classes: ok" in message
    assert "ok/img000.png" in message


def test_declared_class_without_images_fails_min_per_class(tmp_path, pipeline):
    message = pipeline(data={"classes": ["scratch", "crack", "ok", "dent"]})
    assert "'dent' 0 image(s) in train, need 10" in message


def test_same_image_in_two_classes(tmp_path, make_dataset, pipeline):
    root = make_dataset()
    (root / "ok" / "shared.png").write_bytes((root / "crack" / "img003.png").read_bytes())
    message = pipeline()
    assert "validation rule 'conflicting_labels' failed" in message
    assert "crack/img003.png" in message and "ok/shared.png" in message
    manifest = read_manifest(tmp_path / PREPARED_DIR / "manifest.csv").set_index("source_path")
    assert manifest.loc["crack/img003.png", "split"] == manifest.loc["ok/shared.png", "split"]


def test_duplicate_within_a_class_is_a_warning(tmp_path, make_dataset, pipeline):
    root = make_dataset()
    (root / "ok" / "again.png").write_bytes((root / "ok" / "img001.png").read_bytes())
    report = pipeline(expect_failure=False)
    assert report.passed
    result = report.result("duplicates")
    assert result.status == "warning" and {o["file"] for o in result.offending} == {
        "ok/img001.png",
        "ok/again.png",
    }


def test_leakage_in_a_hand_edited_manifest_is_caught(tmp_path, make_dataset, make_params):
    from synermix.config import parse_params
    from synermix.data.validation import validate_manifest

    root = make_dataset()
    (root / "ok" / "again.png").write_bytes((root / "ok" / "img001.png").read_bytes())
    run_prepare(make_params(data={"source": f"folder:{root}"}), tmp_path)
    manifest = read_manifest(tmp_path / PREPARED_DIR / "manifest.csv")
    index = manifest.index[manifest["source_path"] == "ok/again.png"][0]
    other = manifest.loc[manifest["source_path"] == "ok/img001.png", "split"].iloc[0]
    manifest.loc[index, "split"] = "test" if other != "test" else "train"
    report = validate_manifest(manifest, parse_params({}).validate_params)
    assert not report.passed and report.result("split_leakage").status == "failed"


def test_class_imbalance_warning_and_error(tmp_path, make_dataset, pipeline):
    make_dataset({"big": 90, "small": 15})
    report = pipeline(validate={"rules": {"class_imbalance": {"max_ratio": 3}}}, expect_failure=False)
    assert report.result("class_imbalance").status == "warning"
    assert "largest / smallest class = 6.00" in report.result("class_imbalance").observed
    message = pipeline(validate={"rules": {"class_imbalance": {"max_ratio": 3, "severity": "error"}}})
    assert "validation rule 'class_imbalance' failed" in message


def test_quarantine_keeps_going_and_deletes_nothing(tmp_path, make_dataset, pipeline):
    make_dataset({"scratch": 40, "crack": 40, "ok": 40})
    add(tmp_path, "crack/black.png", png_bytes(Image.new("L", (32, 32), 0)))
    add(tmp_path, "ok/zero.png", b"")
    before = sorted(p.name for p in (tmp_path / "photos").rglob("*"))
    report = pipeline(validate={"on_bad_images": "quarantine"}, expect_failure=False)
    assert report.passed and report.result("exposure").status == "quarantined"
    quarantine = read_quarantine(tmp_path / QUARANTINE_CSV)
    assert quarantine.set_index("source_path")["rules"].to_dict() == {
        "crack/black.png": "exposure",
        "ok/zero.png": "decodable",
    }
    manifest = read_manifest(tmp_path / PREPARED_DIR / "manifest.csv")
    usable = usable_rows(manifest, quarantine)
    assert len(usable) == 120 and not {"crack/black.png", "ok/zero.png"} & set(usable["source_path"])
    assert sorted(p.name for p in (tmp_path / "photos").rglob("*")) == before
    assert "## Quarantined files" in (tmp_path / VALIDATION_MD).read_text()


def test_quarantine_refuses_when_too_many_images_are_bad(tmp_path, make_dataset, pipeline):
    make_dataset()
    for i in range(5):
        add(tmp_path, f"ok/black{i}.png", png_bytes(Image.new("L", (32, 32), i)))
    message = pipeline(validate={"on_bad_images": "quarantine", "max_quarantined_fraction": 0.05})
    assert "validation rule 'quarantine_limit' failed: 5 of 65 images (7.7%) quarantined" in message


def test_warning_and_off_severities_do_not_fail(tmp_path, make_dataset, pipeline):
    make_dataset()
    add(tmp_path, "ok/black.png", png_bytes(Image.new("L", (32, 32), 0)))
    report = pipeline(validate={"rules": {"exposure": {"severity": "warning"}}}, expect_failure=False)
    assert report.passed and report.result("exposure").status == "warning"
    report = pipeline(validate={"rules": {"exposure": {"severity": "off"}}}, expect_failure=False)
    assert report.result("exposure").status == "off"


def test_offending_files_are_capped_in_reports(tmp_path, make_dataset, pipeline):
    make_dataset()
    for i in range(4):
        add(tmp_path, f"ok/empty{i}.png", b"")
    pipeline(validate={"max_listed_files": 2})
    entry = summary(tmp_path)["rules"]["decodable"]
    assert entry["unexpected_count"] == 4 and len(entry["offending"]) == 2
    assert "and 2 more" in (tmp_path / VALIDATION_MD).read_text()


@pytest.mark.integration  # runs the CLI in subprocesses
def test_stage_commands_exit_codes(tmp_path, make_dataset):
    """A failed rule exits 1 with the rule and file; a missing source exits 2; one line each."""
    root = make_dataset()
    (root / "ok" / "zero.png").write_bytes(b"")
    params = tmp_path / "params.yaml"
    params.write_text(f"data:\n  source: folder:{root}\n")
    cli = [sys.executable, "-m", "synermix.cli", "--params", str(params)]
    assert subprocess.run([*cli, "prepare"], cwd=tmp_path, capture_output=True).returncode == 0
    proc = subprocess.run([*cli, "validate"], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 1
    assert "error: validation rule 'decodable' failed" in proc.stderr and "ok/zero.png" in proc.stderr
    assert (tmp_path / VALIDATION_MD).is_file()  # the reports are written before failing

    params.write_text(f"data:\n  source: folder:{tmp_path / 'nowhere'}\n")
    proc = subprocess.run([*cli, "prepare"], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: data.source folder '{tmp_path / 'nowhere'}' does not exist; "
        "point data.source at a folder laid out as <class>/<image>"
    ]


def test_a_class_whose_images_are_all_quarantined_does_not_vanish(tmp_path, make_dataset, pipeline):
    make_dataset({"scratch": 40, "crack": 40})
    for i in range(3):
        add(tmp_path, f"dent/black{i}.png", png_bytes(Image.new("L", (32, 32), 0)))
    message = pipeline(validate={"on_bad_images": "quarantine", "max_quarantined_fraction": 0.1})
    assert "'dent' 0 image(s) in train, need 10" in message


def test_a_single_class_is_not_a_classification_dataset(tmp_path, make_dataset, pipeline):
    make_dataset({"ok": 30})
    message = pipeline()
    assert "validation rule 'min_per_class' failed: 1 class(es) in the data, need at least 2" in message
