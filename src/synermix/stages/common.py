"""The few helpers two or more stages share: the usable rows of a split, reading a
stage's JSON, and linking the training run to the later stages' runs."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import pandas as pd
from mlflow.exceptions import MlflowException

from synermix.config import Params
from synermix.data.manifest import class_names, read_manifest, read_quarantine, usable_rows
from synermix.errors import CheckFailed, UserError
from synermix.paths import EVAL_METRICS, MANIFEST, MODEL_DIR, MODEL_JSON, MODEL_WEIGHTS, QUARANTINE_CSV
from synermix.tracking import client_for

log = logging.getLogger(__name__)


def train_val_rows(params: Params, root: Path) -> tuple[list[str], pd.DataFrame, pd.DataFrame, str]:
    """Class names, the usable train and val rows, and the manifest's sha256."""
    usable, manifest_sha = _usable(root)
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
    _check_defect_classes(params, names)
    train_rows = usable[usable["split"] == "train"]
    val_rows = usable[usable["split"] == "val"]
    if train_rows.empty or val_rows.empty:
        raise CheckFailed("the train or val split is empty; run prepare and validate first (dvc repro)")
    missing = sorted(set(names) - set(train_rows["label"]))
    if missing:
        raise CheckFailed(
            f"no training images for class(es) {', '.join(missing)}; add images or fix data.classes"
        )
    return names, train_rows, val_rows, manifest_sha


def _check_defect_classes(params: Params, names: list[str]) -> None:
    """decision.defect_classes against the data's classes, before tune and train spend an hour
    on a model whose evaluate would refuse them (evaluate checks again, against the model).
    A check only: it changes no output, so it is not a reason for DVC to re-run these stages."""
    wanted = params.defect_classes
    missing = [c for c in wanted if c not in names]
    if missing:
        raise UserError(
            f"decision.defect_classes names {', '.join(repr(c) for c in missing)}, not a class of the data "
            f"(classes: {', '.join(names)}): fix decision.defect_classes (an empty list switches line "
            "decisions off)"
        )
    if wanted and set(wanted) >= set(names):
        raise UserError(
            f"decision.defect_classes lists every class ({', '.join(names)}): at least one class must be "
            "a good part"
        )


def _usable(root: Path) -> tuple[pd.DataFrame, str]:
    """The manifest's rows that validate did not quarantine, and the manifest's sha256."""
    manifest_path = root / MANIFEST
    usable = usable_rows(read_manifest(manifest_path), read_quarantine(root / QUARANTINE_CSV))
    return usable, hashlib.sha256(manifest_path.read_bytes()).hexdigest()


def evaluation_rows(
    root: Path, class_names: list[str], trained_on: str | None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The usable val and test rows of the classes the model knows.

    Refuses a model trained on another manifest: its test images may have been in its
    training split, and any score would flatter it.
    """
    usable, current = _usable(root)
    if trained_on and trained_on != current:
        raise UserError(
            f"{MODEL_DIR} was trained on another manifest (sha256 {trained_on[:12]}, now {current[:12]}): "
            "its scores on this test split would not be held-out; retrain first (dvc repro)"
        )
    unknown = usable[~usable["label"].isin(class_names) & usable["split"].isin(["val", "test"])]
    if len(unknown):
        log.warning(
            "leaving out %d val/test image(s) of class(es) the model does not know: %s",
            len(unknown),
            ", ".join(sorted(set(unknown["label"]))),
        )
    known = usable[usable["label"].isin(class_names)]
    val_rows, test_rows = known[known["split"] == "val"], known[known["split"] == "test"]
    if test_rows.empty:
        raise CheckFailed(
            "the test split has no usable image; check data.split and rerun prepare (dvc repro)"
        )
    return val_rows, test_rows


def known_train_rows(root: Path, class_names: list[str]) -> pd.DataFrame:
    """The usable training rows of the classes the model knows (the unknown-part fit's images)."""
    usable, _ = _usable(root)
    return usable[(usable["split"] == "train") & usable["label"].isin(class_names)]


def model_identity(root: Path) -> dict[str, object]:
    """What an evaluation is of: the sha256 of models/model's weight file (its bytes, not
    what model.json says), of today's manifest, and the model's classes."""
    meta = json.loads((root / MODEL_JSON).read_text())
    return {
        "weights_sha256": hashlib.sha256((root / MODEL_WEIGHTS).read_bytes()).hexdigest(),
        "manifest_sha256": hashlib.sha256((root / MANIFEST).read_bytes()).hexdigest(),
        "class_names": list(meta["class_names"]),
    }


def check_evaluation_is_current(evaluation: dict, root: Path) -> None:
    """Refuse an evaluation of other weights, data or classes than models/model and
    today's manifest (e.g. stages run by hand with evaluate skipped): its verdict and
    figures would be another model's."""
    judged = evaluation.get("model")
    if not isinstance(judged, dict):
        raise UserError(f"{EVAL_METRICS} does not say which model it judged: rerun evaluate (dvc repro)")
    now = model_identity(root)
    for key, what in (
        ("weights_sha256", f"other weights than {MODEL_WEIGHTS}"),
        ("manifest_sha256", f"the model on another manifest than {MANIFEST}"),
        ("class_names", f"a model of other classes than {MODEL_DIR}"),
    ):
        if judged.get(key) != now[key]:
            shown = now[key][:12] if isinstance(now[key], str) else now[key]
            was = judged.get(key)
            was = was[:12] if isinstance(was, str) else was
            raise UserError(f"{EVAL_METRICS} judged {what} ({was}, now {shown}): rerun evaluate (dvc repro)")


def read_json(path: Path, stage: str) -> dict:
    """A stage's JSON output; a missing or unreadable one names the stage to rerun."""
    if not path.is_file():
        raise UserError(f"no {path}: run the {stage} stage first (dvc repro)")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not readable JSON ({exc}); rerun the {stage} stage (dvc repro)") from None


def tag_training_run(params: Params, meta: dict, tags: dict[str, str]) -> None:
    """Point the training run at a later stage's run (the registry follows these links)."""
    train_run = meta.get("mlflow_run_id")
    if not train_run:
        return
    try:
        client = client_for(params)
        for key, value in tags.items():
            client.set_tag(train_run, key, value)
    except MlflowException as exc:
        log.warning(
            "could not tag training run %s (%s): is MLflow the store it was trained in?", train_run, exc
        )
