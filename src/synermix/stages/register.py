"""The register stage: models/onnx/model.onnx -> a version of ``registry.model_name`` in
the MLflow registry (ONNX flavour, the PyTorch files alongside, the lineage and gate
verdicts as tags), with the ``candidate`` alias (and ``pilot`` with registry.auto_pilot)."""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow
import mlflow.onnx
import numpy as np
import onnx
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types.schema import Schema, TensorSpec

from synermix import model_tags, registry
from synermix.config import Params
from synermix.errors import CheckFailed, UserError
from synermix.paths import (
    EVAL_METRICS,
    EVAL_REPORT,
    EXPORT_METRICS,
    MODEL_DIR,
    MODEL_JSON,
    MODEL_WEIGHTS,
    ONNX_MODEL,
    REGISTER_REPORT,
    variant_model,
)
from synermix.stages.common import check_evaluation_is_current, read_json
from synermix.tracking import client_for, mlflow_run

log = logging.getLogger(__name__)


def run_register(params: Params, root: Path = Path(".")) -> dict:
    """Register models/onnx/model.onnx as a version of ``registry.model_name`` when its
    gates passed; it gets ``candidate`` (and ``pilot`` with ``registry.auto_pilot``).

    The same ONNX file (by sha256) is never registered twice: a rerun finds its version.
    """
    evaluation = read_json(root / EVAL_METRICS, "evaluate")
    export = read_json(root / EXPORT_METRICS, "export")
    onnx_path = root / ONNX_MODEL
    if not onnx_path.is_file() or not (root / MODEL_JSON).is_file():
        raise UserError(f"no {ONNX_MODEL} or {MODEL_DIR}: run the train and export stages first (dvc repro)")
    meta = json.loads((root / MODEL_JSON).read_text())
    onnx_sha = hashlib.sha256(onnx_path.read_bytes()).hexdigest()
    if export.get("onnx_sha256") != onnx_sha:
        raise UserError(f"{ONNX_MODEL} is not the file {EXPORT_METRICS} describes; rerun export (dvc repro)")
    check_evaluation_is_current(evaluation, root)
    if not export.get("parity", {}).get("passed"):
        raise CheckFailed(f"{EXPORT_METRICS} says the ONNX model failed its parity check; not registered")
    name = params.registry.model_name
    with mlflow_run(params, "register", root, {"model_name": name}) as run:
        mlflow.log_params({"registry.model_name": name, "registry.auto_pilot": params.registry.auto_pilot})
        if not evaluation.get("passed"):
            # only reachable with gates.enforce: false (an enforced failure stops evaluate)
            note = "gates failed (gates.enforce is false): not registered"
            summary = {"registered": False, "reason": note, "model_name": name, "onnx_sha256": onnx_sha}
            mlflow.set_tag("registered", "false")
            log.warning("%s; see %s", note, EVAL_REPORT)
        else:
            summary = register_version(
                client_for(params), params, root, run, onnx_path, meta, evaluation, export
            )
            mlflow.set_tags({"registered": "true", "model_version": summary["version"]})
        (root / REGISTER_REPORT).parent.mkdir(parents=True, exist_ok=True)
        (root / REGISTER_REPORT).write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
        mlflow.log_artifact(str(root / REGISTER_REPORT))
    return summary


def _lineage_runs(client: Any, meta: Mapping[str, Any], register_run: Any) -> dict[str, str]:
    """Run ids of the stages behind this model, followed from the training run's links."""
    runs = {"register_run_id": register_run.info.run_id}
    parent = register_run.data.tags.get("mlflow.parentRunId")
    if parent:
        runs["register_pipeline_run_id"] = parent
    train_id = str(meta.get("mlflow_run_id") or "")
    if not train_id:
        return runs
    try:
        train = client.get_run(train_id)
    except MlflowException:
        log.warning(
            "training run %s is not in this MLflow store: the version links to no training run", train_id
        )
        return runs
    tags = train.data.tags
    runs["train_run_id"] = train_id
    runs |= {
        key: tags[tag]
        for key, tag in (
            ("evaluate_run_id", "evaluation_run_id"),
            ("export_run_id", "export_run_id"),
            ("pipeline_run_id", "mlflow.parentRunId"),
        )
        if tags.get(tag)
    }
    if parent and parent == runs.get("pipeline_run_id"):
        del runs["register_pipeline_run_id"]  # trained and registered by the same repro
    study = tags.get("tuned_by_study")
    if study:
        query = f"tags.optuna_study = '{study}' and tags.synermix_role = 'tune'"
        found = client.search_runs([train.info.experiment_id], query, max_results=1)
        if found:
            runs["tune_run_id"] = found[0].info.run_id
    return runs


def _version_tags(meta, evaluation, export, runs, register_run) -> dict[str, str]:
    """What a person or a promotion check needs to know about the version, as tags."""
    tags = {
        model_tags.GATES_PASSED: str(bool(evaluation.get("passed"))).lower(),
        model_tags.ONNX_SHA256: export["onnx_sha256"],
        "onnx_opset": str(export.get("opset", "")),
        "onnx_exporter": str(export.get("exporter", "")),
        "parity_max_abs_diff": f"{export['parity']['max_abs_diff']:.3g}",
        "weights_sha256": str(meta.get("weights_sha256", "")),
        "manifest_sha256": str(meta.get("manifest_sha256", "")),
        "classes": ",".join(meta.get("class_names", [])),
        "arch": str(meta.get("arch", "")),
        "method": str(meta.get("method", "")),
        "init": str((meta.get("init") or {}).get("spec", "scratch")),
        # the graph outputs logits / T (temperature scaling fitted on val by evaluate)
        "temperature": model_tags.number((evaluation.get("calibration") or {}).get("temperature", 1.0)),
        **runs,
    }
    if (meta.get("init") or {}).get("sha256"):
        tags["init_sha256"] = str(meta["init"]["sha256"])
    for gate, result in evaluation.get("gates", {}).items():
        tags[model_tags.gate(gate)] = str(result.get("status", ""))
        for key in ("observed", "threshold"):
            if result.get(key) is not None:
                tags[model_tags.gate(gate, key)] = model_tags.number(result[key])
    for split in ("test", "val"):
        for metric in model_tags.HEADLINE:
            value = evaluation.get(split, {}).get(metric)
            if isinstance(value, int | float) and not math.isnan(float(value)):
                tags[model_tags.metric(split, metric)] = model_tags.number(value)
    for key in ("git_commit", "git_dirty", "manifest_sha256"):
        if register_run.data.tags.get(key):
            tags.setdefault(key, register_run.data.tags[key])
    tags |= {k: v for k, v in register_run.data.tags.items() if k.startswith(model_tags.DVC_LOCK_PREFIX)}
    return tags


def _description(meta, evaluation, runs: Mapping[str, str], experiment_id: str) -> str:
    """Markdown for the version page: the headline numbers and links to every run behind it."""
    test = evaluation.get("test", {})
    lines = [
        f"{meta.get('arch', '?')} trained with {meta.get('method', '?')} on classes "
        f"{', '.join(meta.get('class_names', []))}.",
        "",
        "Test split: "
        + ", ".join(
            f"{k} {float(test[k]):.4f}" for k in ("accuracy", "macro_recall", "recall_min") if k in test
        )
        + "; every release gate passed.",
        "",
        "Runs: "
        + ", ".join(
            f"[{key.removesuffix('_run_id')}](#/experiments/{experiment_id}/runs/{value})"
            for key, value in runs.items()
        ),
    ]
    return "\n".join(lines)


def register_version(
    client: Any,
    params: Params,
    root: Path,
    run: Any,
    onnx_path: Path,
    meta: Mapping[str, Any],
    evaluation: Mapping[str, Any],
    export: Mapping[str, Any],
) -> dict:
    """Log the ONNX model (MLflow onnx flavour, PyTorch files alongside) from the register
    run, create the version with its tags, move ``candidate`` (and ``pilot``) to it."""
    reg = params.registry
    name = reg.model_name
    run = client.get_run(run.info.run_id)  # with the lineage tags the run started with
    runs = _lineage_runs(client, meta, run)
    evaluate_id = runs.get("evaluate_run_id")
    if evaluate_id:
        judged = client.get_run(evaluate_id).data.tags.get("weights_sha256")
        if judged and judged != meta.get("weights_sha256"):
            raise UserError(f"{EVAL_METRICS} judged other weights than {MODEL_DIR}: rerun evaluate")
    registry.ensure_model(client, name)
    same = [
        v
        for v in registry.list_versions(client, name)
        if (v.tags or {}).get(model_tags.ONNX_SHA256) == export["onnx_sha256"]
    ]
    if same:
        version, new = str(same[-1].version), False
        log.info("%s is already %s version %s: not registered again", onnx_path, name, version)
    else:
        model_info = _log_onnx_model(root, onnx_path, meta)
        tags = _version_tags(meta, evaluation, export, runs, run)
        mv = client.create_model_version(
            name,
            source=model_info.model_uri,
            run_id=run.info.run_id,
            tags=tags,
            description=_description(meta, evaluation, runs, run.info.experiment_id),
            model_id=model_info.model_id,
        )
        version, new = str(mv.version), True
        log.info("registered %s as %s version %s (models:/%s/%s)", onnx_path, name, version, name, version)
    golden = _record_golden(client, name, version, onnx_path, reg.golden_set) if reg.golden_set else None
    reason = "passed its release gates (register stage)"
    moved = {}
    for alias in ("candidate", "pilot") if reg.auto_pilot else ("candidate",):
        move = registry.move_alias(
            client,
            name,
            alias,
            version,
            action="register",
            reason=reason,
            wait_seconds=reg.lock_wait_seconds,
            stale_seconds=reg.stale_lock_seconds,
        )
        moved[alias] = move.to_dict() if move else None
    return {
        "registered": True,
        "new_version": new,
        "model_name": name,
        "version": version,
        "model_uri": f"models:/{name}/{version}",
        "aliases_moved": moved,
        "onnx_sha256": export["onnx_sha256"],
        "runs": runs,
        "golden": golden,
    }


def _record_golden(client: Any, name: str, version: str, onnx_path: Path, folder: str) -> dict:
    """Score the golden set with the version's ONNX file, log the scores from the register
    run and point the version at them (``golden.*`` tags), for the service's swap check."""
    import tempfile

    from synermix.inference import Classifier
    from synermix.watch import GOLDEN_ARTIFACT, GOLDEN_TAGS, golden_images, score_golden

    images = golden_images(Path(folder))
    try:
        scores = score_golden(Classifier(onnx_path, provider="cpu"), images)
    except ValueError as exc:
        raise UserError(f"registry.golden_set {folder}: {exc}") from None
    scores["folder"] = str(folder)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(GOLDEN_ARTIFACT).name
        path.write_text(json.dumps(scores, indent=1, sort_keys=True) + "\n")
        mlflow.log_artifact(str(path), artifact_path=str(Path(GOLDEN_ARTIFACT).parent))
    run_id = mlflow.active_run().info.run_id
    values = {
        "run_id": run_id,
        "sha256": scores["sha256"],
        "accuracy": model_tags.number(scores["accuracy"]),
        "images": str(scores["images"]),
    }
    for key, tag in GOLDEN_TAGS.items():
        client.set_model_version_tag(name, version, tag, values[key])
    log.info(
        "golden set %s: accuracy %.4f on %d images, recorded with version %s",
        folder,
        scores["accuracy"],
        scores["images"],
        version,
    )
    return {k: scores[k] for k in ("images", "sha256", "accuracy")} | {"run_id": run_id}


def _log_onnx_model(root: Path, onnx_path: Path, meta: Mapping[str, Any]) -> Any:
    """The ONNX file as an MLflow model (loadable with mlflow.pyfunc), with the PyTorch
    weights, the variants and the stage reports as extra files."""
    model = onnx.load(str(onnx_path))
    graph_in, graph_out = model.graph.input[0], model.graph.output[0]
    pre = meta["preprocessing"]
    signature = ModelSignature(
        inputs=Schema(
            [
                TensorSpec(
                    np.dtype(np.float32),
                    (-1, pre["channels"], pre["image_size"], pre["image_size"]),
                    graph_in.name,
                )
            ]
        ),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, len(meta["class_names"])), graph_out.name)]),
    )
    extra = [root / MODEL_JSON, root / MODEL_WEIGHTS]
    extra += sorted(p for p in onnx_path.parent.glob(variant_model("*").name))
    extra += [root / EVAL_METRICS, root / EXPORT_METRICS]
    return mlflow.onnx.log_model(
        onnx_model=model,
        name="model",
        signature=signature,
        save_as_external_data=False,
        extra_files=[str(p) for p in extra if p.is_file()],
        onnx_execution_providers=["CUDAExecutionProvider", "CPUExecutionProvider"],
        metadata={
            "synermix": model.metadata_props
            and {p.key: p.value for p in model.metadata_props}.get("synermix", "")
        },
    )
