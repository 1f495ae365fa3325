"""Lineage: the stages of one `dvc repro` under one MLflow pipeline run (the real DVC process
tree is exercised by tests/test_pipeline_dvc.py; here the key comes from the environment)."""

import hashlib
import json
import time

import pytest
import yaml

from synermix import eval_report, lineage
from synermix.config import parse_params
from synermix.errors import CheckFailed
from synermix.progress import stage_clock
from synermix.stages.evaluate import run_evaluate
from synermix.stages.validate import run_validate


@pytest.mark.parametrize(
    ("cmdline", "expected"),
    [
        (["/usr/bin/python3", "/x/.venv/bin/dvc", "repro"], True),
        (["python", "-m", "dvc", "exp", "run", "-S", "a=1"], True),
        (["dvc", "repro", "-s", "train"], True),
        (["/x/.venv/bin/dvc", "status"], False),
        (["python", "pipeline/train.py"], False),
        (["/bin/sh", "-c", "python pipeline/train.py"], False),
    ],
)
def test_dvc_process_recognised(cmdline, expected):
    assert lineage._is_dvc_run(cmdline) is expected


def test_no_pipeline_key_outside_dvc(monkeypatch):
    monkeypatch.delenv(lineage.PIPELINE_KEY_ENV, raising=False)
    assert lineage.pipeline_key() is None  # pytest does not descend from a dvc process
    monkeypatch.setenv(lineage.PIPELINE_KEY_ENV, "ci-build-42")
    assert lineage.pipeline_key() == "ci-build-42"


def test_dvc_lock_hashes_cover_upstream_stages_only(tmp_path):
    entries = {
        "prepare": {"cmd": "python pipeline/prepare.py", "outs": [{"path": "data/prepared", "md5": "a.dir"}]},
        "train": {"cmd": "python pipeline/train.py", "params": {"params.yaml": {"seed": 1}}},
        "export": {"cmd": "python pipeline/export.py"},
    }
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": entries}))
    hashes = lineage.dvc_lock_hashes(tmp_path, before="evaluate")
    assert set(hashes) == {"prepare", "train"}  # export's entry is from an older run
    canonical = json.dumps(entries["train"], sort_keys=True, separators=(",", ":"))
    assert hashes["train"] == hashlib.sha256(canonical.encode()).hexdigest()
    assert set(lineage.dvc_lock_hashes(tmp_path)) == {"prepare", "train", "export"}
    assert lineage.dvc_lock_hashes(tmp_path / "nowhere") == {}


@pytest.mark.integration  # trains and runs stages
def test_stages_of_one_repro_share_a_pipeline_run(tmp_path, train_project, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv(lineage.PIPELINE_KEY_ENV, "repro-1")
    (tmp_path / "params.yaml").write_text("seed: 123\n")
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump({"stages": {"prepare": {"cmd": "x"}}}))
    raw = train_project({"crack": 16, "ok": 16}, "lineage-test")
    params = parse_params(raw)
    run_validate(params, tmp_path)
    strict = parse_params({**raw, "gates": {"min_accuracy": 1.0, "champion": {"enabled": False}}})
    entered = int(time.time() * 1000)
    with pytest.raises(CheckFailed), stage_clock("evaluate"):
        time.sleep(0.4)  # the stage's work before its logging: the run must span it
        run_evaluate(strict, tmp_path)

    client = MlflowClient()
    (experiment,) = [e.experiment_id for e in client.search_experiments() if e.name == "lineage-test"]
    (parent,) = client.search_runs([experiment], "tags.synermix_role = 'pipeline'")
    assert parent.data.tags["synermix_pipeline_key"] == "repro-1"
    children = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    stages = {r.data.tags["stage"]: r for r in children}
    assert set(stages) == {"prepare", "train", "validate", "evaluate"}
    assert parent.data.tags["stages_ran"] == "prepare,train,validate,evaluate"
    # the failed stage closes the pipeline run as failed, and says which stage it was
    assert parent.info.status == "FAILED" and parent.data.tags["failed_stage"] == "evaluate"
    assert stages["evaluate"].info.status == "FAILED" and stages["train"].info.status == "FINISHED"
    manifest = hashlib.sha256((tmp_path / "data/prepared/manifest.csv").read_bytes()).hexdigest()
    for name, run in stages.items():
        assert run.data.tags["manifest_sha256"] == manifest, name
        assert run.data.tags["pipeline_run_id"] == parent.info.run_id
        assert parent.data.tags[f"run.{name}"] == run.info.run_id
    assert (
        "dvc_lock.prepare" in stages["train"].data.tags
        and "dvc_lock.prepare" not in stages["prepare"].data.tags
    )
    # every param, once, on the pipeline run; params.yaml and dvc.lock attached
    assert parent.data.params["seed"] == "123" and parent.data.params["train.epochs"] == "1"
    assert parent.data.params["gates.min_accuracy"] == "0.5"  # as the first stage saw them
    paths = {a.path for a in client.list_artifacts(parent.info.run_id, "pipeline")}
    assert paths == {"pipeline/params.yaml", "pipeline/dvc.lock"}
    failed = stages["evaluate"].data.tags["failed_gates"].split(",")
    assert "min_accuracy" in failed  # the gate set to 1.0; the others as this noise model fares
    evaluation = json.loads((tmp_path / "reports/evaluation.json").read_text())
    assert failed == [g for g, r in evaluation["gates"].items() if r["status"] == "FAIL"]

    # the verdict on the pipeline run: its name, the gates that failed, the headline numbers
    # (those of reports/metrics.json) and the top of evaluation.md with links to the runs
    evaluate = stages["evaluate"]
    assert parent.info.run_name == f"dvc repro: gates FAILED ({', '.join(failed)})"
    assert parent.data.tags["failed_gates"] == ",".join(failed)
    headline = json.loads((tmp_path / "reports/metrics.json").read_text())
    measured = [k for k in eval_report.PIPELINE_HEADLINE if headline[k] is not None]
    assert set(parent.data.metrics) == set(measured) and "test_accuracy" in measured
    for key in measured:  # the line's rates are not measured without defect classes
        assert parent.data.metrics[key] == pytest.approx(headline[key], abs=1e-6), key
    assert parent.data.metrics["gates_passed"] == 0.0
    note = parent.data.tags["mlflow.note.content"]
    assert note == evaluate.data.tags["mlflow.note.content"]
    assert note.startswith("# Evaluation: FAILED") and "## Gates" in note and "## Champion" not in note
    train_id = stages["train"].info.run_id
    assert f"(#/experiments/{experiment}/runs/{train_id}?workflowType=machine_learning)" in note
    # the training values on the pipeline run, and class names rather than indices
    assert (
        parent.data.params["train.beta"] == "0.1" and parent.data.tags["train_params_from"] == "params.yaml"
    )
    assert evaluate.data.tags["test_worst_class"] in {"crack", "ok"}
    assert "test_worst_class" not in evaluate.data.metrics
    # the run spans the stage's work (the clock's start), not only its logging at the end
    assert entered <= evaluate.info.start_time <= entered + 200
    assert evaluate.info.end_time - evaluate.info.start_time >= 400
    # the images each stage used, as MLflow datasets
    contexts = {
        name: sorted(
            tag.value for d in run.inputs.dataset_inputs for tag in d.tags if tag.key == "mlflow.data.context"
        )
        for name, run in stages.items()
    }
    assert contexts == {
        "prepare": ["prepared"],
        "train": ["train", "val"],
        "validate": [],
        "evaluate": ["test"],
    }

    # `synermix status` opens with this repro: how it ended, which gate failed, where to look;
    # and does not say "run the pipeline" to someone who just did
    from synermix import rollout

    report = rollout.status(strict)
    last = report["last_pipeline"]
    assert last["run_id"] == parent.info.run_id and last["failed_gates"] == ",".join(failed)
    assert last["ui"].endswith(f"/runs/{parent.info.run_id}?workflowType=machine_learning")
    text = rollout.format_status(report)
    first = text.splitlines()[0]
    assert "FAILED at evaluate" in first and f"gates FAILED: {','.join(failed)}" in first
    assert "no versions yet: the last pipeline run's model failed its gates" in text
    assert {a.path for a in client.list_artifacts(stages["validate"].info.run_id, "validation")} == {
        "validation/validation.md",
        "validation/validation.json",
        "validation/quarantine.csv",
        "validation/samples.png",
    }

    # the next repro is another pipeline run; a stage run by hand belongs to none
    monkeypatch.setenv(lineage.PIPELINE_KEY_ENV, "repro-2")
    run_validate(params, tmp_path)
    monkeypatch.delenv(lineage.PIPELINE_KEY_ENV)
    run_validate(params, tmp_path)
    pipelines = client.search_runs([experiment], "tags.synermix_role = 'pipeline'")
    assert len(pipelines) == 2
    validations = client.search_runs([experiment], "tags.stage = 'validate'")
    assert sorted(bool(r.data.tags.get("mlflow.parentRunId")) for r in validations) == [False, True, True]
