"""Stage entry points shared by ``pipeline/*.py`` (run by DVC) and the ``synermix`` CLI.

Each ``run_*`` reads its own params section, calls the pure work function and writes
exactly the outputs that dvc.yaml declares. Paths are relative to the project root.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from synermix.config import Params
from synermix.data.manifest import MANIFEST_NAME, class_names, read_manifest, read_quarantine, usable_rows
from synermix.data.prepare import prepare_dataset, write_summary
from synermix.errors import CheckFailed

log = logging.getLogger(__name__)

PREPARED_DIR = Path("data/prepared")
PREPARE_SUMMARY = Path("reports/prepare.json")
VALIDATION_JSON = Path("reports/validation.json")
VALIDATION_MD = Path("reports/validation.md")
QUARANTINE_CSV = Path("data/validated/quarantine.csv")
MODEL_DIR = Path("models/model")
TRAIN_CHECKPOINT = Path("checkpoints/train/last.pt")
TRAIN_HISTORY = Path("reports/train_history.csv")
TRAIN_METRICS = Path("reports/train.json")


def run_prepare(params: Params, root: Path = Path(".")) -> dict:
    data = params.data
    result = prepare_dataset(
        data.source_spec,
        root / PREPARED_DIR,
        seed=params.seed,
        split=data.split.as_dict(),
        image_size=data.image_size,
        max_per_class=data.max_per_class,
        max_pixels=data.max_pixels,
    )
    write_summary(result.summary, root / PREPARE_SUMMARY)
    s = result.summary
    log.info(
        "prepared %d images (%d undecodable) in %d classes: train %d, val %d, test %d",
        s["images"],
        s["undecodable"],
        s["classes"],
        *(s["per_split"][k] for k in ("train", "val", "test")),
    )
    return s


def run_validate(params: Params, root: Path = Path(".")):
    from synermix.data.validation import render_markdown, validate_manifest

    manifest = read_manifest(root / PREPARED_DIR / MANIFEST_NAME)
    report = validate_manifest(manifest, params.validate_params, params.data.classes)
    for path in (VALIDATION_JSON, VALIDATION_MD, QUARANTINE_CSV):
        (root / path).parent.mkdir(parents=True, exist_ok=True)
    (root / VALIDATION_JSON).write_text(json.dumps(report.to_dict(), indent=2, default=str) + "\n")
    (root / VALIDATION_MD).write_text(render_markdown(report))
    report.quarantine.to_csv(root / QUARANTINE_CSV, index=False, lineterminator="\n")
    for r in report.results:
        if r.status in ("warning", "quarantined"):
            log.warning("validation rule '%s' %s: %s", r.rule, r.status, r.observed)
    if not report.passed:
        raise CheckFailed(report.failure_message() + f"\nfull report: {root / VALIDATION_MD}")
    log.info(
        "validation passed: %d of %d images usable, %d quarantined; report in %s",
        report.usable_images,
        report.images,
        len(report.quarantine),
        VALIDATION_MD,
    )
    return report


def run_train(params: Params, root: Path = Path(".")) -> dict:
    """Train on the usable train split, validate on val, log to MLflow, write the model."""
    import mlflow
    import pandas as pd

    from synermix.tracking import flatten, mlflow_run
    from synermix.training import save_trained_model, train_model

    manifest_path = root / PREPARED_DIR / MANIFEST_NAME
    manifest = read_manifest(manifest_path)
    usable = usable_rows(manifest, read_quarantine(root / QUARANTINE_CSV))
    names = class_names(usable, params.data.classes)
    undeclared = usable[~usable["label"].isin(names)]
    if len(undeclared):
        # only reachable with validate.rules.declared_labels at warning/off: the declared
        # list then acts as a filter, and says so
        log.warning(
            "leaving out %d image(s) of class(es) not in data.classes: %s",
            len(undeclared),
            ", ".join(sorted(set(undeclared["label"]))),
        )
        usable = usable[usable["label"].isin(names)]
    train_rows = usable[usable["split"] == "train"]
    val_rows = usable[usable["split"] == "val"]
    if train_rows.empty or val_rows.empty:
        raise CheckFailed("the train or val split is empty; run prepare and validate first (dvc repro)")
    missing = sorted(set(names) - set(train_rows["label"]))
    if missing:
        raise CheckFailed(
            f"no training images for class(es) {', '.join(missing)}; add images or fix data.classes"
        )
    manifest_sha = hashlib.sha256(manifest_path.read_bytes()).hexdigest()

    with mlflow_run(params.mlflow, "train", {"stage": "train", "manifest_sha256": manifest_sha}) as run:
        mlflow.log_params(flatten({"seed": params.seed, "train": params.train.model_dump(mode="json")}))
        mlflow.log_params(
            {
                "data.source": params.data.source,
                "data.train_images": len(train_rows),
                "data.val_images": len(val_rows),
                "data.classes": ",".join(names),
            }
        )

        def log_epoch(row: dict) -> None:
            mlflow.log_metrics({k: float(v) for k, v in row.items() if k != "epoch"}, step=int(row["epoch"]))

        result = train_model(
            train_rows,
            val_rows,
            root / PREPARED_DIR,
            names,
            params.train,
            params.seed,
            checkpoint_path=root / TRAIN_CHECKPOINT,
            on_epoch_end=log_epoch,
        )
        meta = save_trained_model(
            result,
            params.train,
            root / MODEL_DIR,
            {
                "mlflow_run_id": run.info.run_id,
                "manifest_sha256": manifest_sha,
                "seed": params.seed,
                # prepare may already have resized (data.image_size) before the model's own
                # resize; inference from raw photos must repeat both steps to match training
                "prepare_image_size": params.data.image_size,
            },
        )
        history = pd.DataFrame(result.history)
        (root / TRAIN_HISTORY).parent.mkdir(parents=True, exist_ok=True)
        history.to_csv(root / TRAIN_HISTORY, index=False, lineterminator="\n", float_format="%.6g")
        final = result.final
        majority = float(val_rows["label"].value_counts(normalize=True).max())
        metrics = {
            "val_accuracy": round(final["val_accuracy"], 6),
            "val_macro_recall": round(final["val_macro_recall"], 6),
            "val_loss": round(final["val_loss"], 6),
            "val_majority_rate": round(majority, 6),
            "epochs": len(result.history),
            "resumed_from_epoch": result.resumed_from_epoch,
        }
        (root / TRAIN_METRICS).write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
        mlflow.log_metrics({"final_val_accuracy": final["val_accuracy"], "val_majority_rate": majority})
        mlflow.log_artifacts(str(root / MODEL_DIR), artifact_path="model")
        mlflow.log_artifact(str(root / TRAIN_HISTORY))
        mlflow.set_tags({"weights_sha256": meta["weights_sha256"], "arch": meta["arch"]})
    log.info(
        "trained %s: val accuracy %.4f (majority class %.4f), macro recall %.4f; model in %s",
        meta["arch"],
        final["val_accuracy"],
        majority,
        final["val_macro_recall"],
        MODEL_DIR,
    )
    return metrics
