"""The deploy bundle on a real (tiny, randomly initialised) ONNX export: layout, checksums the
coreutils ``sha256sum`` accepts, tamper detection, never overwriting, and that it runs; and
the bundle of a really trained, registered and promoted production version, run offline."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import yaml

from synermix import bundle as bd
from synermix import onnx_export as ox
from synermix import pilot as pilot_line
from synermix import registry, rollout
from synermix.bundle import BundleFile, is_bundle, render_model_card, verify_bundle, write_bundle
from synermix.data.transforms import Preprocessing
from synermix.errors import UserError
from synermix.inference import Classifier, ModelInfo, read_files
from synermix.paths import ONNX_MODEL
from synermix.stages.register import run_register
from synermix.tracking import client

from .helpers import noise_image
from .helpers.registry import build_project, pilot_folder

CLASSES = ["crack", "ok", "scratch"]
EXPECTED_FILES = {
    "model.onnx",
    "model.fp16.onnx",
    "labels.txt",
    "preprocessing.json",
    "bundle.json",
    "MODEL_CARD.md",
    "SHA256SUMS",
}

INFO = {
    "model_name": "synermix",
    "version": "7",
    "alias": "candidate",
    "aliases": ["candidate", "pilot"],
    "created_at": "2025-01-02T03:04:05+00:00",
    "tracking_uri": "sqlite:///mlflow.db",
    "description": "EL images of PV cells | line 3",
    "metrics": {"test_accuracy": 0.912345, "test_macro_recall": 0.87},
    "gates": {
        "min_accuracy": {"status": "pass", "threshold": 0.85, "observed": 0.912345, "margin": 0.062345},
        "max_calibration_error": {"status": "fail", "threshold": 0.05, "observed": 0.07, "margin": -0.02},
    },
    "gates_passed": False,
    "pilot": {
        "images": 120,
        "accuracy": 0.9,
        "by": "qa-team",
        "at": "2025-01-03",
        "production_version": None,
    },
    "data": {"source": "elpv", "manifest_sha256": "cd" * 32, "images": {"train": 100, "val": 20}},
    "training": {"arch": "tiny", "method": "synermix", "beta": 0.3, "epochs": 2, "lr": 0.001},
    "lineage": {
        "git_commit": "abc123",
        "git_dirty": False,
        "train_run_id": "run-train-42",
        "export_run_id": "run-export-43",
        "dvc_lock": {"train": "11aa", "export": "22bb"},
    },
    "onnx": {"opset": 18, "exporter": "dynamo", "parity": {"max_abs_diff": 1.5e-06}},
    "alias_history": [
        {
            "at": "2025-01-04",
            "action": "set",
            "alias": "candidate",
            "version": "7",
            "previous": "6",
            "by": "ci",
        }
    ],
}


class TinyNet(torch.nn.Module):
    """Conv, flatten, linear on 1 x 16 x 16 (forward's argument is ``x``: export_onnx names it)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(1, 4, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.Flatten(),
            torch.nn.Linear(4 * 16 * 16, len(CLASSES)),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def export_tiny(path: Path, weights_sha256: str, exporter: str = "dynamo") -> Path:
    """A real ONNX file with the metadata training + export write (see training.save_trained_model)."""
    torch.manual_seed(0)
    meta = {
        "arch": "tiny",
        "class_names": CLASSES,
        "preprocessing": Preprocessing(16, 1, (0.5,), (0.25,)).to_dict(),
        "prepare_image_size": 24,
        "method": "synermix",
        "beta": 0.3,
        "weights_sha256": weights_sha256,
        "mlflow_run_id": "run-train-42",
    }
    ox.export_onnx(TinyNet(), 1, 16, path, exporter, 18, ox.model_metadata(meta, exporter, 18))
    return path


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("export")
    model = export_tiny(folder / "model.onnx", "ab" * 32)
    ox.convert_fp16(model, folder / "model.fp16.onnx")
    return {"model.onnx": model, "model.fp16.onnx": folder / "model.fp16.onnx"}


@pytest.fixture
def bundle(sources, tmp_path) -> Path:
    return write_bundle(sources, tmp_path / "bundle", INFO)


def model_info(path: Path) -> ModelInfo:
    return ModelInfo.from_metadata({p.key: p.value for p in onnx.load(str(path)).metadata_props})


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_bundle_layout_checksums_and_contents(sources, bundle):
    assert {p.name for p in bundle.iterdir()} == EXPECTED_FILES
    for name, src in sources.items():  # copied, not moved
        assert src.is_file() and (bundle / name).read_bytes() == src.read_bytes()

    check = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=bundle, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    sums = (bundle / "SHA256SUMS").read_text()
    names = [line.split("  ", 1)[1] for line in sums.splitlines()]
    assert names == sorted(EXPECTED_FILES - {"SHA256SUMS"})

    assert (bundle / "labels.txt").read_text() == "crack\nok\nscratch\n"
    info = model_info(bundle / "model.onnx")
    pre = json.loads((bundle / "preprocessing.json").read_text())
    assert (pre["image_size"], pre["channels"], pre["resize"]) == (
        info.image_size,
        info.channels,
        info.resize,
    )
    assert tuple(pre["mean"]) == info.mean and tuple(pre["std"]) == info.std
    assert pre["prepare_image_size"] == info.prepare_image_size == 24
    assert (pre["input_name"], pre["output_name"]) == (ox.INPUT_NAME, ox.OUTPUT_NAME)

    manifest = json.loads((bundle / "bundle.json").read_text())
    assert manifest["format_version"] == 1
    assert manifest["info"] == INFO
    assert manifest["class_names"] == CLASSES
    assert manifest["created_at"].endswith("+00:00")
    listed = {f["name"]: f for f in manifest["files"]}
    assert set(listed) == EXPECTED_FILES - {"SHA256SUMS", "bundle.json"}
    assert listed["model.onnx"]["bytes"] == (bundle / "model.onnx").stat().st_size

    card = (bundle / "MODEL_CARD.md").read_text()
    assert card.startswith("# synermix version 7\n")
    for text in ("min_accuracy", "max_calibration_error", "0.9123", "test_macro_recall", "0.8700"):
        assert text in card
    for text in (
        "run-train-42",
        "run-export-43",
        "abc123",
        "@candidate, @pilot",
        "synermix predict --model <bundle folder> --abstain P",
        # a model without an operating point says so, not silence
        "## Decisions on the line",
        "carries no operating point",
    ):
        assert text in card
    assert "sha256sum -c SHA256SUMS" in card and "crack" in card
    assert "line 3" in card and "None" not in card


def test_verify_bundle_passes_and_returns_the_model(bundle, caplog):
    assert is_bundle(bundle)
    with caplog.at_level(logging.INFO, logger="synermix.bundle"):
        assert verify_bundle(bundle) == bundle / "model.onnx"
    assert sum("verified" in r.getMessage() for r in caplog.records) == 1


def flip_byte(folder: Path) -> None:
    data = bytearray((folder / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01
    (folder / "model.onnx").write_bytes(bytes(data))


def corrupt_sums_line(folder: Path) -> None:
    lines = (folder / "SHA256SUMS").read_text().splitlines()
    lines[0] = "not a checksum line"
    (folder / "SHA256SUMS").write_text("\n".join(lines) + "\n")


def change_a_digest(folder: Path) -> None:
    text = (folder / "SHA256SUMS").read_text()
    digest = text.split("  labels.txt")[0].rsplit("\n", 1)[-1]
    (folder / "SHA256SUMS").write_text(text.replace(digest, "0" * 64))


@pytest.mark.parametrize(
    ("damage", "named"),
    [
        (flip_byte, "model.onnx (checksum mismatch)"),
        (lambda f: (f / "labels.txt").unlink(), "labels.txt (missing)"),
        (lambda f: (f / "notes.txt").write_text("hi"), "notes.txt (not listed in SHA256SUMS)"),
        (corrupt_sums_line, "SHA256SUMS line 1 (malformed)"),
        (change_a_digest, "labels.txt (checksum mismatch)"),
        (lambda f: (f / "SHA256SUMS").unlink(), "SHA256SUMS (missing)"),
    ],
    ids=["flipped-byte", "deleted-file", "extra-file", "bad-sums-line", "wrong-digest", "no-sums"],
)
def test_verify_bundle_refuses_a_damaged_bundle(bundle, damage, named):
    damage(bundle)
    with pytest.raises(UserError, match="synermix bundle") as err:
        verify_bundle(bundle)
    message = str(err.value)
    assert named in message and str(bundle) in message and "\n" not in message


def test_verify_bundle_refuses_labels_that_disagree_with_the_model(bundle):
    (bundle / "labels.txt").write_text("crack\nscratch\nok\n")
    bd._write_sums(bundle)  # someone "fixed" the checksums too
    with pytest.raises(UserError, match=r"labels\.txt lists"):
        verify_bundle(bundle)


def test_refuses_a_non_empty_out_and_leaves_it_untouched(sources, tmp_path):
    out = tmp_path / "release"
    (out / "sub").mkdir(parents=True)
    (out / "notes.txt").write_bytes(b"keep me\x00\xff")
    (out / "sub" / "model.onnx").write_bytes(b"older model")
    before = snapshot(out)
    with pytest.raises(UserError, match="not empty"):
        write_bundle(sources, out, INFO)
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["release"]


def test_refuses_an_out_that_is_a_file(sources, tmp_path):
    out = tmp_path / "bundle"
    out.write_bytes(b"a file")
    with pytest.raises(UserError, match="not a folder"):
        write_bundle(sources, out, INFO)
    assert out.read_bytes() == b"a file"
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]


def test_an_empty_out_folder_is_replaced(sources, tmp_path):
    (tmp_path / "bundle").mkdir()
    out = write_bundle({"model.onnx": sources["model.onnx"]}, tmp_path / "bundle", {})
    assert verify_bundle(out) == out / "model.onnx"
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]


def test_a_missing_source_leaves_nothing_behind(sources, tmp_path):
    files = {**sources, "model.int8.onnx": tmp_path / "missing.onnx"}
    with pytest.raises(UserError, match=r"missing\.onnx"):
        write_bundle(files, tmp_path / "bundle", INFO)
    assert list(tmp_path.iterdir()) == []


def test_a_failure_mid_way_removes_the_temporary_folder(sources, tmp_path, monkeypatch):
    out = tmp_path / "bundle"
    out.mkdir()

    def fail(folder: Path) -> None:
        assert (folder / "MODEL_CARD.md").is_file()  # late in the build
        raise OSError("disk full")

    monkeypatch.setattr(bd, "_write_sums", fail)
    with pytest.raises(OSError, match="disk full"):
        write_bundle(sources, out, INFO)
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"] and list(out.iterdir()) == []


def test_refuses_a_variant_from_other_weights(sources, tmp_path):
    other = export_tiny(tmp_path / "other.onnx", "ef" * 32, exporter="torchscript")
    with pytest.raises(UserError, match="other weights"):
        write_bundle({"model.onnx": sources["model.onnx"], "model.int8.onnx": other}, tmp_path / "b", INFO)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.onnx"]


def test_the_bundle_runs(bundle, tmp_path):
    images = []
    for seed, size in ((1, (40, 30)), (2, (16, 16))):
        images.append(tmp_path / f"cell{seed}.png")
        noise_image(seed, size, "L").save(images[-1])
    labels = (bundle / "labels.txt").read_text().splitlines()
    for model in (verify_bundle(bundle), bundle / "model.fp16.onnx"):
        results = Classifier(model, provider="cpu").predict(read_files(images))
        assert [r.path for r in results] == [str(p) for p in images]
        assert all(r.status == "ok" and r.label in labels for r in results)
        assert all(np.isclose(sum(r.scores.values()), 1.0) for r in results)


def test_is_bundle(bundle, tmp_path):
    (tmp_path / "plain").mkdir()
    shutil.copy(bundle / "model.onnx", tmp_path / "plain" / "model.onnx")
    assert is_bundle(bundle)
    assert not is_bundle(tmp_path / "plain")
    assert not is_bundle(bundle / "model.onnx")
    assert not is_bundle(tmp_path / "nowhere")


def test_model_card_copes_with_empty_and_odd_info():
    files = [BundleFile("model.onnx", 3 * 2**20, "f" * 64)]
    empty = render_model_card({}, [], [])
    assert empty.startswith("# Model card\n") and "## How to run" in empty and "## Metrics" not in empty

    keys = ("model_name", "version", "alias", "aliases", "created_at", "metrics", "gates", "gates_passed")
    keys += ("pilot", "data", "training", "lineage", "onnx", "alias_history", "description", "tracking_uri")
    nones = render_model_card(dict.fromkeys(keys), ["a", "b"], files)
    assert "None" not in nones and "## Gates" not in nones and "3.0 MiB" in nones

    odd = {
        "model_name": "m",
        "aliases": "production",
        "metrics": {"accuracy": float("nan"), "note": "n/a", "missing": None, "count": 3},
        "gates": {"g1": "pass", "g2": {"status": "fail", "observed": None, "detail": "a|b"}},
        "gates_passed": "partial",
        "pilot": {"accuracy": 0.5, "nested": {"x": None}},
        "lineage": ["not", "a", "dict"],
        "alias_history": ["junk", {"alias": "production", "version": 3}],
        "extra_key": {"k": 1.23456789},
    }
    card = render_model_card(odd, ["a|b"], files, preprocessing={"image_size": 16, "steps": ["x"]})
    assert card == render_model_card(odd, ["a|b"], files, preprocessing={"image_size": 16, "steps": ["x"]})
    assert "# m\n" in card and "@production" in card and "| accuracy | nan |" in card
    assert "| g1 | pass |" in card and "a\\|b" in card and "Gates: partial" in card
    assert "0.5000" in card and "## Other" in card and "1.23457" in card and "## Lineage" not in card


@pytest.mark.integration  # trains, registers and shells out
def test_bundle_of_production_verifies_and_runs_with_predict(tmp_path, train_project):
    params, raw, uri = build_project(tmp_path, train_project, auto_pilot=True)
    run_register(params, tmp_path)
    c = client(uri)
    assert registry.aliases_of(c, "synermix") == {"candidate": "1", "pilot": "1"}
    pilot = pilot_folder(tmp_path, {"crack": 4, "ok": 2, "scratch": 2})
    pilot_line.pilot_eval(params, pilot)
    rollout.promote(params, "production", None, "first release")

    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(raw))
    out = tmp_path / "line-bundle"
    cli = [sys.executable, "-m", "synermix.cli", "--params", str(params_file)]
    done = subprocess.run([*cli, "bundle", "--alias", "production", "--out", str(out)], env=env, text=True,
                          capture_output=True, cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "MODEL_CARD.md",
        "SHA256SUMS",
        "bundle.json",
        "labels.txt",
        "model.onnx",
        "preprocessing.json",
    ]
    assert subprocess.run(["sha256sum", "-c", "--quiet", "SHA256SUMS"], cwd=out).returncode == 0
    card = (out / "MODEL_CARD.md").read_text()
    info = json.loads((out / "bundle.json").read_text())["info"]
    assert info["version"] == "1" and info["alias"] == "production"
    assert info["lineage"]["train_run_id"] in card and "first release" in card
    assert (out / "model.onnx").read_bytes() == (tmp_path / ONNX_MODEL).read_bytes()

    # a line machine: no MLflow, only the bundle
    offline = {k: v for k, v in env.items() if k != "MLFLOW_TRACKING_URI"}
    predict = [*cli[:3], "predict", str(pilot), "--model", str(out), "--format", "json", "--provider", "cpu"]
    done = subprocess.run(predict, env=offline, text=True, capture_output=True, cwd=out.parent)
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)["predictions"]
    assert len(rows) == 8 and {r["class"] for r in rows} <= {"crack", "ok", "scratch"}
    # the same through the registry URI
    done = subprocess.run([*predict[:6], "models:/synermix@production", *predict[7:]], env=env, text=True,
                          capture_output=True, cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert [r["class"] for r in json.loads(done.stdout)["predictions"]] == [r["class"] for r in rows]

    # a damaged bundle is refused before anything runs; an existing folder is never overwritten
    data = bytearray((out / "model.onnx").read_bytes())
    data[-1] ^= 1
    (out / "model.onnx").write_bytes(bytes(data))
    done = subprocess.run(predict, env=offline, text=True, capture_output=True, cwd=out.parent)
    assert done.returncode == 2 and "model.onnx (checksum mismatch)" in done.stderr
    done = subprocess.run([*cli, "bundle", "--out", str(out)], env=env, text=True, capture_output=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert (out / "model.onnx").read_bytes() == bytes(data)


def test_a_build_folder_left_by_a_killed_writer_is_removed_at_the_next_bundle(sources, tmp_path):
    """kill -9 during `synermix bundle` left `.line.<random>.partial` behind for good; the
    writer's pid is now in the name, and the next bundle of that name removes folders whose
    writer is dead, never one whose writer is alive."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    litter = tmp_path / f".line.{dead.pid}.x1.partial"
    (litter / "half").mkdir(parents=True)
    alive = tmp_path / f".line.{os.getpid()}.x2.partial"
    alive.mkdir()
    other = tmp_path / f".other.{dead.pid}.x3.partial"  # another bundle's: not this name's
    other.mkdir()
    write_bundle(sources, tmp_path / "line", INFO)
    assert not litter.exists() and alive.is_dir() and other.is_dir()
    assert is_bundle(tmp_path / "line") and not list(tmp_path.glob(".line.*.partial"))[1:]


def test_model_card_states_the_decision_rule_the_model_carries():
    """A model with an operating point and an unknown-part threshold: the card spells out the
    four decisions with the model's own thresholds and how they were fitted."""
    decision = {
        "unknown_above": 17.9076,
        "defect_classes": ["crack", "scratch"],
        "accept_below": 0.0632,
        "reject_from": 0.2041,
        "fit": {
            "fitted_on": "val",
            "images": 393,
            "limits": {"max_escape_rate": 0.05, "max_overkill_rate": None, "max_review_rate": 0.3},
            "escape_rate": 0.0,
            "overkill_rate": 0.5222,
            "review_rate": 0.2977,
        },
    }
    card = render_model_card({"model_name": "synermix", "version": "3"}, CLASSES, [], decision=decision)
    section = card.split("## Decisions on the line")[1].split("\n## ")[0]
    assert "Defect classes: crack, scratch" in section
    assert "`accept` (a good part): P(defect) below 0.0632" in section
    assert "`reject` (a defective part): P(defect) from 0.2041" in section
    assert "Fitted on 393 val images to meet max_escape_rate 0.05, max_review_rate 0.3" in section
    assert "above 17.91" in section and "`unknown`" in section
