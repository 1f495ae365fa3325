"""Stage entry points shared by ``pipeline/*.py`` (run by DVC) and the ``synermix`` CLI.

Each ``run_*`` reads its own params section, calls the pure work function and writes
exactly the outputs that dvc.yaml declares. Paths are relative to the project root.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from synermix.config import Params
from synermix.data.manifest import MANIFEST_NAME, read_manifest
from synermix.data.prepare import prepare_dataset, write_summary
from synermix.errors import CheckFailed

log = logging.getLogger(__name__)

PREPARED_DIR = Path("data/prepared")
PREPARE_SUMMARY = Path("reports/prepare.json")
VALIDATION_JSON = Path("reports/validation.json")
VALIDATION_MD = Path("reports/validation.md")
QUARANTINE_CSV = Path("data/validated/quarantine.csv")


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
