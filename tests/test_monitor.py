"""Monitoring on a real exported model: the profile round trip, records from images, the
`synermix monitor` command (reports, MLflow run, exit codes, bad input), the capped record
log, the review queue and the golden set."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import yaml

from synermix.cli import main
from synermix.config import MonitorParams
from synermix.data.sources import list_folder
from synermix.errors import UserError
from synermix.inference import Classifier
from synermix.monitor import RecordLog, Window, check_window, log_files, read_records, records_from_images
from synermix.profile import PROFILE_KEY, ReferenceProfile, attach_profile, profile_of
from synermix.watch import GoldenRefused, GoldenSet, ReviewQueue, golden_images, score_golden

from .helpers.monitored import CLASSES, cell, monitored_model

pytestmark = pytest.mark.integration  # exports ONNX models


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return monitored_model(tmp_path_factory.mktemp("monitored") / "model.onnx")


def images(n: int, start: int = 30_000, brightness: float = 1.0) -> list[tuple[str, bytes]]:
    return [(f"cell{start + i}.png", cell(start + i, brightness)) for i in range(n)]


def test_profile_round_trips_and_is_checked(model, tmp_path):
    profile = profile_of(model)
    assert profile.weights_sha256 == f"{1:060d}0000" and profile.class_names == CLASSES
    assert profile.images == 120 and profile.statistics_images == 240 and profile.embeddings.shape == (120, 4)
    again = ReferenceProfile.from_dict(json.loads(profile.to_json()), "x")
    assert again.to_dict() == profile.to_dict()
    # edited by hand: refused
    data = json.loads(profile.to_json())
    data["val"]["predicted"][0] = (data["val"]["predicted"][0] + 1) % 3
    with pytest.raises(ValueError, match="does not match its content"):
        ReferenceProfile.from_dict(data, "edited.json")
    # a model exported without one says what to do
    import onnx

    proto = onnx.load(str(model))
    kept = [p for p in proto.metadata_props if p.key != PROFILE_KEY]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    bare = tmp_path / "bare.onnx"
    onnx.save(proto, str(bare))
    with pytest.raises(ValueError, match="carries no reference profile: export it again"):
        profile_of(bare)
    # attaching again replaces it (one entry), and keeps the file readable by others
    attach_profile(bare, profile)
    assert profile_of(bare).to_dict() == profile.to_dict()
    assert os.stat(bare).st_mode & 0o044 == os.stat(model).st_mode & 0o044


def test_unchanged_images_pass_and_darker_ones_alarm(model):
    profile = profile_of(model)
    classifier = Classifier(model, provider="cpu")
    about = {"weights_sha256": profile.weights_sha256, "sha256": "x" * 64}
    settings = MonitorParams(min_records=50, window=200, permutations=199)
    calm, bad = records_from_images(classifier, images(100), about)
    assert bad == 0 and len(calm) == 100
    verdict = check_window(profile, Window(calm), settings)
    assert verdict["drift"] is False, verdict["alarms"]
    dark, _ = records_from_images(classifier, images(100, brightness=0.7), about)
    verdict = check_window(profile, Window(dark), settings)
    assert verdict["drift"] is True
    assert any("image mean" in a for a in verdict["alarms"])


@pytest.fixture
def project(tmp_path, model, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(
        yaml.safe_dump(
            {
                "serve": {"model": str(model), "records": "logs/records.jsonl"},
                "monitor": {"min_records": 50, "window": 100, "permutations": 199},
                "mlflow": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
            }
        )
    )
    return tmp_path


def test_monitor_command_writes_reports_and_an_mlflow_run(project, capsys):
    folder = project / "line"
    for name, data in images(60, brightness=0.7):
        (folder / "x").mkdir(parents=True, exist_ok=True)
        (folder / "x" / name).write_bytes(data)
    assert main(["monitor", "--images", str(folder), "--fail-on-drift"]) == 1
    out = capsys.readouterr().out
    assert out.startswith("DRIFT: all: image mean (KS)")
    report = project / "reports" / "monitor"
    verdict = json.loads((report / "verdict.json").read_text())
    assert verdict["drift"] and verdict["records"] == 60
    assert "# Drift monitor: DRIFT" in (report / "report.md").read_text()
    assert "<h1" in (report / "report.html").read_text()
    assert {"image_statistics.png", "prediction_mix.png", "embedding.png"} <= {
        p.name for p in report.iterdir()
    }

    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("synermix-monitor").experiment_id])
    assert run.data.tags["drift"] == "true" and run.data.metrics["drift"] == 1.0
    assert any(k.startswith("p.all_image_mean") for k in run.data.metrics)
    assert "monitor/verdict.json" in {a.path for a in client.list_artifacts(run.info.run_id, "monitor")}


def test_monitor_reads_the_service_log_and_refuses_bad_windows(project, model, capsys):
    classifier = Classifier(model, provider="cpu")
    about = {"weights_sha256": profile_of(model).weights_sha256, "sha256": "y" * 64}
    records, _ = records_from_images(classifier, images(70), about)
    log = project / "logs" / "records.jsonl"
    log.parent.mkdir()
    log.write_text("".join(json.dumps(r) + "\n" for r in records) + "not json\n{}\n")
    assert main(["monitor", "--no-mlflow", "--fail-on-drift"]) == 0
    verdict = json.loads((project / "reports" / "monitor" / "verdict.json").read_text())
    assert verdict["records"] == 70 and verdict["left_out"]["unreadable"] == 2 and not verdict["drift"]

    log.write_text("".join(json.dumps(r) + "\n" for r in records[:20]))
    with pytest.raises(SystemExit) as stop:
        main(["monitor", "--no-mlflow"])
    assert stop.value.code == 2
    assert (
        "20 record(s) of this model in the window: the monitor needs at least 50" in capsys.readouterr().err
    )

    other = [{**r, "weights_sha256": "e" * 64} for r in records]
    log.write_text("".join(json.dumps(r) + "\n" for r in other))
    with pytest.raises(SystemExit):
        main(["monitor", "--no-mlflow"])
    assert "give the profile of the model that served them" in capsys.readouterr().err

    with pytest.raises(SystemExit):
        main(["monitor", "--no-mlflow", "--records", "nowhere.jsonl"])
    assert "nowhere.jsonl: no such record file" in capsys.readouterr().err


def test_record_log_rotates_within_its_cap_and_never_raises(tmp_path):
    written, dropped = [], []
    record = {"embedding": [0.1] * 16, "stats": {"mean": 1.0}, "class": "ok", "pad": "x" * 300}
    size = len(json.dumps(record, sort_keys=True)) + 1
    log = RecordLog(
        tmp_path / "r" / "records.jsonl", max_bytes=10 * size, keep=2, on_write=lambda: written.append(1)
    )
    for _ in range(100):
        log.add(record)
    log.flush()
    files = log.files()
    assert [p.name for p in files] == ["records.jsonl.2", "records.jsonl.1", "records.jsonl"]
    assert sum(p.stat().st_size for p in files) <= 3 * 10 * size
    assert len(written) == 100 and log_files([tmp_path / "r"]) == files
    assert len(read_records(files)[0]) == 0  # (these are not full records: all skipped, counted)
    log.close()
    # a log whose folder cannot be made (a file in the way): records dropped and counted
    (tmp_path / "blocked").write_text("a file")
    broken = RecordLog(tmp_path / "blocked" / "records.jsonl", 1000, 1, on_drop=lambda: dropped.append(1))
    broken.add(record)
    broken.flush()
    broken.close()
    assert broken.dropped == 1 and dropped == [1] and broken.written == 0


def test_review_queue_caps_dedups_and_lays_out_a_folder_source(tmp_path):
    results = []
    queue = ReviewQueue(tmp_path / "review", per_class_per_day=3, on_result=results.append)
    files = images(5)
    for _, data in files:
        queue.offer(data, "crack", "review", {"image": "x"})
    queue.offer(files[0][1], "crack", "review", {})  # the same image again
    queue.offer(files[0][1], "ok", "unknown", {})  # and under another class: still once
    assert results == ["saved", "saved", "saved", "capped", "capped", "duplicate", "duplicate"]
    assert len(list((tmp_path / "review" / "crack").glob("*.png"))) == 3
    index = [json.loads(line) for line in (tmp_path / "review" / "review.jsonl").read_text().splitlines()]
    assert [e["reason"] for e in index] == ["review"] * 3 and all(
        e["file"].startswith("crack/") for e in index
    )
    # a restarted service counts today's files again
    again = ReviewQueue(tmp_path / "review", per_class_per_day=3, on_result=results.append)
    assert again.offer(images(1, start=50_000)[0][1], "crack", "review", {}) == "capped"
    listing = list_folder(tmp_path / "review")
    assert len(listing.items) == 3 and set(listing.classes) == {"crack"}
    (tmp_path / "full").write_text("a file where the folder should be")
    assert ReviewQueue(tmp_path / "full", 3).offer(files[1][1], "ok", "review", {}) == "failed"


def golden_folder(root: Path, model: Path, n: int = 12) -> Path:
    """A golden set labelled with the model's own answers (it scores 1.0 on it)."""
    classifier = Classifier(model, provider="cpu")
    for name, data in images(n, start=40_000):
        label = classifier.class_names[int(classifier.logits(classifier.preprocess(data)[None]).argmax())]
        (root / label).mkdir(parents=True, exist_ok=True)
        (root / label / name).write_bytes(data)
    return root


def test_golden_set_refuses_with_the_reason(model, tmp_path):
    with pytest.raises(UserError, match="no such folder"):
        GoldenSet(tmp_path / "none", None, 0.02, 0.02)
    (tmp_path / "empty" / "ok").mkdir(parents=True)
    with pytest.raises(UserError, match="no images in <class>/ sub-folders"):
        GoldenSet(tmp_path / "empty", None, 0.02, 0.02)
    folder = golden_folder(tmp_path / "golden", model)
    classifier = Classifier(model, provider="cpu")
    recorded = score_golden(classifier, golden_images(folder))
    golden = GoldenSet(folder, 0.9, 0.02, 0.02)
    result = golden.check(classifier, None, recorded)
    assert result["passed"] and result["accuracy"] == 1.0 and result["compared_with_registration"] == 12
    # another model: its answers differ from those recorded at registration
    other = Classifier(monitored_model(tmp_path / "other.onnx", roll=1, reference=30), provider="cpu")
    with pytest.raises(GoldenRefused, match="differ by up to"):
        golden.check(other, None, recorded)
    assert golden.last["passed"] is False
    # below the floor: a quarter of the images given another label than the model answers
    wrong = tmp_path / "wrong"
    for i, path in enumerate(sorted(folder.rglob("*.png"))):
        label = path.parent.name
        if i % 4 == 0:
            label = CLASSES[(CLASSES.index(label) + 1) % 3]
        (wrong / label).mkdir(parents=True, exist_ok=True)
        (wrong / label / path.name).write_bytes(path.read_bytes())
    with pytest.raises(GoldenRefused, match=r"accuracy 0\.7500 is below serve\.golden_min_accuracy 0\.9"):
        GoldenSet(wrong, 0.9, None, 1.0).check(classifier, None, None)
    # a class the model does not know: refused, naming it
    (folder / "unknown_class").mkdir()
    (folder / "unknown_class" / "a.png").write_bytes(cell(1))
    with pytest.raises(GoldenRefused, match="class\\(es\\) unknown_class that the model does not know"):
        GoldenSet(folder, None, None, 1.0).check(classifier, None, None)


def test_golden_drop_against_the_serving_model(model, tmp_path):
    folder = golden_folder(tmp_path / "golden", model)
    golden = GoldenSet(folder, None, 0.02, 1.0)
    classifier = Classifier(model, provider="cpu")
    assert golden.check(classifier, 0.5, None)["passed"]
    with pytest.raises(GoldenRefused, match=r"more than serve\.golden_max_drop"):
        golden.check(classifier, 1.0 + 0.05, None)
    assert golden.last["recorded"].startswith("none")
    assert np.isclose(golden.last["accuracy"], 1.0)
