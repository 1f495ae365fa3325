"""The validate stage: Great Expectations on the manifest -> the quarantine list and reports."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import mlflow

from synermix.config import Params
from synermix.data.manifest import read_manifest
from synermix.data.samples import pick_samples, usable_images, write_sample_grid
from synermix.data.validation import render_markdown, validate_manifest
from synermix.errors import CheckFailed
from synermix.paths import (
    MANIFEST,
    PREPARED_DIR,
    QUARANTINE_CSV,
    VALIDATION_JSON,
    VALIDATION_MD,
    VALIDATION_SAMPLES,
)
from synermix.tracking import flatten, mlflow_run

log = logging.getLogger(__name__)


def run_validate(params: Params, root: Path = Path(".")):
    """Check the manifest; write the reports and the quarantine list; fail on a failed rule."""
    manifest = read_manifest(root / MANIFEST)
    report = validate_manifest(manifest, params.validate_params, params.data.classes)
    for path in (VALIDATION_JSON, VALIDATION_MD, QUARANTINE_CSV):
        (root / path).parent.mkdir(parents=True, exist_ok=True)
    (root / VALIDATION_JSON).write_text(json.dumps(report.to_dict(), indent=2, default=str) + "\n")
    usable = usable_images(manifest, set(report.quarantine["source_path"]))
    counts = usable["label"].value_counts().to_dict()
    write_sample_grid(pick_samples(usable), root / PREPARED_DIR, counts, root / VALIDATION_SAMPLES)
    link = VALIDATION_SAMPLES.relative_to(VALIDATION_MD.parent)
    grid = f"\n## Samples per class\n\n![samples per class]({link})\n"
    (root / VALIDATION_MD).write_text(render_markdown(report) + grid)
    report.quarantine.to_csv(root / QUARANTINE_CSV, index=False, lineterminator="\n")
    _log_validation(params, root, report)
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


def _log_validation(params: Params, root: Path, report) -> None:
    """The validate run: rule settings, the verdict and counts, and the three reports."""
    with mlflow_run(params, "validate", root, {"validation_passed": str(report.passed).lower()}):
        mlflow.log_params(flatten({"validate": params.validate_params.model_dump(mode="json")}))
        counts = {"images": report.images, "usable_images": report.usable_images}
        counts["quarantined"] = len(report.quarantine)
        counts["validation_passed"] = int(report.passed)
        mlflow.log_metrics({k: float(v) for k, v in counts.items()})
        for path in (VALIDATION_MD, VALIDATION_JSON, QUARANTINE_CSV, VALIDATION_SAMPLES):
            mlflow.log_artifact(str(root / path), artifact_path="validation")
