"""The evaluate stage in-process and through the CLI: real images, real MLflow (SQLite) store
and model registry, real trained models."""

import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from synermix.errors import CheckFailed, UserError
from synermix.paths import EVAL_DETAILS, EVAL_DIR, EVAL_METRICS, EVAL_REPORT, MODEL_DIR, PREPARED_DIR
from synermix.stages.evaluate import run_evaluate

# trains a model, starts a server or shells out (make test-unit leaves these out)
pytestmark = pytest.mark.integration

LAX = {  # gates every model passes, so a test can switch on the one it checks
    "min_accuracy": None,
    "min_macro_recall": None,
    "min_class_recall": None,
    "max_recall_spread": None,
    "max_intra_class_variance": None,
    "max_ece": None,
    "max_escape_rate": None,
    "max_overkill_rate": None,
    "max_review_rate": None,
    "beat_majority": False,
}


@pytest.fixture
def trained(tmp_path, train_project, make_params):
    """A prepared dataset (crack 40, ok 20, scratch 20 images) and a model trained on it."""
    raw = train_project({"crack": 40, "ok": 20, "scratch": 20}, "evaluate-test")

    def with_gates(decision=None, **gates):
        extra = {"decision": decision} if decision is not None else {}
        return make_params(**raw, gates={**LAX, **gates}, **extra)

    return tmp_path, with_gates


def held_out_rows(tmp_path):
    manifest = pd.read_csv(tmp_path / PREPARED_DIR / "manifest.csv")
    return manifest[manifest["split"] == "test"]


def test_evaluate_writes_every_report_and_an_mlflow_run(trained):
    import mlflow

    root, with_gates = trained
    summary = run_evaluate(with_gates(min_accuracy=0.0), root)

    assert summary["passed"] and json.loads((root / EVAL_METRICS).read_text()) == summary
    test_rows = held_out_rows(root)
    test = summary["test"]
    assert test["images"] == len(test_rows) == 12  # 15 % of 40 + 20 + 20
    assert set(test["per_class"]) == {"crack", "ok", "scratch"}
    assert sum(c["support"] for c in test["per_class"].values()) == 12
    assert summary["val"]["images"] == 12
    for key in (
        "accuracy",
        "macro_recall",
        "macro_f1",
        "recall_spread",
        "ece",
        "intra_class_variance",
        "within_fraction",
        "fisher_ratio",
        "silhouette",
        "centroid_distance_min",
    ):
        assert isinstance(test[key], float), key

    # the outputs agree with one another
    predictions = pd.read_csv(root / EVAL_DIR / "predictions.csv")
    assert sorted(predictions["path"]) == sorted(test_rows["path"])
    assert test["accuracy"] == pytest.approx(predictions["correct"].mean())
    details = json.loads((root / EVAL_DETAILS).read_text())
    confusion = pd.crosstab(predictions["actual"], predictions["predicted"]).reindex(
        index=details["class_names"], columns=details["class_names"], fill_value=0
    )
    assert details["test"]["confusion"] == confusion.to_numpy().tolist()
    per_class = pd.read_csv(root / EVAL_DIR / "per_class.csv")
    assert per_class["class"].tolist() == ["crack", "ok", "scratch"]
    for name in ("confusion.png", "per_class.png", "calibration.png", "features_2d.png"):
        assert (root / EVAL_DIR / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    report = (root / EVAL_REPORT).read_text()
    assert report.startswith("# Evaluation: PASSED")
    assert "| min_accuracy | share of test images classified correctly | accuracy >= 0.0000 |" in report
    assert "No champion: no version of registered model 'synermix' holds the alias @production" in report
    assert "skipped (no version holds @production)" in report

    client = mlflow.MlflowClient()
    meta = json.loads((root / MODEL_DIR / "model.json").read_text())
    runs = client.search_runs(
        [client.get_experiment_by_name("evaluate-test").experiment_id], "tags.stage = 'evaluate'"
    )
    assert len(runs) == 1
    run = runs[0]
    assert run.data.tags["model_run_id"] == meta["mlflow_run_id"] and run.data.tags["gates_passed"] == "true"
    assert run.data.metrics["test_accuracy"] == pytest.approx(test["accuracy"])
    assert "test_recall.crack" in run.data.metrics and "val_macro_recall" in run.data.metrics
    assert run.data.params["gates.min_accuracy"] == "0.0"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"evaluation.md", "evaluation.json", "evaluation"} <= artifacts
    figures = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
    assert "evaluation/features_2d.png" in figures and "evaluation/predictions.csv" in figures
    training = client.get_run(meta["mlflow_run_id"]).data.tags
    assert training["evaluation_run_id"] == run.info.run_id and training["gates_passed"] == "true"


def test_a_failed_gate_fails_the_stage_after_writing_the_reports(trained):
    root, with_gates = trained
    with pytest.raises(CheckFailed) as failure:
        run_evaluate(with_gates(min_accuracy=1.0, min_macro_recall=0.0), root)
    message = str(failure.value)
    assert "evaluation gates failed on 12 test images" in message
    assert "min_accuracy" in message and "accuracy >= 1.0000" in message and "FAIL" in message
    assert "min_macro_recall" in message and "pass" in message
    summary = json.loads((root / EVAL_METRICS).read_text())
    assert summary["passed"] is False and summary["gates"]["min_accuracy"]["status"] == "FAIL"
    assert summary["gates"]["min_accuracy"]["margin"] == pytest.approx(summary["test"]["accuracy"] - 1.0)
    assert (root / EVAL_REPORT).read_text().startswith("# Evaluation: FAILED: min_accuracy")

    # enforce: false reports the same failure without failing
    reported = run_evaluate(with_gates(min_accuracy=1.0, enforce=False), root)
    assert reported["passed"] is False and reported["enforced"] is False
    assert "reported only, gates.enforce is false" in (root / EVAL_REPORT).read_text()


def test_the_cli_exits_1_and_prints_the_gate_table(trained):
    root, with_gates = trained
    params = with_gates(min_accuracy=1.0).model_dump(mode="json", by_alias=True)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    proc = subprocess.run(
        [sys.executable, "-m", "synermix.cli", "evaluate"],
        cwd=root,
        capture_output=True,
        text=True,
        env=os.environ,
    )
    assert proc.returncode == 1, proc.stderr
    assert "error: evaluation gates failed" in proc.stderr and "accuracy >= 1.0000" in proc.stderr
    assert "Traceback" not in proc.stderr


def constant_model(model_dir, out_dir, predict: int) -> str:
    """A copy of the trained model that always predicts class ``predict``; its weights hash."""
    if out_dir != model_dir:
        shutil.copytree(model_dir, out_dir, dirs_exist_ok=True)
    state = torch.load(out_dir / "weights.pt", weights_only=True)
    state["classifier.weight"].zero_()
    state["classifier.bias"].copy_(torch.nn.functional.one_hot(torch.tensor(predict), 3).float() * 10)
    torch.save(state, out_dir / "weights.pt")
    digest = hashlib.sha256((out_dir / "weights.pt").read_bytes()).hexdigest()
    meta = json.loads((out_dir / "model.json").read_text())
    meta["weights_sha256"] = digest
    (out_dir / "model.json").write_text(json.dumps(meta))
    return digest


def register(folder, forged: bool = False) -> str:
    """Log ``folder`` as a run's model files and give the new version @production the way
    promote does (recorded moves, evaluate/export/pilot-eval runs behind its tags); ``forged``:
    by one plain MLflow call, with no evidence."""
    import mlflow

    from synermix import registry

    from ..helpers.registry import back_with_runs, give_production

    client = mlflow.MlflowClient()
    uri = mlflow.get_tracking_uri()
    registry.ensure_model(client, "synermix")
    experiment = client.get_experiment_by_name("evaluate-test").experiment_id
    with mlflow.start_run(experiment_id=experiment, run_name="champion") as run:
        mlflow.log_artifacts(str(folder), artifact_path="model")
    version = str(
        client.create_model_version("synermix", f"{run.info.artifact_uri}/model", run.info.run_id).version
    )
    if forged:
        client.set_model_version_tag("synermix", version, "gates_passed", "true")
        client.set_registered_model_alias("synermix", "production", version)
        return version
    weights = json.loads((folder / "model.json").read_text())["weights_sha256"]
    tags = back_with_runs(client, uri, experiment, "synermix", version, {"gates_passed": "true"}, weights)
    for key, value in tags.items():
        client.set_model_version_tag("synermix", version, key, value)
    give_production(client, uri, experiment, "synermix", version)
    return version


def test_champion_challenger_against_the_registered_production_model(trained):
    root, with_gates = trained
    test = held_out_rows(root)
    shares = test["label"].value_counts()
    assert (shares["crack"], shares["ok"]) == (6, 3)
    # champion: always "crack" (accuracy 6/12); challenger: always "ok" (accuracy 3/12);
    # both have macro recall 1/3
    constant_model(root / MODEL_DIR, root / "champion", predict=0)
    assert register(root / "champion") == "1"
    constant_model(root / MODEL_DIR, root / MODEL_DIR, predict=1)

    with pytest.raises(CheckFailed, match="champion_accuracy"):
        run_evaluate(with_gates(), root)
    summary = json.loads((root / EVAL_METRICS).read_text())
    assert summary["champion"]["version"] == "1" and summary["champion"]["alias"] == "production"
    assert summary["champion"]["metrics"]["accuracy"] == pytest.approx(0.5)
    assert summary["test"]["accuracy"] == pytest.approx(0.25)
    gates = summary["gates"]
    assert gates["champion_accuracy"]["status"] == "FAIL"
    assert gates["champion_accuracy"]["threshold"] == pytest.approx(0.5 - 0.02)
    assert gates["champion_macro_recall"]["status"] == "pass"  # 1/3 against 1/3
    # paired on the same images: 6 crack right only by the champion, 3 ok only by the challenger
    assert summary["champion"]["paired"]["only_champion_right"] == 6
    assert summary["champion"]["paired"]["only_challenger_right"] == 3
    report = (root / EVAL_REPORT).read_text()
    assert (
        "Compared with synermix@production (version 1)" in report
        and "| accuracy | 0.5000 | 0.2500 | -0.2500 |" in report
    )

    # the champion itself as challenger: no drop, every gate passes
    shutil.copytree(root / "champion", root / MODEL_DIR, dirs_exist_ok=True)
    assert run_evaluate(with_gates(), root)["gates"]["champion_accuracy"]["margin"] == pytest.approx(0.02)

    # a production model with other classes cannot be compared: skipped, with the reason
    meta = json.loads((root / "champion" / "model.json").read_text())
    meta["class_names"] = ["a", "b", "c"]
    (root / "champion" / "model.json").write_text(json.dumps(meta))
    assert register(root / "champion") == "2"
    summary = run_evaluate(with_gates(), root)
    assert summary["gates"]["champion_accuracy"]["status"] == "skipped" and summary["champion"] == {}
    assert "synermix@production (version 2) knows classes a, b, c" in (root / EVAL_REPORT).read_text()

    # a production model trained on another manifest had another split: not a fair comparison
    meta["class_names"] = ["crack", "ok", "scratch"]
    meta["manifest_sha256"] = "0" * 64
    (root / "champion" / "model.json").write_text(json.dumps(meta))
    assert register(root / "champion") == "3"
    summary = run_evaluate(with_gates(), root)
    assert summary["gates"]["champion_accuracy"]["status"] == "skipped"
    assert "(version 3) was trained on another manifest" in (root / EVAL_REPORT).read_text()

    # @production moved by hand to a version with no evidence (a lower bar): refused, named
    meta["manifest_sha256"] = json.loads((root / MODEL_DIR / "model.json").read_text())["manifest_sha256"]
    (root / "champion" / "model.json").write_text(json.dumps(meta))
    assert register(root / "champion", forged=True) == "4"
    with pytest.raises(
        UserError,
        match=r"champion synermix@production \(version 4\) is refused: "
        r"@production was moved to it outside synermix.*rollback production",
    ):
        run_evaluate(with_gates(), root)


def test_evaluate_refuses_a_model_trained_on_other_data_or_no_model(trained, tmp_path_factory):
    root, with_gates = trained
    meta = json.loads((root / MODEL_DIR / "model.json").read_text())
    meta["manifest_sha256"] = "0" * 64
    (root / MODEL_DIR / "model.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match=r"trained on another manifest .* retrain first"):
        run_evaluate(with_gates(), root)
    with pytest.raises(UserError, match="no trained model in models/model; run the train stage first"):
        run_evaluate(with_gates(), tmp_path_factory.mktemp("empty"))


def test_scores_match_a_direct_forward_pass(trained):
    from synermix.data.transforms import Preprocessing
    from synermix.evaluation import score_model
    from synermix.training import load_trained_model

    root, _ = trained
    model, meta = load_trained_model(root / MODEL_DIR)
    rows = held_out_rows(root)
    pre = Preprocessing.from_dict(meta["preprocessing"])
    scores = score_model(model, pre, rows, root / PREPARED_DIR, meta["class_names"], batch_size=5)
    from synermix.data.transforms import load_resized, normalize

    x = torch.stack(
        [normalize(load_resized(root / PREPARED_DIR / p, 32, pre.channels), pre) for p in rows["path"]]
    )
    with torch.no_grad():
        expected = model(x).double().numpy()
    assert scores.logits == pytest.approx(expected, abs=1e-4)
    assert scores.features.shape == (12, model.feature_dim)
    assert np.array_equal(scores.labels, [meta["class_names"].index(c) for c in rows["label"]])


def test_evaluate_fits_a_temperature_on_val_and_reports_calibrated_probabilities(trained):
    """T minimises the val NLL (so val NLL can only fall), the reported ECE is the calibrated
    one, accuracy is untouched, and calibrate: false leaves T = 1."""
    from synermix.calibration import nll
    from synermix.data.transforms import Preprocessing
    from synermix.evaluation import score_model
    from synermix.training import load_trained_model

    root, with_gates = trained
    summary = run_evaluate(with_gates(min_accuracy=0.0), root)
    cal = summary["calibration"]
    t = cal["temperature"]
    assert t > 0 and cal["fitted_on"] == "val" and cal["fitted_on_images"] == 12
    assert cal["val_nll_after"] <= cal["val_nll_before"] + 1e-9
    assert summary["test"]["ece"] == pytest.approx(cal["test_ece_after"])
    # the numbers are those of the model's own logits on test, divided by T
    model, meta = load_trained_model(root / MODEL_DIR)
    pre = Preprocessing.from_dict(meta["preprocessing"])
    scores = score_model(model, pre, held_out_rows(root), root / PREPARED_DIR, meta["class_names"])
    assert cal["test_nll_before"] == pytest.approx(nll(scores.logits, scores.labels), rel=1e-6)
    assert cal["test_nll_after"] == pytest.approx(nll(scores.logits, scores.labels, t), rel=1e-6)
    assert summary["test"]["accuracy"] == pytest.approx(float(scores.correct.mean()))
    report = (root / EVAL_REPORT).read_text()
    assert f"Temperature T = {t:.4f} (fitted on 12 val images by NLL" in report
    assert "| test | " in report.split("## Calibration (temperature scaling)")[1]

    raw = with_gates(min_accuracy=0.0).model_dump()
    from synermix.config import parse_params

    off = run_evaluate(parse_params({**raw, "evaluate": {**raw["evaluate"], "calibrate": False}}), root)
    assert off["calibration"]["temperature"] == 1.0 and "calibrate: false" in off["calibration"]["note"]
    assert off["test"]["accuracy"] == summary["test"]["accuracy"]
    assert off["test"]["ece"] == pytest.approx(cal["test_ece_before"])


DEFECTS = {"defect_classes": ["crack", "scratch"]}


def test_the_line_decision_is_fitted_on_val_stored_reported_and_gated(trained):
    """crack and scratch are defects: evaluate fits the operating point on val (meeting the
    val limits), measures it on test, stores it for export, opens the report with the rates
    and gates them; the unknown-part distance is fitted on the training images."""
    from synermix.paths import DECISION_JSON, NOVELTY_NPZ

    root, with_gates = trained
    decision = {**DEFECTS, "max_escape_rate": 0.0, "max_review_rate": None}
    gated = with_gates(decision=decision, max_escape_rate=1.0, max_review_rate=0.0, enforce=False)
    summary = run_evaluate(gated, root)
    line = summary["decision"]
    point = line["operating_point"]
    assert point["defect_classes"] == ["crack", "scratch"]
    assert point["fit"]["escape_rate"] == 0.0 and point["fit"]["images"] == 12  # the val split
    assert 0.0 <= point["accept_below"] <= point["reject_from"]
    test = summary["test"]
    assert test["escape_rate"] == line["test"]["escape"]["rate"]
    assert line["test"]["escape"]["of"] == 9  # 6 crack + 3 scratch test images
    assert line["unknown"]["fitted_on_train_images"] == 56 and line["unknown"]["threshold"] > 0
    gates = summary["gates"]
    assert (
        gates["max_escape_rate"]["status"] == "pass"
        and gates["max_escape_rate"]["observed"] == test["escape_rate"]
    )
    # the review gate judges the test rate: at 0 it fails unless nothing went to review
    assert gates["max_review_rate"]["status"] == ("pass" if test["review_rate"] == 0 else "FAIL")
    assert summary["passed"] is (test["review_rate"] == 0)

    stored = json.loads((root / DECISION_JSON).read_text())
    assert stored["operating_point"] == point and stored["unknown_above"] == line["unknown"]["threshold"]
    assert (root / NOVELTY_NPZ).is_file()
    predictions = pd.read_csv(root / EVAL_DIR / "predictions.csv", keep_default_na=False)
    assert set(predictions["decision"]) <= {"accept", "review", "reject", "unknown"}
    counts = predictions["decision"].value_counts()
    assert counts.get("review", 0) == line["test"]["review"]["count"]
    report = (root / EVAL_REPORT).read_text()
    head = report.split("## Gates")[0]
    assert "## On the line (test split)" in head and "| escape |" in head and "| crack | defect |" in head

    # the contact sheet and Grad-CAM overlays show the line's worst calls on real test images
    sheet = pd.read_csv(root / EVAL_DIR / "contact_sheet.csv", keep_default_na=False)
    by_path = predictions.set_index("path")
    assert set(sheet["path"]) <= set(held_out_rows(root)["path"])
    for row in sheet.itertuples():
        assert row.kind in {"escape", "overkill"}
        assert by_path.loc[row.path, "decision"] == ("accept" if row.kind == "escape" else "reject")
        assert (row.actual in {"crack", "scratch"}) == (row.kind == "escape")
    expected = (
        predictions["actual"].isin(["crack", "scratch"]) & (predictions["decision"] == "accept")
    ).sum()
    assert (sheet["kind"] == "escape").sum() == min(expected, 8)
    for name in ("contact_sheet.png", "gradcam.png"):
        assert (root / EVAL_DIR / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_decision_settings_stop_with_one_line(trained):
    root, with_gates = trained
    with pytest.raises(UserError) as err:
        run_evaluate(with_gates(decision={"defect_classes": ["dent"]}), root)
    assert "'dent', not a class of this model" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(UserError) as err:  # no review band, no escape, no overkill: not on this model
        run_evaluate(
            with_gates(
                decision={**DEFECTS, "review": False, "max_escape_rate": 0.0, "max_overkill_rate": 0.0}
            ),
            root,
        )
    message = str(err.value)
    assert "decision limits cannot be met on the val split" in message and "\n" not in message
