"""The staged rollout (promote, pilot-eval, rollback, status) on a real MLflow registry
(SQLite here; tests/test_registry_server.py runs the same flow over HTTP against a server on
PostgreSQL), with real trained and exported models, and with versions whose tags a test sets."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from synermix import registry, rollout
from synermix.config import parse_params
from synermix.errors import CheckFailed, UserError
from synermix.paths import REGISTER_REPORT
from synermix.stages.evaluate import run_evaluate
from synermix.stages.register import run_register
from synermix.tracking import client

from .helpers.registry import LAX, build_project, pilot_folder, rollout_flow

# trains a model, starts a server or shells out (make test-unit leaves these out)
pytestmark = pytest.mark.integration


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


def test_an_alias_moved_or_a_tag_forged_outside_synermix_is_refused_by_every_consumer(
    tmp_path, train_project
):
    """One plain MLflow call used to move @production past every gate (status hid it, bundle
    bundled it, serve swapped to it), and a forged tag passed promote. Now the move must be
    recorded and the evidence must agree with the runs the version names."""
    from synermix import pilot as pilot_line
    from synermix.bundle import bundle_version
    from synermix.model_source import model_file

    params, raw, uri = build_project(tmp_path, train_project)
    state = rollout_flow(tmp_path, params, raw, uri)
    c, name = state["client"], state["name"]
    assert model_file(f"models:/{name}@production", tmp_path / "ok", uri).is_file()

    c.set_registered_model_alias(name, "production", "2")  # by hand, no record
    with pytest.raises(
        UserError, match=r"moved to it outside synermix \(the last recorded move gave it to version 1\)"
    ):
        model_file(f"models:/{name}@production", tmp_path / "m1", uri)
    with pytest.raises(UserError, match="outside synermix"):
        bundle_version(params, tmp_path / "bundle")
    assert not (tmp_path / "bundle").exists()
    with pytest.raises(UserError, match="outside synermix"):  # its comparison would be against it
        pilot_line.pilot_eval(params, tmp_path / "pilot")
    report = rollout.status(params)
    assert report["moved_outside_synermix"] == {"production": "2"}
    assert "@production = v2 is REFUSED" in rollout.format_status(report)
    back = rollout.rollback(params, "production", "undo the move by hand")  # the way out, recorded
    assert (back["from"], back["to"]) == ("2", "1")
    assert model_file(f"models:/{name}@production", tmp_path / "m2", uri).is_file()
    assert rollout.status(params)["refused_aliases"] == {}

    # a forged number: version 2 (candidate, pilot) claims a test accuracy its run never measured
    c.set_model_version_tag(name, "2", "metric.test_accuracy", "0.999000")
    with pytest.raises(UserError, match=r"metric\.test_accuracy = 0\.999000 is not what evaluate run"):
        model_file(f"models:/{name}@candidate", tmp_path / "m3", uri)
    with pytest.raises(CheckFailed, match="evidence_bound"):
        rollout.promote(params, "production", "2", "forged")
    # forged pilot evidence: the number its pilot-eval run measured is what counts
    c.set_model_version_tag(name, "1", "pilot_eval.accuracy", "1.000000")
    with pytest.raises(UserError, match=r"pilot_eval\.accuracy = 1\.000000 is not what pilot-eval run"):
        model_file(f"models:/{name}@production", tmp_path / "m4", uri)
    # a fixed version is the user's explicit choice: not checked
    assert model_file(f"models:/{name}/2", tmp_path / "m5", uri).is_file()


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


def test_versions_whose_tags_no_run_backs_are_not_promoted(fake_registry):
    params, c, add, _ = fake_registry
    forged = add(runs=False, gates_passed="true", gate__min_accuracy="pass")
    with pytest.raises(
        CheckFailed, match=r"evidence_bound .* FAIL \(it names no evaluate run; it names no export run\)"
    ):
        rollout.promote(params, "pilot", forged, "tags say it passed")
    failed = add(gates_passed="false")  # its evaluate run failed; the tag is changed afterwards
    c.set_model_version_tag("synermix", failed, "gates_passed", "true")
    with pytest.raises(CheckFailed, match="did not pass its gates"):
        rollout.promote(params, "pilot", failed, "tag says it passed")
    # pilot evidence and a pilot hold written as tags, with no pilot-eval run and no recorded move
    good = add(gates_passed="true")
    for key, value in {
        "held.pilot": "true",
        "pilot_eval.images": "50",
        "pilot_eval.accuracy": "0.99",
    }.items():
        c.set_model_version_tag("synermix", good, key, value)
    with pytest.raises(CheckFailed) as refused:
        rollout.promote(params, "production", good, "tags say it held pilot")
    assert "no recorded move gave it @pilot" in str(refused.value)
    assert "pilot_eval.* tags name no pilot-eval run" in str(refused.value)
    assert registry.aliases_of(c, "synermix") == {}


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


def test_register_records_golden_scores_that_the_service_checks_a_version_against(tmp_path, train_project):
    from synermix.serve import ServeSettings, Service
    from synermix.watch import GOLDEN_TAGS, recorded_golden

    golden = pilot_folder(tmp_path / "line", {"crack": 3, "ok": 2, "scratch": 2}, seed=7000)
    params, _, uri = build_project(tmp_path, train_project, golden_set=str(golden))
    summary = run_register(params, tmp_path)
    name = params.registry.model_name
    tags = client(uri).get_model_version(name, summary["version"]).tags
    assert (
        tags[GOLDEN_TAGS["images"]] == "7"
        and tags[GOLDEN_TAGS["run_id"]] == summary["runs"]["register_run_id"]
    )
    assert summary["golden"]["images"] == 7

    recorded, note = recorded_golden({"name": name, "version": summary["version"]}, uri)
    assert note == "" and len(recorded["probabilities"]) == 7
    # the service, following the alias, checks the version against those scores before serving it
    settings = ServeSettings(
        model=f"models:/{name}@candidate", provider="cpu", poll_seconds=0, tracking_uri=uri, golden_set=golden
    )
    service = Service(settings)
    service.start()
    try:
        checked = service.primary.current.about["golden"]
    finally:
        service.stop()
    assert checked["passed"] and checked["compared_with_registration"] == 7
    assert checked["max_probability_difference"] <= 1e-5
    assert checked["accuracy"] == pytest.approx(summary["golden"]["accuracy"])

    # a golden folder with a class the model does not know stops the stage with one line
    (golden / "stain").mkdir()
    (golden / "stain" / "a.png").write_bytes((golden / "ok" / "line000.png").read_bytes())
    with pytest.raises(UserError, match=r"registry\.golden_set .* does not know"):
        run_register(params, tmp_path)
