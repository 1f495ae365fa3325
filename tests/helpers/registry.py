"""A trained, evaluated and exported project ready to register, pilot photos, and the staged
rollout flow (register -> promote pilot -> pilot-eval -> promote production -> rollback) that
tests/test_rollout.py runs on SQLite and tests/test_registry_server.py over HTTP."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from synermix import pilot as pilot_line
from synermix import registry, rollout
from synermix.config import parse_params
from synermix.errors import CheckFailed, UserError
from synermix.stages.evaluate import run_evaluate
from synermix.stages.export import run_export
from synermix.stages.register import run_register
from synermix.tracking import client

from . import noise_image

LAX = {
    "min_accuracy": None,
    "min_macro_recall": None,
    "min_class_recall": None,
    "max_recall_spread": None,
    "max_intra_class_variance": None,
    "max_ece": None,
    "beat_majority": False,
}
#: production gates a one-epoch model on noise can meet: the checks themselves are what is tested
PILOT_GATES = {"min_images": 6, "min_accuracy": 0.0, "min_macro_recall": 0.0, "max_drop": {"accuracy": 1.0}}


def pilot_folder(root: Path, counts: dict[str, int], seed: int = 5000) -> Path:
    """Labelled photos 'collected at the pilot line' (other images than the training set)."""
    folder = root / "pilot"
    for label, count in counts.items():
        (folder / label).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            seed += 1
            noise_image(seed).save(folder / label / f"line{i:03d}.png")
    return folder


def build_project(tmp_path, train_project, tracking_uri: str | None = None, **registry_params) -> tuple:
    """Trained, evaluated (lax gates) and exported model; returns (params, tracking uri)."""
    raw = train_project(
        {"crack": 24, "ok": 12, "scratch": 12},
        "registry-test",
        tracking_uri=tracking_uri,
        gates={**LAX, "champion": {"enabled": False}},
        export={"parity_images": 8},
        registry={"production_gates": PILOT_GATES, **registry_params},
    )
    params = parse_params(raw)
    run_evaluate(params, tmp_path)
    run_export(params, tmp_path)
    return params, raw, os.environ["MLFLOW_TRACKING_URI"]


def rollout_flow(tmp_path, params, raw, uri) -> dict:
    """register -> promote pilot -> pilot-eval -> promote production -> second version ->
    rollback, checking each refusal on the way; shared by the SQLite and server tests."""
    c = client(uri)
    name = params.registry.model_name
    first = run_register(params, tmp_path)
    assert first["registered"] and first["new_version"] and first["version"] == "1"
    assert registry.aliases_of(c, name) == {"candidate": "1"}

    with pytest.raises(CheckFailed, match="held_pilot"):
        rollout.promote(params, "production", "1", "too early")
    rollout.promote(params, "pilot", None, "first pilot", by="qa-lead")
    with pytest.raises(CheckFailed, match="pilot_evidence"):
        rollout.promote(params, "production", None, "no evidence yet")

    pilot = pilot_folder(tmp_path, {"crack": 4, "ok": 2, "scratch": 2})
    evidence = pilot_line.pilot_eval(params, pilot, by="line-3")
    assert evidence["images"] == 8 and evidence["production_version"] == ""
    tags = c.get_model_version(name, "1").tags
    assert tags["pilot_eval.images"] == "8" and tags["pilot_eval.by"] == "line-3"
    assert float(tags["pilot_eval.accuracy"]) == pytest.approx(evidence["accuracy"], abs=1e-6)
    rollout.promote(params, "production", None, "pilot line OK for a week", by="plant-manager")
    assert registry.aliases_of(c, name) == {"candidate": "1", "pilot": "1", "production": "1"}

    # a second version: the same weights exported with the other exporter (another ONNX file)
    second_params = parse_params({**raw, "export": {"parity_images": 8, "exporter": "torchscript"}})
    run_export(second_params, tmp_path)
    second = run_register(second_params, tmp_path)
    assert second["version"] == "2" and registry.aliases_of(c, name)["candidate"] == "2"
    rollout.promote(params, "pilot", "2", "try the new export")
    # evidence of version 2 that compared it with production (version 1) on the same images
    evidence = pilot_line.pilot_eval(params, pilot)
    assert evidence["production_version"] == "1" and "production_accuracy" in evidence
    assert evidence["only_pilot_right"] + evidence["only_production_right"] >= 0
    rollout.promote(params, "production", None, "v2 is as good on the line")
    assert registry.aliases_of(c, name)["production"] == "2"

    back = rollout.rollback(params, "production", "line 3 reports misses", by="plant-manager")
    assert (back["from"], back["to"]) == ("2", "1")
    assert registry.aliases_of(c, name)["production"] == "1"
    with pytest.raises(UserError, match="no earlier holder"):
        rollout.rollback(params, "production", "again")

    moves = registry.alias_history(c, name, "production")
    assert [(m.previous, m.version, m.action) for m in moves] == [
        ("", "1", "promote"),
        ("1", "2", "promote"),
        ("2", "1", "rollback"),
    ]
    assert moves[-1].by == "plant-manager" and moves[-1].reason == "line 3 reports misses" and moves[-1].at
    v1 = c.get_model_version(name, "1").tags
    assert v1["alias.production.action"] == "rollback" and v1["alias.production.previous"] == "2"
    assert c.get_model_version(name, "2").tags["alias.production.replaced_by"] == "1"
    assert registry.get_model(c, f"{name}{registry.LOCK_SUFFIX}") is None  # no lock left behind
    return {"client": c, "name": name}


def back_with_runs(
    c, uri: str, experiment: str, name: str, version: str, tags: dict, weights: str = ""
) -> dict:
    """Tags for a version that name an evaluate run and an export run agreeing with them, as
    the register stage's versions do (:mod:`synermix.evidence` re-reads the runs). ``tags``
    may carry ``gates_passed`` and ``metric.*``; returns them with the run ids and hashes."""
    import hashlib

    import mlflow

    from synermix.tracking import using_store

    weights = weights or hashlib.sha256(f"weights of {version}".encode()).hexdigest()
    onnx = hashlib.sha256(f"onnx of {name} {version}".encode()).hexdigest()
    passed = tags.get("gates_passed") == "true"
    metrics = {k.removeprefix("metric."): float(v) for k, v in tags.items() if k.startswith("metric.")}
    with using_store(uri):
        evaluate_tags = {"stage": "evaluate", "weights_sha256": weights, "gates_passed": str(passed).lower()}
        with mlflow.start_run(experiment_id=experiment, tags=evaluate_tags) as evaluated:
            mlflow.log_metrics({**metrics, "gates_passed": float(passed)})
        with mlflow.start_run(experiment_id=experiment, tags={"stage": "export", "onnx_sha256": onnx}) as ex:
            pass
    return {
        "weights_sha256": weights,
        "onnx_sha256": onnx,
        "evaluate_run_id": evaluated.info.run_id,
        "export_run_id": ex.info.run_id,
        **tags,
    }


def give_production(c, uri: str, experiment: str, name: str, version: str, images: int = 8) -> None:
    """Recorded moves to @pilot and @production, with a pilot-eval run behind the version's
    pilot evidence: what promote leaves, without running the pilot line."""
    import mlflow

    from synermix import model_tags
    from synermix.tracking import using_store

    registry.move_alias(c, name, "pilot", version, action="promote", reason="test pilot", by="test")
    digest = "0" * 64
    run_tags = {"stage": "pilot-eval", "model_name": name, "model_version": str(version)}
    with using_store(uri), mlflow.start_run(experiment_id=experiment, tags=run_tags) as run:
        mlflow.log_param("images_sha256", digest)
        mlflow.log_metrics({"images": float(images), "errors": 0.0})
    for key, value in {
        "run_id": run.info.run_id,
        "images": str(images),
        "errors": "0",
        "images_sha256": digest,
    }.items():
        c.set_model_version_tag(name, version, model_tags.pilot(key), value)
    registry.move_alias(c, name, "production", version, action="promote", reason="test production", by="test")
