"""Staged rollout: candidate -> pilot -> production, each move through its gates.

- The **register** stage records a version that passed its release gates and gives it
  ``candidate`` (``registry.auto_pilot: true``: ``pilot`` too).
- ``promote pilot`` takes a version that passed its gates (default: the candidate).
- ``pilot-eval`` scores the pilot version on labelled images collected at the pilot line
  and records the result on the version, next to the current production version's score
  on the same images.
- ``promote production`` takes a version that held ``pilot`` and whose pilot evidence
  meets ``registry.production_gates`` (:func:`production_checks`, pure).
- ``rollback`` puts back the version that held the alias before the current one.

Every move goes through :func:`synermix.registry.move_alias`, which records who, when,
why and the previous holder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import tempfile
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from synermix import registry
from synermix.config import Params, ProductionGates
from synermix.errors import CheckFailed, UserError
from synermix.gates import GateResult, format_table, verdict
from synermix.tracking import redact_uri

log = logging.getLogger(__name__)

PROMOTABLE = ("pilot", "production")
#: version tags that hold the headline test metrics (written by the register stage)
HEADLINE = ("accuracy", "macro_recall", "macro_f1", "recall_min", "intra_class_variance", "ece")


def client_for(params: Params) -> Any:
    """An MLflow client on the configured store (MLFLOW_TRACKING_URI overrides params)."""
    from mlflow.tracking import MlflowClient

    from synermix.tracking import quiet_mlflow_logs, tracking_uri

    quiet_mlflow_logs()
    return MlflowClient(tracking_uri(params.mlflow))


def _holder(client: Any, name: str, alias: str, what: str) -> str:
    version = registry.aliases_of(client, name).get(alias)
    if version is None:
        raise UserError(f"no version of '{name}' holds @{alias}, so there is no {what}; {_HINTS[alias]}")
    return version


_HINTS = {
    "candidate": "run the pipeline (dvc repro) until a model passes its gates, or pass --version N",
    "pilot": "promote one first (synermix promote pilot --reason ...), or pass --version N",
    "production": "promote one first (synermix promote production --reason ...)",
}


# --------------------------------------------------------------------------- register
def _lineage_runs(client: Any, meta: Mapping[str, Any], register_run: Any) -> dict[str, str]:
    """Run ids of the stages behind this model, followed from the training run's links."""
    from mlflow.exceptions import MlflowException

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
        "gates_passed": str(bool(evaluation.get("passed"))).lower(),
        "onnx_sha256": export["onnx_sha256"],
        "onnx_opset": str(export.get("opset", "")),
        "onnx_exporter": str(export.get("exporter", "")),
        "parity_max_abs_diff": f"{export['parity']['max_abs_diff']:.3g}",
        "weights_sha256": str(meta.get("weights_sha256", "")),
        "manifest_sha256": str(meta.get("manifest_sha256", "")),
        "classes": ",".join(meta.get("class_names", [])),
        "arch": str(meta.get("arch", "")),
        "method": str(meta.get("method", "")),
        "init": str((meta.get("init") or {}).get("spec", "scratch")),
        **runs,
    }
    if (meta.get("init") or {}).get("sha256"):
        tags["init_sha256"] = str(meta["init"]["sha256"])
    for gate, result in evaluation.get("gates", {}).items():
        tags[f"gate.{gate}"] = str(result.get("status", ""))
        for key in ("observed", "threshold"):
            if result.get(key) is not None:
                tags[f"gate.{gate}.{key}"] = f"{float(result[key]):.6f}"
    for split in ("test", "val"):
        for metric in HEADLINE:
            value = evaluation.get(split, {}).get(metric)
            if isinstance(value, int | float) and not math.isnan(float(value)):
                tags[f"metric.{split}_{metric}"] = f"{float(value):.6f}"
    for key in ("git_commit", "git_dirty", "manifest_sha256"):
        if register_run.data.tags.get(key):
            tags.setdefault(key, register_run.data.tags[key])
    tags |= {k: v for k, v in register_run.data.tags.items() if k.startswith("dvc_lock.")}
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
            raise UserError("reports/evaluation.json judged other weights than models/model: rerun evaluate")
    registry.ensure_model(client, name)
    same = [
        v
        for v in registry.list_versions(client, name)
        if (v.tags or {}).get("onnx_sha256") == export["onnx_sha256"]
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
    }


def _log_onnx_model(root: Path, onnx_path: Path, meta: Mapping[str, Any]) -> Any:
    """The ONNX file as an MLflow model (loadable with mlflow.pyfunc), with the PyTorch
    weights, the variants and the stage reports as extra files."""
    import mlflow.onnx
    import numpy as np
    import onnx
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

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
    model_dir = onnx_path.parent.parent / "model"
    extra = [model_dir / "model.json", model_dir / "weights.pt"]
    extra += sorted(p for p in onnx_path.parent.glob("model.*.onnx"))
    extra += [root / "reports" / "evaluation.json", root / "reports" / "export.json"]
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


# --------------------------------------------------------------------------- promote
def production_checks(
    tags: Mapping[str, str],
    gates: ProductionGates,
    version: str,
    current_production: str | None,
    now: datetime | None = None,
) -> list[GateResult]:
    """The checks ``promote production`` applies to a version's tags (pure).

    The version must have passed its release gates and held ``pilot``; its latest pilot
    evaluation (``pilot_eval.*`` tags) must cover ``min_images`` images, be younger than
    ``max_evidence_age_days``, meet the minimum accuracy / recall, and, when another
    version holds production, score no more than ``max_drop`` below it on the same
    images (so the comparison must have been made against today's production version).
    """

    def flag(gate: str, ok: bool, about: str, note: str = "") -> GateResult:
        return GateResult(gate, "", "", None, None, ok, about, note)

    def number(key: str) -> float | None:
        try:
            return float(tags[key])
        except (KeyError, ValueError):
            return None

    results = [
        flag("release_gates", tags.get("gates_passed") == "true", "passed its release gates at registration"),
        flag(
            "held_pilot",
            tags.get("held.pilot") == "true",
            "held @pilot",
            "" if tags.get("held.pilot") else "never did",
        ),
    ]
    images = number("pilot_eval.images")
    if images is None:
        results.append(
            flag("pilot_evidence", False, "pilot-line evaluation recorded", "none: run synermix pilot-eval")
        )
        return results
    results.append(
        GateResult(
            "min_images",
            "pilot images",
            ">=",
            float(gates.min_images),
            images,
            images >= gates.min_images,
            "labelled pilot images scored",
        )
    )
    if gates.max_evidence_age_days is not None:
        at = tags.get("pilot_eval.at", "")
        try:
            age = (now or datetime.now(UTC)) - datetime.strptime(at, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
            days = age.total_seconds() / 86400
        except ValueError:
            days = math.inf
        results.append(
            GateResult(
                "evidence_age_days",
                "age (days)",
                "<=",
                gates.max_evidence_age_days,
                days,
                days <= gates.max_evidence_age_days,
                "pilot evaluation is recent",
                at,
            )
        )
    for gate, metric in (
        ("min_accuracy", "accuracy"),
        ("min_macro_recall", "macro_recall"),
        ("min_class_recall", "recall_min"),
    ):
        threshold = getattr(gates, gate)
        if threshold is None:
            continue
        observed = number(f"pilot_eval.{metric}")
        ok = observed is not None and observed >= threshold
        results.append(
            GateResult(f"pilot_{gate}", metric, ">=", threshold, observed, ok, f"pilot-line {metric}")
        )
    if not current_production or current_production == str(version):
        results.append(
            GateResult(
                "no_regression",
                "",
                "",
                None,
                None,
                None,
                "no drop against production",
                "this version holds production already"
                if current_production
                else "no production version yet",
            )
        )
        return results
    compared = tags.get("pilot_eval.production_version", "")
    if compared != current_production:
        note = (
            f"pilot-eval compared with version {compared or 'none'}, production is now {current_production}: "
            "rerun synermix pilot-eval"
        )
        results.append(flag("no_regression", False, "no drop against production", note))
        return results
    for metric, drop in gates.max_drop.items():
        reference = number(f"pilot_eval.production_{metric}")
        observed = number(f"pilot_eval.{metric}")
        if reference is None:
            results.append(
                GateResult(
                    f"no_regression_{metric}",
                    metric,
                    ">=",
                    None,
                    observed,
                    None,
                    "no drop against production",
                    "production could not be scored",
                )
            )
            continue
        threshold = reference - drop
        ok = observed is not None and observed >= threshold
        results.append(
            GateResult(
                f"no_regression_{metric}",
                metric,
                ">=",
                threshold,
                observed,
                ok,
                f"at most {drop:g} below production v{current_production}",
                f"production {reference:.4f}",
            )
        )
    return results


def promote(params: Params, alias: str, version: str | None, reason: str, by: str | None = None) -> dict:
    """Move ``pilot`` or ``production`` to a version, after its checks; returns the record."""
    if alias not in PROMOTABLE:
        raise UserError(f"cannot promote to @{alias}: use one of {', '.join(PROMOTABLE)}")
    if not reason.strip():
        raise UserError("say why: --reason '...' is recorded with the move")
    reg = params.registry
    client = client_for(params)
    name = reg.model_name
    if version is None:
        source = "candidate" if alias == "pilot" else "pilot"
        version = _holder(client, name, source, f"{source} to promote")
    mv = registry.get_version(client, name, version)
    tags = dict(mv.tags or {})
    if alias == "pilot":
        checks = [
            GateResult(
                "release_gates",
                "",
                "",
                None,
                None,
                tags.get("gates_passed") == "true",
                "passed its release gates at registration",
                _failed_gates(tags),
            )
        ]
    else:
        current = registry.aliases_of(client, name).get("production")
        checks = production_checks(tags, reg.production_gates, str(version), current)
    table = format_table(checks)
    if not verdict(checks):
        raise CheckFailed(f"{name} version {version} cannot be promoted to @{alias}:\n{table}")
    log.info("checks for %s version %s -> @%s:\n%s", name, version, alias, table)
    move = registry.move_alias(
        client,
        name,
        alias,
        str(version),
        action="promote",
        reason=reason,
        by=by,
        wait_seconds=reg.lock_wait_seconds,
        stale_seconds=reg.stale_lock_seconds,
    )
    if move is not None:
        client.set_model_version_tag(
            name, str(version), f"alias.{alias}.checks", json.dumps({c.gate: c.status for c in checks})
        )
    return {
        "moved": move is not None,
        "version": str(version),
        "alias": alias,
        "move": move.to_dict() if move else None,
        "checks": [c.to_dict() for c in checks],
    }


def _failed_gates(tags: Mapping[str, str]) -> str:
    failed = sorted(k.split(".", 1)[1] for k, v in tags.items() if k.startswith("gate.") and v == "FAIL")
    if tags.get("gates_passed") == "true":
        return ""
    return "failed: " + ", ".join(failed) if failed else "no passing gate verdict recorded"


def rollback(params: Params, alias: str, reason: str, by: str | None = None) -> dict:
    """Put back the version that held ``alias`` before the current holder."""
    reg = params.registry
    client = client_for(params)
    name = reg.model_name
    current = _holder(client, name, alias, "version to roll back")
    target = registry.rollback_target(registry.alias_history(client, name, alias), current)
    if target is None:
        raise UserError(f"{name}@{alias} (version {current}) has no earlier holder to roll back to")
    registry.get_version(client, name, target)  # refuses a version deleted since
    move = registry.move_alias(
        client,
        name,
        alias,
        target,
        action="rollback",
        reason=reason or "rollback",
        by=by,
        wait_seconds=reg.lock_wait_seconds,
        stale_seconds=reg.stale_lock_seconds,
    )
    return {
        "moved": move is not None,
        "alias": alias,
        "from": current,
        "to": target,
        "move": move.to_dict() if move else None,
    }


# --------------------------------------------------------------------------- pilot-eval
def labelled_images(folder: Path, class_names: list[str]) -> list[tuple[Path, str]]:
    """``<class>/<image>`` files under ``folder``; refuses unknown classes and loose images."""
    from synermix.data.images import IMAGE_EXTENSIONS
    from synermix.inference import image_files

    if not folder.is_dir():
        raise UserError(f"{folder}: no such folder; give a folder of <class>/<image> pilot-line photos")
    loose = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    if loose:
        raise UserError(
            f"{folder}: {len(loose)} image(s) directly in the folder (e.g. {loose[0].name}) carry no label; "
            "put every image in a folder named after its class"
        )
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    unknown = [c for c in classes if c not in class_names]
    if unknown:
        raise UserError(
            f"{folder}: class folder(s) {', '.join(unknown)} are not classes of this model "
            f"({', '.join(class_names)}); rename or remove them"
        )
    found = [(path, c) for c in classes for path in image_files([folder / c])]
    if not found:
        raise UserError(f"{folder}: no images ({', '.join(IMAGE_EXTENSIONS)}) in <class>/ folders")
    return found


def _scores_of(results, labels: list[str], class_names: list[str]) -> tuple[dict, Any]:
    import numpy as np

    from synermix.metrics import classification_scores, confusion_matrix

    ok = [i for i, r in enumerate(results) if r.status != "error"]
    y_true = np.asarray([class_names.index(labels[i]) for i in ok], dtype=np.int64)
    y_pred = np.asarray([class_names.index(results[i].label) for i in ok], dtype=np.int64)
    scores = classification_scores(confusion_matrix(y_true, y_pred, len(class_names)))
    return scores, y_true == y_pred


def _version_onnx(client: Any, name: str, version: str, dst: Path) -> Path:
    """The version's ONNX file, downloaded into ``dst`` (the same lookup as predict and serve)."""
    from synermix.bundle import model_file

    dst.mkdir(parents=True, exist_ok=True)
    return model_file(f"models:/{name}/{version}", dst, client.tracking_uri)


def pilot_eval(
    params: Params,
    images: Path,
    version: str | None = None,
    by: str | None = None,
    batch_size: int = 32,
    provider: str = "auto",
    max_pixels: int = 40_000_000,
) -> dict:
    """Score the pilot version (and today's production version) on labelled pilot images;
    record the result on the version and as an MLflow run."""
    import pandas as pd

    from synermix.inference import Classifier, read_files
    from synermix.metrics import mcnemar_exact

    client = client_for(params)
    name = params.registry.model_name
    version = version or _holder(client, name, "pilot", "pilot version to evaluate")
    registry.get_version(client, name, version)
    production = registry.aliases_of(client, name).get("production")
    with tempfile.TemporaryDirectory() as tmp:
        pilot_path = _version_onnx(client, name, version, Path(tmp) / "pilot")
        classifier = Classifier(pilot_path, provider=provider, max_pixels=max_pixels)
        class_names = classifier.class_names
        files = labelled_images(images, class_names)
        labels = [c for _, c in files]
        results = classifier.predict(read_files([p for p, _ in files]), batch_size=batch_size)
        errors = [r for r in results if r.status == "error"]
        if len(errors) == len(results):
            raise UserError(
                f"{images}: none of the {len(results)} image(s) could be scored ({errors[0].error})"
            )
        scores, correct = _scores_of(results, labels, class_names)
        summary: dict[str, Any] = {
            "model_name": name,
            "version": str(version),
            "folder": str(images.resolve()),
            "images": int(scores["images"]),
            "errors": len(errors),
            "provider": classifier.provider,
            **{k: scores[k] for k in ("accuracy", "macro_recall", "macro_f1", "recall_min")},
            "per_class_recall": dict(zip(class_names, scores["per_class"]["recall"], strict=True)),
            "images_sha256": _evidence_hash(files),
            "production_version": "",
        }
        if production and production != str(version):
            prod_path = _version_onnx(client, name, production, Path(tmp) / "production")
            prod_classifier = Classifier(prod_path, provider=provider, max_pixels=max_pixels)
            prod_results = prod_classifier.predict(read_files([p for p, _ in files]), batch_size=batch_size)
            summary["production_version"] = production
            if prod_classifier.class_names != class_names:
                summary["production_note"] = "production knows other classes: not compared"
            else:
                both_ok = [
                    r.status != "error" and p.status != "error"
                    for r, p in zip(results, prod_results, strict=True)
                ]
                if all(both_ok):
                    prod_scores, prod_correct = _scores_of(prod_results, labels, class_names)
                    for key in ("accuracy", "macro_recall", "macro_f1", "recall_min"):
                        summary[f"production_{key}"] = prod_scores[key]
                    paired = mcnemar_exact(correct, prod_correct)
                    summary["only_pilot_right"] = paired.only_a_right
                    summary["only_production_right"] = paired.only_b_right
                    summary["mcnemar_p_value"] = paired.p_value
                else:
                    summary["production_note"] = "some images could be scored by one model only: not compared"
    table = pd.DataFrame([r.to_row(class_names) for r in results])
    table.insert(1, "label", labels)
    summary["at"] = registry.now_utc()
    summary["by"] = registry.identity(by)
    summary["run_id"] = _log_pilot_run(params, summary, table)
    _tag_evidence(client, name, str(version), summary)
    return summary


def format_pilot(summary: Mapping[str, Any]) -> str:
    """A pilot evaluation in a few readable lines."""
    lines = [
        f"{summary['model_name']} version {summary['version']} on {summary['images']} pilot image(s) "
        f"from {summary['folder']} ({summary['errors']} unreadable, provider {summary['provider']}):",
        "  " + ", ".join(f"{k} {summary[k]:.4f}" for k in ("accuracy", "macro_recall", "recall_min")),
        "  recall per class: " + ", ".join(f"{c} {r:.4f}" for c, r in summary["per_class_recall"].items()),
    ]
    if summary.get("production_accuracy") is not None:
        lines.append(
            f"  production (version {summary['production_version']}) on the same images: "
            + ", ".join(
                f"{k} {summary['production_' + k]:.4f}" for k in ("accuracy", "macro_recall", "recall_min")
            )
            + f"; McNemar: {summary['only_pilot_right']} only pilot right, "
            f"{summary['only_production_right']} only production right, p = {summary['mcnemar_p_value']:.4g}"
        )
    elif summary.get("production_note"):
        lines.append(f"  production: {summary['production_note']}")
    lines.append(f"  recorded on the version as pilot_eval.* (MLflow run {summary['run_id']})")
    return "\n".join(lines)


def _evidence_hash(files: list[tuple[Path, str]]) -> str:
    """Which images (by content) and labels the evidence covers, independent of paths."""
    digest = hashlib.sha256()
    for entry in sorted(f"{hashlib.sha256(p.read_bytes()).hexdigest()} {label}" for p, label in files):
        digest.update(entry.encode() + b"\n")
    return digest.hexdigest()


def _log_pilot_run(params: Params, summary: dict, table) -> str:
    import mlflow

    from synermix.tracking import git_state, tracking_uri

    mlflow.set_tracking_uri(tracking_uri(params.mlflow))
    mlflow.set_experiment(params.mlflow.experiment)
    tags = {
        **git_state(),
        "stage": "pilot-eval",
        "synermix_role": "pilot-eval",
        "model_name": summary["model_name"],
        "model_version": summary["version"],
        "by": summary["by"],
    }
    with (
        mlflow.start_run(run_name=f"pilot-eval v{summary['version']}", tags=tags) as run,
        tempfile.TemporaryDirectory() as tmp,
    ):
        mlflow.log_params({"folder": summary["folder"], "images_sha256": summary["images_sha256"]})
        values = {
            k: float(v)
            for k, v in summary.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and not math.isnan(float(v))
        }
        values |= {
            f"recall.{k}": float(v) for k, v in summary["per_class_recall"].items() if not math.isnan(v)
        }
        mlflow.log_metrics(values)
        out = Path(tmp) / "pilot_predictions.csv"
        table.to_csv(out, index=False, lineterminator="\n")
        mlflow.log_artifact(str(out))
        (Path(tmp) / "pilot_eval.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
        mlflow.log_artifact(str(Path(tmp) / "pilot_eval.json"))
        return run.info.run_id


def _tag_evidence(client: Any, name: str, version: str, summary: dict) -> None:
    """The latest pilot evaluation, as ``pilot_eval.*`` tags on the version."""
    keys = (
        "run_id",
        "at",
        "by",
        "folder",
        "images",
        "errors",
        "accuracy",
        "macro_recall",
        "macro_f1",
        "recall_min",
        "images_sha256",
        "production_version",
        "production_accuracy",
        "production_macro_recall",
        "production_macro_f1",
        "production_recall_min",
        "production_note",
    )
    stale = [
        k for k in dict(client.get_model_version(name, version).tags or {}) if k.startswith("pilot_eval.")
    ]
    for key in stale:  # a new evaluation replaces the old one whole (its run keeps it)
        client.delete_model_version_tag(name, version, key)
    for key in keys:
        if key in summary and summary[key] is not None:
            value = summary[key]
            client.set_model_version_tag(
                name, version, f"pilot_eval.{key}", f"{value:.6f}" if isinstance(value, float) else str(value)
            )


# --------------------------------------------------------------------------- status
def status(params: Params, history: int = 10) -> dict:
    """Versions with their aliases, gates, headline metrics and pilot evidence; recent moves."""
    client = client_for(params)
    name = params.registry.model_name
    aliases = registry.aliases_of(client, name)
    by_version: dict[str, list[str]] = {}
    for alias, version in aliases.items():
        by_version.setdefault(version, []).append(alias)
    rows = []
    for mv in registry.list_versions(client, name):
        tags = dict(mv.tags or {})
        rows.append(
            {
                "version": str(mv.version),
                "aliases": ",".join(sorted(by_version.get(str(mv.version), []))),
                "created": datetime.fromtimestamp(mv.creation_timestamp / 1000, UTC).strftime(
                    "%Y-%m-%d %H:%M"
                ),
                "gates": {"true": "pass", "false": "FAIL"}.get(tags.get("gates_passed", ""), "-"),
                "test_accuracy": tags.get("metric.test_accuracy", ""),
                "test_macro_recall": tags.get("metric.test_macro_recall", ""),
                "pilot_images": tags.get("pilot_eval.images", ""),
                "pilot_accuracy": tags.get("pilot_eval.accuracy", ""),
                "onnx_sha256": tags.get("onnx_sha256", "")[:12],
                "train_run_id": tags.get("train_run_id", ""),
            }
        )
    moves = [m.to_dict() for m in registry.alias_history(client, name)][-history:] if history else []
    return {"model_name": name, "aliases": aliases, "versions": rows, "moves": moves}


def format_status(report: Mapping[str, Any]) -> str:
    """The status report as plain-text tables."""

    def table(rows: list[dict], columns: list[tuple[str, str]]) -> list[str]:
        cells = [[title for _, title in columns]]
        for row in rows:
            cells.append([_short(row.get(key, "")) for key, _ in columns])
        widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
        return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]

    lines = [
        f"registered model {report['model_name']}: "
        + (", ".join(f"@{a} = v{v}" for a, v in sorted(report["aliases"].items())) or "no aliases")
    ]
    if not report["versions"]:
        return lines[0] + "\nno versions yet: run the pipeline (dvc repro)"
    lines += [
        "",
        *table(
            report["versions"],
            [
                ("version", "version"),
                ("aliases", "aliases"),
                ("created", "created (UTC)"),
                ("gates", "gates"),
                ("test_accuracy", "test acc"),
                ("test_macro_recall", "test macro recall"),
                ("pilot_images", "pilot images"),
                ("pilot_accuracy", "pilot acc"),
                ("onnx_sha256", "onnx sha256"),
            ],
        ),
    ]
    if report["moves"]:
        lines += [
            "",
            "recent alias moves (oldest first):",
            *table(
                report["moves"],
                [
                    ("at", "at (UTC)"),
                    ("alias", "alias"),
                    ("previous", "from"),
                    ("version", "to"),
                    ("action", "action"),
                    ("by", "by"),
                    ("reason", "reason"),
                ],
            ),
        ]
    return "\n".join(lines)


def _short(value: Any) -> str:
    text = str(value)
    try:
        if "." in text and text.replace(".", "", 1).replace("-", "", 1).isdigit():
            return f"{float(text):.4f}"
    except ValueError:
        pass
    return text if len(text) <= 60 else text[:57] + "..."


# --------------------------------------------------------------------------- bundle
_redact = redact_uri  # cli.py and the bundle's model card


def card_info(client: Any, name: str, mv: Any, alias: str | None, folder: Path) -> dict[str, Any]:
    """What the bundle's model card and bundle.json say about a version, from its tags,
    its recorded alias moves and the training metadata it carries."""
    tags = dict(mv.tags or {})

    def group(prefix: str) -> dict[str, str]:
        return {k.removeprefix(prefix): v for k, v in sorted(tags.items()) if k.startswith(prefix)}

    gates: dict[str, dict[str, str]] = {}
    for key, value in group("gate.").items():
        gate, _, field = key.partition(".")
        gates.setdefault(gate, {})[field or "status"] = value
    meta: dict[str, Any] = {}
    files = registry.pytorch_files(folder)
    if files is not None:
        meta = json.loads((files / "model.json").read_text())
    keys = (
        "arch",
        "width",
        "method",
        "inter_method",
        "beta",
        "epochs",
        "selected_epoch",
        "selected_by",
        "seed",
    )
    training = {k: meta[k] for k in keys if meta.get(k) is not None}
    init = meta.get("init") or {}
    if init:
        # where the starting weights came from: scratch, ImageNet, a file or a registered model
        training["init"] = init.get("spec", "")
        training["init_source"] = init.get("source", "")
        if init.get("sha256"):
            training["init_sha256"] = init["sha256"]
    if meta.get("tuned"):
        training["tuned"] = meta["tuned"]
    aliases = sorted(a for a, v in registry.aliases_of(client, name).items() if v == str(mv.version))
    lineage_keys = ("git_commit", "git_dirty", *[k for k in tags if k.endswith("_run_id")])
    return {
        "model_name": name,
        "version": str(mv.version),
        "alias": alias or "",
        "aliases": aliases,
        "created_at": datetime.fromtimestamp(mv.creation_timestamp / 1000, UTC).strftime(
            "%Y-%m-%dT%H:%M:%SZ"
        ),
        "model_uri": f"models:/{name}/{mv.version}",
        "tracking_uri": _redact(client.tracking_uri),
        "description": mv.description or "",
        "gates_passed": tags.get("gates_passed", ""),
        "metrics": {k: float(v) for k, v in group("metric.").items()},
        "gates": gates,
        "pilot": group("pilot_eval.") or None,
        "data": {"manifest_sha256": tags.get("manifest_sha256", ""), "classes": tags.get("classes", "")},
        "training": training,
        "lineage": {**{k: tags[k] for k in lineage_keys if k in tags}, "dvc_lock": group("dvc_lock.")},
        "onnx": {
            "sha256": tags.get("onnx_sha256", ""),
            "opset": tags.get("onnx_opset", ""),
            "exporter": tags.get("onnx_exporter", ""),
            "parity_max_abs_diff": tags.get("parity_max_abs_diff", ""),
        },
        "alias_history": [
            m.to_dict() for m in registry.alias_history(client, name) if m.version == str(mv.version)
        ],
    }


def bundle(params: Params, out: Path, alias: str | None = "production", version: str | None = None) -> dict:
    """Write a deploy bundle (synermix.bundle) of the version holding ``alias`` (or ``version``)."""
    from synermix.bundle import MODEL_FILES, write_bundle

    client = client_for(params)
    name = params.registry.model_name
    if version is None:
        version = _holder(client, name, alias or "production", "version to bundle")
        label = f"{name}@{alias} (version {version})"
    else:
        alias, label = None, f"{name} version {version}"
    mv = registry.get_version(client, name, version)
    with tempfile.TemporaryDirectory() as tmp:
        folder = registry.download_version(client, name, str(version), Path(tmp))
        sources = {"model.onnx": folder / "model.onnx"}
        sources |= {
            n: folder / "extra_files" / n for n in MODEL_FILES[1:] if (folder / "extra_files" / n).is_file()
        }
        if not sources["model.onnx"].is_file():
            raise UserError(
                f"{label} holds no model.onnx: only versions from the register stage can be bundled"
            )
        info = card_info(client, name, mv, alias, folder)
        write_bundle(sources, out, info)
    log.info("bundle of %s written to %s (check it with: cd %s && sha256sum -c SHA256SUMS)", label, out, out)
    return {"out": str(out), "version": str(version), "alias": alias or "", "files": sorted(sources)}
