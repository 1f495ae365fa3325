"""The register stage and the staged rollout (promote, pilot-eval, rollback, status, bundle)
on a real MLflow registry (SQLite here; tests/test_registry_server.py runs the same over HTTP
against a server on PostgreSQL), with real trained and exported models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from synermix import pilot as pilot_line
from synermix import registry, rollout
from synermix.config import parse_params
from synermix.errors import CheckFailed, UserError
from synermix.gates import production_checks
from synermix.paths import ONNX_MODEL, REGISTER_REPORT
from synermix.registry import AliasMove, rollback_target
from synermix.stages.evaluate import run_evaluate
from synermix.stages.export import run_export
from synermix.stages.register import run_register
from synermix.tracking import client, experiment_id, using_store
from tests.helpers import noise_image

# trains a model, starts a server or shells out (make test-unit leaves these out)
pytestmark = pytest.mark.integration

LAX = {
    "min_accuracy": None,
    "min_macro_recall": None,
    "min_class_recall": None,
    "max_recall_spread": None,
    "max_intra_class_variance": None,
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


def test_register_promote_pilot_eval_and_rollback(tmp_path, train_project):
    params, raw, uri = build_project(tmp_path, train_project)
    state = rollout_flow(tmp_path, params, raw, uri)
    c, name = state["client"], state["name"]

    # the version carries its gates, metrics and lineage; a rerun registers nothing new
    v1 = c.get_model_version(name, "1")
    report = json.loads((tmp_path / REGISTER_REPORT).read_text())
    assert report["version"] == "2" and report["model_uri"] == f"models:/{name}/2"
    evaluation = json.loads((tmp_path / "reports/evaluation.json").read_text())
    assert v1.tags["gates_passed"] == "true"
    assert float(v1.tags["metric.test_accuracy"]) == pytest.approx(evaluation["test"]["accuracy"], abs=1e-6)
    assert set(evaluation["gates"]) <= {k.split(".")[1] for k in v1.tags if k.startswith("gate.")}
    for key in ("train_run_id", "evaluate_run_id", "export_run_id", "register_run_id", "manifest_sha256"):
        assert v1.tags.get(key), key
    assert v1.tags["train_run_id"] in v1.description and "#/experiments/" in v1.description
    again = run_register(
        parse_params({**raw, "export": {"parity_images": 8, "exporter": "torchscript"}}), tmp_path
    )
    assert again["version"] == "2" and not again["new_version"]
    assert [str(v.version) for v in registry.list_versions(c, name)] == ["1", "2"]

    # the registered files: ONNX flavour (pyfunc-loadable), PyTorch files and reports alongside
    import mlflow.pyfunc

    from synermix.inference import Classifier

    folder = registry.download_version(c, name, "1", tmp_path / "dl")
    assert (folder / "model.onnx").is_file() and (folder / "MLmodel").is_file()
    assert registry.pytorch_files(folder) == folder / "extra_files"
    assert (folder / "extra_files" / "evaluation.json").is_file()
    classifier = Classifier(folder / "model.onnx", provider="cpu")
    batch = np.stack([classifier.preprocess((tmp_path / "pilot/crack/line000.png").read_bytes())])
    pyfunc = mlflow.pyfunc.load_model(f"models:/{name}@production")
    out = pyfunc.predict({classifier.input_name: batch})
    logits = next(iter(out.values())) if isinstance(out, dict) else np.asarray(out)
    np.testing.assert_allclose(np.asarray(logits), classifier.logits(batch), atol=1e-5)

    # status: every version with aliases, gates, pilot numbers and the moves
    report = rollout.status(params)
    rows = {r["version"]: r for r in report["versions"]}
    assert rows["1"]["aliases"] == "production"
    assert rows["2"]["aliases"] == "candidate,pilot" and rows["1"]["pilot_images"] == "8"
    text = rollout.format_status(report)
    assert "line 3 reports misses" in text and "@production = v1" in text

    # the champion gate of the next evaluation scores the production version's PyTorch files
    summary = run_evaluate(parse_params({**raw, "gates": {**LAX}}), tmp_path)
    assert summary["champion"]["version"] == "1"
    assert summary["gates"]["champion_accuracy"]["status"] == "pass"


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


# --------------------------------------------------------------------------- fake versions
@pytest.fixture
def fake_registry(tmp_path, monkeypatch):
    """A registry with versions whose tags a test sets (no training): the policy checks."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    params = parse_params({"mlflow": {"experiment": "fake"}, "registry": {"production_gates": PILOT_GATES}})
    c = client(uri)
    registry.ensure_model(c, "synermix")
    experiment = experiment_id(c, params.mlflow)
    (tmp_path / "weights.txt").write_text("not a model")

    def add(**tags) -> str:
        with using_store(uri), mlflow.start_run(experiment_id=experiment) as run:
            mlflow.log_artifact(str(tmp_path / "weights.txt"), artifact_path="model")
        mv = c.create_model_version("synermix", f"{run.info.artifact_uri}/model", run.info.run_id)
        for key, value in tags.items():
            c.set_model_version_tag("synermix", mv.version, key.replace("__", "."), value)
        return str(mv.version)

    return params, c, add, uri


def test_promotion_refused_on_failed_gates(fake_registry):
    params, c, add, _ = fake_registry
    bad = add(gates_passed="false", gate__min_accuracy="FAIL", gate__min_macro_recall="pass")
    with pytest.raises(CheckFailed, match="failed: min_accuracy"):
        rollout.promote(params, "pilot", bad, "try it anyway")
    with pytest.raises(UserError, match="no version of 'synermix' holds @candidate"):
        rollout.promote(params, "pilot", None, "nothing is a candidate")
    with pytest.raises(UserError, match="has no version 9"):
        rollout.promote(params, "pilot", "9", "no such version")
    with pytest.raises(UserError, match="--reason"):
        rollout.promote(params, "pilot", bad, "  ")
    assert registry.aliases_of(c, "synermix") == {}
    assert registry.alias_history(c, "synermix") == []


def test_two_promotions_racing_leave_a_consistent_state(fake_registry, tmp_path):
    """Four processes promote four versions to pilot at once: each move is recorded with the
    holder it really replaced, and the alias ends on the last recorded move's version."""
    params, c, add, uri = fake_registry
    versions = [add(gates_passed="true") for _ in range(4)]
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params.model_dump(mode="json", by_alias=True)))
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "synermix.cli",
                "--params",
                str(params_file),
                "promote",
                "pilot",
                "--version",
                v,
                "--reason",
                f"race {v}",
                "--by",
                f"racer-{v}",
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for v in versions
    ]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert all(code == 0 for code, _ in results), results
    moves = registry.alias_history(c, "synermix", "pilot")
    assert sorted(m.version for m in moves) == sorted(versions)
    assert [m.previous for m in moves] == ["", *[m.version for m in moves[:-1]]]
    assert registry.aliases_of(c, "synermix")["pilot"] == moves[-1].version
    for m in moves:  # each version's own record agrees with the log
        tags = c.get_model_version("synermix", m.version).tags
        assert tags["alias.pilot.previous"] == m.previous and tags["alias.pilot.by"] == m.by
    assert registry.get_model(c, "synermix.alias-lock") is None


def test_alias_lock_waits_then_breaks_a_stale_lock(fake_registry):
    _params, c, add, _ = fake_registry
    v = add(gates_passed="true")
    c.create_registered_model("synermix.alias-lock", tags={"holder": "crashed-promote"})
    with pytest.raises(UserError, match="crashed-promote"):
        registry.move_alias(c, "synermix", "pilot", v, action="promote", reason="r", wait_seconds=0.3)
    assert registry.aliases_of(c, "synermix") == {}
    move = registry.move_alias(
        c, "synermix", "pilot", v, action="promote", reason="r", wait_seconds=5, stale_seconds=0.01
    )
    assert move is not None and registry.aliases_of(c, "synermix") == {"pilot": v}
    # moving an alias to the version that holds it records nothing
    assert registry.move_alias(c, "synermix", "pilot", v, action="promote", reason="again") is None
    assert len(registry.alias_history(c, "synermix")) == 1


def test_pilot_eval_refuses_unlabelled_or_unknown_folders(tmp_path):
    names = ["crack", "ok"]
    (tmp_path / "line" / "crack").mkdir(parents=True)
    noise_image(1).save(tmp_path / "line" / "crack" / "a.png")
    assert pilot_line.labelled_images(tmp_path / "line", names) == [(tmp_path / "line/crack/a.png", "crack")]
    noise_image(2).save(tmp_path / "line" / "loose.png")
    with pytest.raises(UserError, match="carry no label"):
        pilot_line.labelled_images(tmp_path / "line", names)
    (tmp_path / "line" / "loose.png").unlink()
    (tmp_path / "line" / "dent").mkdir()
    with pytest.raises(UserError, match="dent are not classes of this model"):
        pilot_line.labelled_images(tmp_path / "line", names)
    with pytest.raises(UserError, match="no such folder"):
        pilot_line.labelled_images(tmp_path / "missing", names)


# --------------------------------------------------------------------------- pure policy
def move(version: str, previous: str, action: str = "promote") -> AliasMove:
    return AliasMove("production", version, previous, action, "me", "2026-11-28T00:00:00Z", "r")


def test_rollback_goes_back_through_promotions_not_toggling():
    history = [move("1", ""), move("2", "1"), move("3", "2")]
    assert rollback_target(history, "3") == "2"
    history.append(move("2", "3", "rollback"))
    assert rollback_target(history, "2") == "1"
    history.append(move("1", "2", "rollback"))
    assert rollback_target(history, "1") is None
    assert rollback_target([move("1", "")], "1") is None
    # an alias set by hand outside synermix: roll back to the last recorded holder
    assert rollback_target([move("1", ""), move("2", "1")], "7") == "2"


def production_tags(**overrides) -> dict:
    tags = {
        "gates_passed": "true",
        "held.pilot": "true",
        "pilot_eval.images": "150",
        "pilot_eval.at": "2026-11-20T08:00:00Z",
        "pilot_eval.accuracy": "0.80",
        "pilot_eval.macro_recall": "0.70",
        "pilot_eval.recall_min": "0.50",
        "pilot_eval.production_version": "3",
        "pilot_eval.production_accuracy": "0.79",
        "pilot_eval.production_macro_recall": "0.71",
    }
    return {**tags, **overrides}


@pytest.mark.parametrize(
    ("overrides", "current", "failing"),
    [
        ({}, "3", set()),
        ({"held.pilot": ""}, "3", {"held_pilot"}),
        ({"gates_passed": "false"}, "3", {"release_gates"}),
        ({"pilot_eval.images": "99"}, "3", {"min_images"}),
        ({"pilot_eval.accuracy": "0.49"}, "3", {"pilot_min_accuracy", "no_regression_accuracy"}),
        ({"pilot_eval.macro_recall": "0.68"}, "3", {"no_regression_macro_recall"}),
        ({"pilot_eval.at": "2026-09-01T00:00:00Z"}, "3", {"evidence_age_days"}),
        ({}, "4", {"no_regression"}),  # production changed since the pilot evaluation
        ({"pilot_eval.production_version": ""}, None, set()),  # the first production version
    ],
)
def test_production_checks(overrides, current, failing):
    from datetime import UTC, datetime

    gates = parse_params({}).registry.production_gates
    results = production_checks(
        production_tags(**overrides), gates, "5", current, now=datetime(2026, 11, 28, tzinfo=UTC)
    )
    assert {r.gate for r in results if r.passed is False} == failing


def test_production_checks_without_evidence():
    gates = parse_params({}).registry.production_gates
    tags = {"gates_passed": "true", "held.pilot": "true"}
    results = production_checks(tags, gates, "2", "1")
    assert [r.gate for r in results if r.passed is False] == ["pilot_evidence"]


def test_racing_alias_moves_in_threads_serialise(fake_registry):
    """Eight moves released at the same instant: the lock makes them take turns, so every
    recorded move names the holder it replaced (without the lock, several would read the
    same holder and the history would fork)."""
    import threading

    _params, c, add, uri = fake_registry
    versions = [add(gates_passed="true") for _ in range(8)]
    start = threading.Barrier(len(versions))
    errors: list[BaseException] = []

    def promote(version: str) -> None:
        try:
            mine = client(uri)
            start.wait()
            registry.move_alias(mine, "synermix", "pilot", version, action="promote", reason="race")
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=promote, args=(v,)) for v in versions]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    moves = registry.alias_history(c, "synermix", "pilot")
    assert sorted(m.version for m in moves) == sorted(versions)
    assert [m.previous for m in moves] == ["", *[m.version for m in moves[:-1]]]
    assert registry.aliases_of(c, "synermix")["pilot"] == moves[-1].version


def test_alias_lock_taken_when_the_holder_releases_during_a_duplicate_create(fake_registry, monkeypatch):
    """The interleaving CI hit: a create finds the lock held (IntegrityError), MLflow's SQL
    store reads the existing model back to word its error, and the holder has released
    the lock in between, so the create fails with "not found". The lock is free then:
    the waiter must take it, not fail the move."""
    from mlflow.store.model_registry.sqlalchemy_store import SqlAlchemyStore

    _params, c, add, _ = fake_registry
    version = add(gates_passed="true")
    lock = f"synermix{registry.LOCK_SUFFIX}"
    c.create_registered_model(lock)  # held by "another command"
    original = SqlAlchemyStore.get_registered_model
    released: list[str] = []

    def holder_releases_first(self, name):
        if name == lock and not released:
            released.append(name)
            c.delete_registered_model(lock)
        return original(self, name)

    monkeypatch.setattr(SqlAlchemyStore, "get_registered_model", holder_releases_first)
    move = registry.move_alias(c, "synermix", "pilot", version, action="promote", reason="race")
    assert released == [lock]
    assert move.version == version
    assert registry.aliases_of(c, "synermix")["pilot"] == version
    assert registry.get_model(c, lock) is None


def test_rollout_commands_print_tables_and_one_line_errors(fake_registry, tmp_path, capsys):
    from synermix.cli import main

    params, _, add, _ = fake_registry
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params.model_dump(mode="json", by_alias=True)))
    cli = ["--params", str(params_file)]
    good = add(gates_passed="true", **{"metric__test_accuracy": "0.812345"})
    bad = add(gates_passed="false", gate__min_class_recall="FAIL")

    assert main([*cli, "promote", "pilot", "--version", good, "--reason", "ok", "--by", "qa"]) == 0
    assert "synermix@pilot = version 1" in capsys.readouterr().out
    with pytest.raises(SystemExit) as refused:
        main([*cli, "promote", "pilot", "--version", bad, "--reason", "no"])
    err = capsys.readouterr().err
    assert refused.value.code == 1 and "release_gates" in err and "failed: min_class_recall" in err
    assert "Traceback" not in err
    for command, message in (
        (["rollback", "pilot"], "no earlier holder"),
        (["rollback", "production"], "no version of 'synermix' holds @production"),
        (["pilot-eval", "--images", str(tmp_path)], "has no model.onnx"),
        (["promote", "production", "--reason", "r"], "held_pilot"),
    ):
        with pytest.raises(SystemExit) as failed:
            main([*cli, *command])
        err = capsys.readouterr().err
        assert failed.value.code in (1, 2) and message in err and "Traceback" not in err, (command, err)

    assert main([*cli, "status"]) == 0
    out = capsys.readouterr().out
    assert "@pilot = v1" in out and "0.8123" in out and "qa" in out
    assert main([*cli, "status", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["aliases"] == {"pilot": "1"} and [r["gates"] for r in report["versions"]] == [
        "pass",
        "FAIL",
    ]
