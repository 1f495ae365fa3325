"""The prepare stage: photos -> data/prepared (images, manifest.csv) + reports/prepare.json."""

from __future__ import annotations

import logging
from pathlib import Path

import mlflow
import pandas as pd

from synermix.config import Params
from synermix.data.prepare import prepare_dataset, write_summary
from synermix.paths import MANIFEST, PREPARE_SUMMARY, PREPARED_DIR
from synermix.tracking import flatten, log_manifest_input, mlflow_run

log = logging.getLogger(__name__)


def run_prepare(params: Params, root: Path = Path(".")) -> dict:
    """data.source -> the prepared images and manifest, the summary, and an MLflow run."""
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
    _log_prepare(params, root, s)
    log.info(
        "prepared %d images (%d undecodable) in %d classes: train %d, val %d, test %d",
        s["images"],
        s["undecodable"],
        s["classes"],
        *(s["per_split"][k] for k in ("train", "val", "test")),
    )
    return s


def _log_prepare(params: Params, root: Path, summary: dict) -> None:
    """The prepare run: data params, image counts, the summary and the manifest itself."""
    with mlflow_run(params, "prepare", root):
        mlflow.log_params(flatten({"seed": params.seed, "data": params.data.model_dump(mode="json")}))
        counts = {"images": summary["images"], "undecodable": summary["undecodable"]}
        counts |= {f"images_{k}": v for k, v in summary["per_split"].items()}
        mlflow.log_metrics({k: float(v) for k, v in counts.items()})
        mlflow.log_artifact(str(root / PREPARE_SUMMARY))
        mlflow.log_artifact(str(root / MANIFEST))
        log_manifest_input(pd.read_csv(root / MANIFEST), root / MANIFEST, "prepared")
