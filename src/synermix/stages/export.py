"""The export stage: models/model -> models/onnx/model.onnx, parity-checked against PyTorch
on real val images; optional FP16 / INT8 variants scored on the test split."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd

from synermix import onnx_export as ox
from synermix.config import Params
from synermix.data.transforms import Preprocessing, load_resized, normalize
from synermix.errors import CheckFailed, UserError
from synermix.evaluation import score_model
from synermix.inference import Classifier
from synermix.line_decision import read_decision
from synermix.metrics import softmax
from synermix.novelty import novelty_module
from synermix.paths import (
    EVAL_METRICS,
    EVAL_TABLES,
    EXPORT_DIR,
    EXPORT_METRICS,
    MODEL_DIR,
    MODEL_JSON,
    ONNX_MODEL,
    PREPARED_DIR,
    variant_model,
)
from synermix.profile import PROFILE_JSON, attach_profile, build_profile, observe
from synermix.stages.common import (
    check_evaluation_is_current,
    evaluation_rows,
    known_train_rows,
    tag_training_run,
    train_val_rows,
)
from synermix.tracking import flatten, mlflow_run
from synermix.training import load_trained_model

log = logging.getLogger(__name__)


def _evaluation_verdict(root: Path) -> tuple[bool | None, float]:
    """Whether the evaluate stage passed this model's gates (None: not evaluated), and the
    temperature it fitted (1 when it fitted none)."""
    path = root / EVAL_METRICS
    if not path.is_file():
        log.warning("no %s: exporting a model that was not evaluated (uncalibrated)", EVAL_METRICS)
        return None, 1.0
    try:
        summary = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not readable JSON ({exc}); rerun the evaluate stage (dvc repro)") from None
    check_evaluation_is_current(summary, root)
    if not summary.get("passed") and summary.get("enforced"):
        raise CheckFailed(f"{EVAL_METRICS} says the model failed its gates; fix that before exporting")
    temperature = (summary.get("calibration") or {}).get("temperature", 1.0)
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature <= 0:
        raise UserError(
            f"{EVAL_METRICS}: calibration.temperature {temperature!r} is not a positive number; "
            "rerun the evaluate stage (dvc repro)"
        )
    return bool(summary.get("passed")), float(temperature)


def run_export(params: Params, root: Path = Path(".")) -> dict:
    """models/model -> models/onnx/model.onnx, checked against PyTorch on real val images.

    Optional FP16 / INT8 variants are scored on the test split against the FP32 ONNX
    model and refused (stage fails, file removed) past ``export.max_accuracy_drop``.
    """
    ex = params.export
    if not (root / MODEL_JSON).is_file():
        raise UserError(f"no trained model in {MODEL_DIR}; run the train stage first (dvc repro)")
    model, meta = load_trained_model(root / MODEL_DIR)
    gates_passed, temperature = _evaluation_verdict(root)
    names = list(meta["class_names"])
    stored = read_decision(root, names, meta["weights_sha256"])
    pre = Preprocessing.from_dict(meta["preprocessing"])
    image_root = root / PREPARED_DIR
    train_rows = known_train_rows(root, names)
    projection = _fit_projection(model, pre, train_rows, image_root, names, ex.embedding_dims)
    # logits / T (calibrated for every consumer), the unknown-part distance and the
    # monitoring embedding, from one pass
    model = ox.LineModel(
        model,
        temperature,
        None if stored.novelty is None else novelty_module(stored.novelty),
        projection,
    )
    decision = {
        "operating_point": None if stored.point is None else stored.point.to_dict(),
        "unknown_above": stored.unknown_above,
    }
    val_rows, test_rows = evaluation_rows(root, names, meta.get("manifest_sha256"))
    if val_rows.empty:
        raise CheckFailed("the val split has no usable image to check parity on; rerun prepare (dvc repro)")
    out_dir = root / EXPORT_DIR
    if out_dir.is_dir():  # this stage's own output: stale variants must not linger
        shutil.rmtree(out_dir)
    metadata = ox.model_metadata(
        meta, ex.exporter, ex.opset, gates_passed=gates_passed, temperature=temperature, decision=decision
    )
    ox.export_onnx(model, pre.channels, pre.image_size, root / ONNX_MODEL, ex.exporter, ex.opset, metadata)
    classifier = Classifier(root / ONNX_MODEL, provider="cpu")

    checked = val_rows.sort_values("path").head(ex.parity_images)
    files = [image_root / p for p in checked["path"]]
    training_view = [normalize(load_resized(f, pre.image_size, pre.channels), pre) for f in files]
    parity = ox.check_parity(model, classifier, files, training_view)
    parity_ok = parity.passed(ex.parity_max_abs_diff)

    test_inputs, labels = production_inputs(test_rows, image_root, classifier.preprocess, names)
    test_logits, test_distances = ox.batched_outputs(classifier, test_inputs)  # one pass for both
    fp32_accuracy = ox.accuracy_of(test_logits, labels)
    decisions = _decision_agreement(root, classifier, test_rows, test_logits, test_distances)
    profile = None
    if parity_ok and projection is not None:
        profile = _write_profile(
            classifier, val_rows, train_rows, image_root, names, meta["weights_sha256"], root
        )
    onnx_bytes = (root / ONNX_MODEL).read_bytes()
    summary: dict = {
        "exporter": ex.exporter,
        "opset": ex.opset,
        "onnx_sha256": hashlib.sha256(onnx_bytes).hexdigest(),
        "onnx_bytes": len(onnx_bytes),
        "provider": classifier.provider,
        "parity": {**parity.to_dict(), "tolerance": ex.parity_max_abs_diff, "passed": parity_ok},
        "test_images": len(test_rows),
        "test_accuracy": {"fp32": fp32_accuracy},
        "test_decisions": decisions,
        "profile": None
        if profile is None
        else {
            "sha256": profile.to_dict()["sha256"],
            "val_images": profile.images,
            "train_images": profile.train.get("images", 0),
            "embedding_dims": int(profile.embeddings.shape[1]),
            "file": str(PROFILE_JSON),
        },
        "variants": {},
    }
    refused = []
    if parity_ok:
        refused = _export_variants(
            params, root, summary, test_inputs, labels, fp32_accuracy, classifier.preprocess, names
        )
    (root / EXPORT_METRICS).parent.mkdir(parents=True, exist_ok=True)
    (root / EXPORT_METRICS).write_text(json.dumps(summary, indent=2) + "\n")
    failure = None
    if not parity_ok:
        failure = CheckFailed(
            f"ONNX parity failed on {parity.images} val images: max |logit difference| "
            f"{parity.max_abs_diff:.3g} (allowed {ex.parity_max_abs_diff:g}), top-1 agreement "
            f"{parity.top1_agreement:.2%}, production vs training input "
            f"{parity.preprocessing_max_abs_diff:.3g}, distance max relative difference "
            f"{parity.distance_max_rel_diff if parity.distance_max_rel_diff is not None else 'n/a'}; "
            "try export.exporter: torchscript or another export.opset"
        )
    elif refused:
        failure = CheckFailed(
            "; ".join(refused) + f" (export.max_accuracy_drop {ex.max_accuracy_drop:g}); see {EXPORT_METRICS}"
        )
    _log_export(params, root, meta, summary, failure)
    log.info(
        "exported %s: parity on %d val images max |diff| %.2e, top-1 agreement %.0f%%; test accuracy %.4f",
        ONNX_MODEL,
        parity.images,
        parity.max_abs_diff,
        100 * parity.top1_agreement,
        fp32_accuracy,
    )
    return summary


def _fit_projection(
    model, pre: Preprocessing, rows: pd.DataFrame, image_root: Path, names: list[str], dims: int
) -> ox.Projection | None:
    """The monitoring projection: the top principal directions of the training images'
    penultimate features (None when ``export.embedding_dims`` is 0)."""
    if dims == 0:
        return None
    scores = score_model(
        model, pre, rows, image_root, names, device="cpu", desc="features for the projection"
    )
    mean, basis = ox.fit_projection(scores.features, dims)
    log.info("monitoring embedding: %d principal directions of %d training images", basis.shape[1], len(rows))
    return ox.Projection(mean, basis)


def _write_profile(
    classifier: Classifier,
    val_rows: pd.DataFrame,
    train_rows: pd.DataFrame,
    image_root: Path,
    names: list[str],
    weights_sha256: str,
    root: Path,
):
    """The reference profile (:mod:`synermix.profile`) of the exported model on the val and
    training images, written into the ONNX file and to models/onnx/profile.json."""

    def files(rows: pd.DataFrame):
        for path, label in zip(rows["path"], rows["label"], strict=True):
            yield (image_root / path).read_bytes(), names.index(label)

    val = observe(classifier, files(val_rows))
    train = observe(classifier, files(train_rows))
    profile = build_profile(classifier, val, train, weights_sha256)
    attach_profile(root / ONNX_MODEL, profile)
    (root / PROFILE_JSON).write_text(json.dumps(profile.to_dict(), indent=1, sort_keys=True) + "\n")
    log.info(
        "reference profile: %d val and %d training images (%s)",
        val_rows.shape[0],
        len(train_rows),
        PROFILE_JSON,
    )
    return profile


def _decision_agreement(
    root: Path, classifier: Classifier, rows: pd.DataFrame, logits: np.ndarray, distances: np.ndarray | None
) -> dict:
    """The ONNX model's decisions on the test images (from its ``logits`` and ``distances``):
    counts, and the share equal to the decision evaluate made for the same image
    (reports/evaluation/predictions.csv)."""
    decided = classifier.decisions(softmax(logits), distances)
    counts = {k: decided.count(k) for k in sorted(set(decided)) if k}
    out: dict = {"counts": counts}
    table = root / EVAL_TABLES["predictions"]
    if any(decided) and table.is_file():
        evaluated = pd.read_csv(table, keep_default_na=False)
        if "decision" in evaluated.columns:
            by_path = dict(zip(evaluated["path"], evaluated["decision"], strict=True))
            same = [by_path.get(path) == dec for path, dec in zip(rows["path"], decided, strict=True)]
            out["agreement_with_evaluate"] = sum(same) / max(1, len(same))
            if out["agreement_with_evaluate"] < 1.0:
                log.warning(
                    "the ONNX model decides %d of %d test images otherwise than evaluate did "
                    "(at a threshold)",
                    len(same) - sum(same),
                    len(same),
                )
    return out


def production_inputs(rows: pd.DataFrame, image_root: Path, preprocess, names: list[str]) -> tuple:
    """The model inputs of ``rows`` from their file bytes (``preprocess``: a
    :class:`synermix.inference.Preprocessor`), stacked, and their class indices."""
    inputs = np.stack([preprocess((image_root / p).read_bytes()) for p in rows["path"]])
    return inputs, np.asarray([names.index(c) for c in rows["label"]], dtype=np.int64)


def calibration_rows(params: Params, root: Path, names: list[str]) -> pd.DataFrame:
    """The seeded sample of training images that INT8 quantisation calibrates on."""
    _, train_rows, _, _ = train_val_rows(params, root)
    train_rows = train_rows[train_rows["label"].isin(names)]
    return train_rows.sample(
        n=min(params.export.calibration_images, len(train_rows)), random_state=params.seed
    )


def _export_variants(
    params, root, summary, test_inputs, labels, fp32_accuracy, preprocess, names
) -> list[str]:
    """FP16 / INT8 files when asked for, each scored on the test split; returns refusals."""
    ex = params.export
    refused = []
    wanted = [name for name, on in (("fp16", ex.fp16), ("int8", ex.int8)) if on]
    for name in wanted:
        path = root / variant_model(name)
        if name == "fp16":
            ox.convert_fp16(root / ONNX_MODEL, path)
        else:
            rows = calibration_rows(params, root, names)
            calibration, _ = production_inputs(rows, root / PREPARED_DIR, preprocess, names)
            ox.quantize_int8(root / ONNX_MODEL, path, calibration)
        variant_accuracy = ox.accuracy(Classifier(path, provider="cpu"), test_inputs, labels)
        drop = fp32_accuracy - variant_accuracy
        accepted = drop <= ex.max_accuracy_drop + 1e-12
        summary["test_accuracy"][name] = variant_accuracy
        summary["variants"][name] = {
            "file": str(variant_model(name)),
            "bytes": path.stat().st_size,
            "accuracy_drop": drop,
            "accepted": accepted,
        }
        log.info(
            "%s variant: test accuracy %.4f (FP32 %.4f, drop %+.4f)",
            name,
            variant_accuracy,
            fp32_accuracy,
            drop,
        )
        if not accepted:
            path.unlink()
            refused.append(f"{name} variant refused: test accuracy drops {drop:.4f} below FP32 ONNX")
    return refused


def _log_export(params: Params, root: Path, meta: dict, summary: dict, failure: CheckFailed | None) -> None:
    """The export run (parity, accuracies, the ONNX files); ``failure`` is raised inside it."""
    tags = {
        "model_run_id": str(meta.get("mlflow_run_id", "")),
        "weights_sha256": meta["weights_sha256"],
        "onnx_sha256": summary["onnx_sha256"],
        "onnx_provider": summary["provider"],
    }
    with mlflow_run(params, "export", root, tags) as run:
        mlflow.log_params(flatten({"export": params.export.model_dump(mode="json")}))
        values = {f"parity_{k}": float(v) for k, v in summary["parity"].items() if k != "tolerance"}
        values |= {f"test_accuracy_{k}": float(v) for k, v in summary["test_accuracy"].items()}
        values["onnx_bytes"] = float(summary["onnx_bytes"])
        mlflow.log_metrics(values)
        mlflow.log_artifact(str(root / EXPORT_METRICS))
        for path in sorted((root / EXPORT_DIR).glob("*.onnx")):
            mlflow.log_artifact(str(path), artifact_path="onnx")
        tag_training_run(
            params, meta, {"export_run_id": run.info.run_id, "onnx_sha256": summary["onnx_sha256"]}
        )
        if failure is not None:
            raise failure
