"""The export stage on a really trained model: ONNX file, parity, variants, refusals, MLflow."""

import hashlib
import json

import onnx
import pytest
import torch

from synermix.errors import CheckFailed, UserError
from synermix.inference import Classifier, ModelInfo
from synermix.paths import EXPORT_DIR, EXPORT_METRICS, MODEL_DIR, ONNX_MODEL
from synermix.profile import PROFILE_JSON, profile_of
from synermix.stages.evaluate import run_evaluate
from synermix.stages.export import run_export

from ..helpers import REPO_ROOT
from .test_evaluate import LAX

# trains a model, starts a server or shells out (make test-unit leaves these out)
pytestmark = pytest.mark.integration


@pytest.fixture
def project(tmp_path, train_project, make_params):
    """crack 20, ok 40, scratch 20 images (test split: 3, 6, 3), a trained model and its evaluation.

    Gives the project root, params with an export section, and a function that re-runs evaluate.
    """
    raw = train_project({"crack": 20, "ok": 40, "scratch": 20}, "export-test", gates=LAX)
    run_evaluate(make_params(**raw), tmp_path)

    def with_export(**export):
        return make_params(**raw, export=export)

    def evaluate():  # the model changed on disk: judge it again, as dvc repro would
        run_evaluate(make_params(**raw), tmp_path)

    return tmp_path, with_export, evaluate


def test_export_writes_a_checked_self_describing_model_and_variants(project):
    import mlflow

    root, with_export, _ = project
    summary = run_export(
        with_export(fp16=True, int8=True, max_accuracy_drop=1.0, calibration_images=16), root
    )

    assert json.loads((root / EXPORT_METRICS).read_text()) == summary
    parity = summary["parity"]
    assert parity["passed"] and parity["images"] == 12 and parity["top1_agreement"] == 1.0
    assert parity["max_abs_diff"] <= 1e-4 and parity["preprocessing_max_abs_diff"] == 0.0
    assert sorted(p.name for p in (root / EXPORT_DIR).iterdir()) == [
        "model.fp16.onnx",
        "model.int8.onnx",
        "model.onnx",
        "profile.json",
    ]
    assert summary["onnx_sha256"] == hashlib.sha256((root / ONNX_MODEL).read_bytes()).hexdigest()
    assert set(summary["test_accuracy"]) == {"fp32", "fp16", "int8"} and summary["test_images"] == 12
    assert all(v["accepted"] for v in summary["variants"].values())

    meta = json.loads((root / MODEL_DIR / "model.json").read_text())
    for name in ("model.onnx", "model.fp16.onnx", "model.int8.onnx"):
        proto = onnx.load(str(root / EXPORT_DIR / name))
        info = ModelInfo.from_metadata({p.key: p.value for p in proto.metadata_props})
        assert info.class_names == meta["class_names"] == ["crack", "ok", "scratch"]
        assert info.extra["training_run_id"] == meta["mlflow_run_id"]
        # no file of the exporting machine is named in the shipped model (the checkout, the venv)
        for node in proto.graph.node:
            for prop in node.metadata_props:
                assert str(REPO_ROOT) not in prop.value and "site-packages" not in prop.value, prop.key
        assert info.extra["weights_sha256"] == meta["weights_sha256"] and info.extra["gates_passed"] is True
        # the reference profile travels inside every variant, identical, for this model's weights
        profile = profile_of(root / EXPORT_DIR / name)
        assert profile.to_dict() == profile_of(root / PROFILE_JSON).to_dict()
        assert profile.weights_sha256 == meta["weights_sha256"]
        assert Classifier(root / EXPORT_DIR / name, provider="cpu").embedding_name == "embedding"
    assert summary["profile"]["sha256"] == profile.to_dict()["sha256"]
    assert summary["profile"]["val_images"] == profile.images == 12
    assert profile.statistics_images == 12 + summary["profile"]["train_images"]
    assert parity["embedding_max_rel_diff"] is not None and parity["embedding_max_rel_diff"] <= 1e-4
    onnx.checker.check_model(onnx.load(str(root / ONNX_MODEL)), full_check=True)
    assert (
        Classifier(root / EXPORT_DIR / "model.int8.onnx", provider="cpu").class_names == meta["class_names"]
    )

    client = mlflow.MlflowClient()
    [run] = client.search_runs(
        [client.get_experiment_by_name("export-test").experiment_id], "tags.stage = 'export'"
    )
    assert run.data.tags["onnx_sha256"] == summary["onnx_sha256"]
    assert run.data.metrics["parity_top1_agreement"] == 1.0
    assert {a.path for a in client.list_artifacts(run.info.run_id, "onnx")} == {
        "onnx/model.onnx",
        "onnx/model.fp16.onnx",
        "onnx/model.int8.onnx",
    }


def test_a_variant_that_loses_accuracy_is_refused(project):
    root, with_export, evaluate = project
    # logits 1000.1 (crack) and 1000.2 (ok): FP32 predicts ok for every image (6 of 12 right);
    # in FP16 both round to 1000.0, the tie goes to crack (3 of 12): a drop of 0.25
    weights = root / MODEL_DIR / "weights.pt"
    state = torch.load(weights, weights_only=True)
    state["classifier.weight"].zero_()
    state["classifier.bias"].copy_(torch.tensor([1000.1, 1000.2, 0.0]))
    torch.save(state, weights)
    evaluate()
    with pytest.raises(
        CheckFailed, match=r"fp16 variant refused: test accuracy drops 0\.2500 below FP32 ONNX"
    ):
        run_export(with_export(fp16=True), root)
    summary = json.loads((root / EXPORT_METRICS).read_text())
    assert summary["test_accuracy"] == {"fp32": 0.5, "fp16": 0.25}
    assert summary["variants"]["fp16"]["accepted"] is False
    assert not (root / EXPORT_DIR / "model.fp16.onnx").exists() and (root / ONNX_MODEL).is_file()


def test_export_refuses_a_model_that_failed_enforced_gates(project):
    root, with_export, _ = project
    summary = json.loads((root / "reports/evaluation.json").read_text())
    (root / "reports/evaluation.json").write_text(json.dumps({**summary, "passed": False, "enforced": True}))
    with pytest.raises(CheckFailed, match="failed its gates"):
        run_export(with_export(), root)


def test_a_parity_failure_fails_the_stage_after_writing_the_numbers(project):
    root, with_export, _ = project
    # no float32 conv library reproduces another bit for bit: a 1e-15 tolerance cannot be met
    with pytest.raises(CheckFailed, match=r"ONNX parity failed on 12 val images: max \|logit difference\|"):
        run_export(with_export(parity_max_abs_diff=1e-15, fp16=True), root)
    summary = json.loads((root / EXPORT_METRICS).read_text())
    assert summary["parity"]["passed"] is False and summary["parity"]["max_abs_diff"] > 1e-15
    assert summary["variants"] == {}  # no variant is built from a model that failed parity


def retrain_by_hand(root) -> None:
    """Other weights in models/model, self-consistent (model.json names their sha256), as a
    train stage run by hand after evaluate leaves them."""
    weights = root / MODEL_DIR / "weights.pt"
    state = torch.load(weights, weights_only=True)
    first = next(k for k, v in state.items() if v.is_floating_point())
    state[first] = state[first] + 0.01
    torch.save(state, weights)
    meta_path = root / MODEL_DIR / "model.json"
    meta = json.loads(meta_path.read_text())
    meta["weights_sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()
    meta_path.write_text(json.dumps(meta))


def test_a_stale_evaluation_is_not_trusted_by_export_or_register(project):
    """evaluation.json names the weights, manifest and classes it judged: stages run by hand
    with evaluate skipped used to export and register other weights as gates_passed."""
    from synermix.stages.register import run_register

    root, with_export, _ = project
    evaluation = json.loads((root / "reports/evaluation.json").read_text())
    assert set(evaluation["model"]) == {"weights_sha256", "manifest_sha256", "class_names"}
    assert (
        evaluation["model"]["weights_sha256"]
        == hashlib.sha256((root / MODEL_DIR / "weights.pt").read_bytes()).hexdigest()
    )
    run_export(with_export(), root)
    retrain_by_hand(root)
    with pytest.raises(UserError, match=r"judged other weights than models/model/weights\.pt"):
        run_export(with_export(), root)
    with pytest.raises(UserError, match="judged other weights"):
        run_register(with_export(), root)
    # an evaluation written before it named its model is not trusted either
    (root / "reports/evaluation.json").write_text(
        json.dumps({k: v for k, v in evaluation.items() if k != "model"})
    )
    with pytest.raises(UserError, match="does not say which model it judged"):
        run_export(with_export(), root)
    # another manifest under the same weights
    run_evaluate(with_export(), root)
    manifest = root / "data/prepared/manifest.csv"
    manifest.write_text(manifest.read_text() + "\n")
    with pytest.raises(UserError, match="another manifest"):
        run_export(with_export(), root)


def test_the_exported_graph_outputs_calibrated_logits(project):
    """The temperature evaluate fitted goes into the graph: ONNX logits are PyTorch's / T on
    real val images, the metadata names T, and a T that is not a positive number is refused."""
    from synermix.data.transforms import Preprocessing, load_resized, normalize
    from synermix.paths import EVAL_METRICS
    from synermix.training import load_trained_model

    root, with_export, _ = project
    summary_path = root / EVAL_METRICS
    evaluation = json.loads(summary_path.read_text())
    evaluation["calibration"]["temperature"] = 2.5  # a clear one: the fitted T may be near 1
    summary_path.write_text(json.dumps(evaluation))
    summary = run_export(with_export(), root)
    assert summary["parity"]["passed"]
    classifier = Classifier(root / ONNX_MODEL, provider="cpu")
    assert classifier.info.extra["temperature"] == 2.5
    assert "divided by the temperature 2.5" in classifier.info.extra["output"]
    model, meta = load_trained_model(root / MODEL_DIR)
    pre = Preprocessing.from_dict(meta["preprocessing"])
    images = sorted((root / "data" / "prepared").rglob("*.png"))[:4]
    batch = torch.stack([normalize(load_resized(f, pre.image_size, pre.channels), pre) for f in images])
    with torch.no_grad():
        expected = (model(batch) / 2.5).numpy()
    assert classifier.logits(batch.numpy()) == pytest.approx(expected, abs=1e-4)

    for bad in (-1.0, 0.0, "warm"):
        evaluation["calibration"]["temperature"] = bad
        summary_path.write_text(json.dumps(evaluation))
        with pytest.raises(UserError, match=r"calibration.temperature .* is not a positive number"):
            run_export(with_export(), root)


def test_one_decision_from_evaluate_to_onnx_predict_and_serve(tmp_path, train_project, make_params):
    """The operating point and unknown-part distance evaluate fitted travel in the ONNX file:
    its decisions on the test images equal evaluate's (predictions.csv), and `synermix
    predict` and the service answer the same decision and distance for the same image."""
    import pandas as pd

    from synermix.cli import main
    from synermix.paths import EVAL_DIR, PREPARED_DIR

    from ..test_serve import serving

    decision = {"defect_classes": ["crack", "scratch"], "max_escape_rate": 0.0, "max_review_rate": None}
    raw = train_project({"crack": 20, "ok": 40, "scratch": 20}, "decision-test", gates=LAX, decision=decision)
    evaluation = run_evaluate(make_params(**raw), tmp_path)
    summary = run_export(make_params(**raw), tmp_path)
    assert summary["parity"]["passed"] and summary["parity"]["distance_max_rel_diff"] <= 1e-4
    assert summary["test_decisions"]["agreement_with_evaluate"] == 1.0
    classifier = Classifier(tmp_path / ONNX_MODEL, provider="cpu")
    point = evaluation["decision"]["operating_point"]
    assert classifier.info.operating_point.to_dict() == point
    assert classifier.info.unknown_above == evaluation["decision"]["unknown"]["threshold"]
    assert classifier.output_names == ["logits", "distance"]

    predictions = pd.read_csv(tmp_path / EVAL_DIR / "predictions.csv", keep_default_na=False)
    files = [tmp_path / PREPARED_DIR / p for p in predictions["path"][:4]]
    out = tmp_path / "predicted.json"
    args = ["predict", *map(str, files), "--model", str(tmp_path / ONNX_MODEL), "--provider", "cpu"]
    assert main([*args, "--out", str(out)]) == 0
    by_cli = json.loads(out.read_text())["predictions"]
    assert [r["decision"] for r in by_cli] == list(predictions["decision"][:4])
    with serving(str(tmp_path / ONNX_MODEL), provider="cpu", poll_seconds=0) as (client, _):
        for file, row in zip(files, by_cli, strict=True):
            code, answer = client.predict(file.read_bytes())
            assert code == 200, answer
            got = answer["prediction"]
            assert got["decision"] == row["decision"] and got["distance"] == pytest.approx(row["distance"])
        code, info = client.request("GET", "/v1/model")
        assert info["primary"]["decision"]["defect_classes"] == ["crack", "scratch"]
        code, text = client.request("GET", "/metrics")
        assert "synermix_decisions_total{class=" in text or "synermix_decisions_total{" in text
