"""Pilot-line evidence: ``synermix pilot-eval`` scores the pilot version (and today's
production version, on the same images) on labelled photos collected at the pilot line,
records the result on the version as ``pilot_eval.*`` tags (:mod:`synermix.model_tags`)
and as an MLflow run. The production gates (:func:`synermix.gates.production_checks`)
read that evidence."""

from __future__ import annotations

import hashlib
import json
import math
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd

from synermix import evidence, model_tags, registry
from synermix.config import Params
from synermix.data.images import IMAGE_EXTENSIONS
from synermix.decision import decision_rates, rate_metrics
from synermix.errors import UserError
from synermix.inference import DEFAULT_MAX_PIXELS, Classifier, image_files, read_files
from synermix.metrics import classification_scores, confusion_matrix, mcnemar_exact
from synermix.model_source import version_file
from synermix.rollout import holder
from synermix.tracking import client_for, experiment_id, git_state, tracking_uri, using_store


def labelled_images(folder: Path, class_names: list[str]) -> list[tuple[Path, str]]:
    """``<class>/<image>`` files under ``folder``; refuses unknown classes and loose images."""
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
    ok = [i for i, r in enumerate(results) if r.status != "error"]
    y_true = np.asarray([class_names.index(labels[i]) for i in ok], dtype=np.int64)
    y_pred = np.asarray([class_names.index(results[i].label) for i in ok], dtype=np.int64)
    scores = classification_scores(confusion_matrix(y_true, y_pred, len(class_names)))
    return scores, y_true == y_pred


def _decision_rates(classifier: Classifier, results, labels: list[str]) -> dict[str, Any]:
    """The line's rates at the operating point stored in the model (what serve applies):
    escape, overkill, review, unknown; a note when the model has none."""
    point = classifier.info.operating_point
    ok = [i for i, r in enumerate(results) if r.status != "error"]
    out: dict[str, Any] = {}
    if point is None:
        out["decision_note"] = "the model has no operating point: no escape / overkill / review rates"
    else:
        y = np.asarray([classifier.class_names.index(labels[i]) for i in ok], dtype=np.int64)
        rates = decision_rates(point, [results[i].decision for i in ok], y)
        out |= {k: v for k, v in rate_metrics(rates).items() if not k.endswith("ci95_high")}
        out["decisions"] = {
            kind: {k: rates[kind][k] for k in ("rate", "count", "of", "ci95_low", "ci95_high")}
            for kind in ("escape", "overkill", "review", "unknown")
        }
    return out


def pilot_eval(
    params: Params,
    images: Path,
    version: str | None = None,
    by: str | None = None,
    batch_size: int = 32,
    provider: str = "auto",
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> dict:
    """Score the pilot version (and today's production version) on labelled pilot images;
    record the result on the version and as an MLflow run."""
    client = client_for(params)
    name = params.registry.model_name
    if version is None:  # following @pilot: only a recorded move to a version with its evidence
        version = evidence.checked_alias(
            client, name, "pilot", holder(client, name, "pilot", "pilot version to evaluate")
        )
    registry.get_version(client, name, version)
    production = registry.aliases_of(client, name).get("production")
    if production is not None:
        # the comparison is part of the evidence: it must be against a production that holds up
        evidence.checked_alias(client, name, "production", production)
    with tempfile.TemporaryDirectory() as tmp:
        pilot_path = version_file(client, name, version, Path(tmp) / "pilot")
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
        decided = _decision_rates(classifier, results, labels)
        summary: dict[str, Any] = {
            "model_name": name,
            "version": str(version),
            "folder": str(images.resolve()),
            "images": int(scores["images"]),
            "errors": len(errors),
            "provider": classifier.provider,
            **{k: scores[k] for k in ("accuracy", "macro_recall", "macro_f1", "recall_min")},
            "per_class_recall": dict(zip(class_names, scores["per_class"]["recall"], strict=True)),
            **decided,
            "images_sha256": _evidence_hash(files),
            "production_version": "",
        }
        if production and production != str(version):
            prod_path = version_file(client, name, production, Path(tmp) / "production")
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
    summary["run_id"] = _log_pilot_run(params, client, summary, table)
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
    if summary.get("decisions"):
        lines.append(
            "  at its operating point: "
            + ", ".join(
                f"{kind} {r['rate']:.4f} ({r['count']}/{r['of']})" for kind, r in summary["decisions"].items()
            )
        )
    elif summary.get("decision_note"):
        lines.append(f"  {summary['decision_note']}")
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


def _log_pilot_run(params: Params, client: Any, summary: dict, table) -> str:
    uri = tracking_uri(params.mlflow)
    experiment = experiment_id(client, params.mlflow)
    tags = {
        **git_state(),
        "stage": "pilot-eval",
        "synermix_role": "pilot-eval",
        "model_name": summary["model_name"],
        "model_version": summary["version"],
        "by": summary["by"],
    }
    with (
        using_store(uri),
        mlflow.start_run(
            experiment_id=experiment, run_name=f"pilot-eval v{summary['version']}", tags=tags
        ) as run,
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
    stale = [
        k
        for k in dict(client.get_model_version(name, version).tags or {})
        if k.startswith(model_tags.PILOT_PREFIX)
    ]
    for key in stale:  # a new evaluation replaces the old one whole (its run keeps it)
        client.delete_model_version_tag(name, version, key)
    for key in model_tags.PILOT_KEYS:
        if key in summary and summary[key] is not None:
            client.set_model_version_tag(
                name, version, model_tags.pilot(key), model_tags.pilot_value(summary[key])
            )
