"""The validate stage's work: Great Expectations suites over the image manifest.

GX checks tables, so the per-image facts (decodable, mode, size, grey-level mean and
std, content hash) are columns of the manifest written by prepare, and the dataset-level
facts (images per class and split, class imbalance, hashes shared across classes or
splits) are derived tables built here. Each rule of ``validate.rules`` is one entry of
:data:`synermix.data.validation_rules.RULES`: the GX expectations it runs and how its
results read. :func:`validate_manifest` runs them, one GX suite per rule, and gathers each
into a :class:`RuleResult` with the observed value and the offending files.

Image rules (decodable, allowed_modes, size_limits, exposure) judge single files. With
``validate.on_bad_images: quarantine`` the files failing an image rule of severity
``error`` are listed in the quarantine table and left out of the dataset rules and of
every later stage instead of failing the run; nothing is deleted. Dataset rules
(declared_labels, min_per_class, class_imbalance, split_leakage, conflicting_labels,
duplicates) then run on the rows that remain.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from types import ModuleType
from typing import Any

import pandas as pd

from synermix.config import ValidateParams
from synermix.data.manifest import QUARANTINE_COLUMNS
from synermix.data.splits import SPLITS
from synermix.data.validation_rules import RULES, Check, Tables, ValidationRule

log = logging.getLogger(__name__)

IMAGE_RULES = tuple(r.name for r in RULES if r.scope == "image")
DATASET_RULES = tuple(r.name for r in RULES if r.scope == "dataset")


@dataclass
class RuleResult:
    """The outcome of one rule. ``status``: passed, failed, warning, quarantined or off."""

    rule: str
    scope: str
    severity: str
    status: str
    threshold: str
    observed: Any
    unexpected_count: int = 0
    offending: list[dict[str, str]] = field(default_factory=list)
    fix: str = ""

    @property
    def blocking(self) -> bool:
        return self.status == "failed"


@dataclass
class ValidationReport:
    results: list[RuleResult]
    quarantine: pd.DataFrame
    images: int
    usable_images: int
    class_counts: pd.DataFrame
    on_bad_images: str

    @property
    def passed(self) -> bool:
        return not any(r.blocking for r in self.results)

    def result(self, rule: str) -> RuleResult:
        return next(r for r in self.results if r.rule == rule)

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "on_bad_images": self.on_bad_images,
            "images": self.images,
            "usable_images": self.usable_images,
            "quarantined": len(self.quarantine),
            "class_counts": {
                label: {s: int(row[s]) for s in SPLITS}
                for label, row in self.class_counts.set_index("label").iterrows()
            },
            "rules": {r.rule: {k: v for k, v in asdict(r).items() if k != "rule"} for r in self.results},
        }

    def failure_message(self, max_files: int = 5) -> str:
        """Several lines: each failing rule, its observation and the first offending files."""
        lines = []
        for r in self.results:
            if not r.blocking:
                continue
            files = ", ".join(o["file"] for o in r.offending[:max_files])
            more = f" (+{r.unexpected_count - max_files} more)" if r.unexpected_count > max_files else ""
            lines.append(f"validation rule '{r.rule}' failed: {r.observed}; {r.fix}")
            if files:
                lines.append(f"  offending: {files}{more}")
        return "\n".join(lines)


# --------------------------------------------------------------------------- GX plumbing
class _GX:
    """A throw-away ephemeral GX context with one pandas data source."""

    def __init__(self) -> None:
        os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
        import great_expectations as gx
        from great_expectations.data_context.types.base import ProgressBarsConfig

        # GX pins some of its module loggers to INFO; keep its chatter out of stage logs
        for name in ("great_expectations", "great_expectations.data_context.types.base"):
            logging.getLogger(name).setLevel(logging.WARNING)
        self.gx = gx
        self.context = gx.get_context(mode="ephemeral")
        self.context.variables.progress_bars = ProgressBarsConfig(globally=False)
        self.source = self.context.data_sources.add_pandas("synermix")
        self._n = 0

    def validate(self, frame: pd.DataFrame, expectations: list, index_columns: list[str]):
        """Run ``expectations`` on ``frame``; return the GX results in the same order."""
        if not expectations:
            return []
        self._n += 1
        asset = self.source.add_dataframe_asset(f"table{self._n}")
        batch = asset.add_batch_definition_whole_dataframe("all").get_batch(
            batch_parameters={"dataframe": frame.reset_index(drop=True)}
        )
        suite = self.context.suites.add(self.gx.ExpectationSuite(name=f"suite{self._n}"))
        for expectation in expectations:
            suite.add_expectation(expectation)
        result = batch.validate(
            suite,
            result_format={"result_format": "COMPLETE", "unexpected_index_column_names": index_columns},
        )
        by_id = {r.expectation_config.id: r for r in result.results}
        return [by_id[e.id] for e in suite.expectations]


# --------------------------------------------------------------------------- derived tables
def image_table(manifest: pd.DataFrame) -> pd.DataFrame:
    """Per-image table: the manifest plus the columns the image and hash rules look at."""
    table = manifest.copy()
    table["min_side"] = table[["width", "height"]].min(axis=1)
    table["max_side"] = table[["width", "height"]].max(axis=1)
    return table


def hash_table(rows: pd.DataFrame) -> pd.DataFrame:
    """Per-image counts of labels, splits and same-class copies sharing its content hash."""
    table = rows[["source_path", "label", "split", "content_sha256"]].copy()
    grouped = table.groupby("content_sha256")
    table["labels_for_content"] = grouped["label"].transform("nunique")
    table["splits_for_content"] = grouped["split"].transform("nunique")
    table["copies_in_class"] = table.groupby(["content_sha256", "label"])["label"].transform("size")
    return table


def class_count_table(rows: pd.DataFrame, labels: Sequence[str]) -> pd.DataFrame:
    """Images of ``rows`` per class and split; every class of ``labels`` appears (zeros
    for a declared class without images, or one whose images were all quarantined)."""
    labels = sorted(set(rows["label"]) | set(labels))
    counts = pd.crosstab(rows["label"], rows["split"]).reindex(
        index=labels, columns=list(SPLITS), fill_value=0
    )
    counts = counts.fillna(0).astype(int)
    counts["total"] = counts[list(SPLITS)].sum(axis=1)
    smallest = counts["total"].min() if len(counts) else 0
    counts["ratio_to_smallest"] = [(t / smallest if smallest else math.inf) for t in counts["total"]]
    counts.index.name = "label"
    return counts.reset_index()


# --------------------------------------------------------------------------- running the rules
def validate_manifest(
    manifest: pd.DataFrame,
    params: ValidateParams,
    declared_classes: Sequence[str] = (),
) -> ValidationReport:
    """Run every rule of ``params.rules`` over ``manifest``; never raises on bad data.

    The image rules run first; the files they quarantine are left out of the tables the
    dataset rules run on. Results list the image rules, the quarantine limit (when
    broken), then the dataset rules, each scope in the order of :data:`RULES`.
    """
    import great_expectations.expectations as gxe

    gx = _GX()
    images = image_table(manifest)
    tables = Tables(
        images=images, decoded=images[images["decodable"]], declared_classes=tuple(declared_classes)
    )

    image_rules = [rule for rule in RULES if rule.scope == "image"]
    image_checks = [_run_rule(rule, params, tables, gx, gxe) for rule in image_rules]
    results = [result for result, _ in image_checks]
    quarantined = [
        (rule, keys)
        for rule, (result, keys) in zip(image_rules, image_checks, strict=True)
        if result.status == "quarantined"
    ]
    quarantine = _quarantine_table(images, quarantined)
    kept = tables.decoded[~tables.decoded["source_path"].isin(set(quarantine["source_path"]))]
    kept = kept[kept["split"] != ""]
    if params.on_bad_images == "quarantine":
        results += _quarantine_limit(params, len(quarantine), len(images))

    counts = class_count_table(kept, [*declared_classes, *images["label"]])
    tables = replace(tables, kept=kept, counts=counts, hashes=hash_table(kept))
    results += [_run_rule(rule, params, tables, gx, gxe)[0] for rule in RULES if rule.scope == "dataset"]
    return ValidationReport(
        results=results,
        quarantine=quarantine,
        images=len(images),
        usable_images=len(kept),
        class_counts=counts[["label", *SPLITS, "total"]],
        on_bad_images=params.on_bad_images,
    )


def _run_rule(
    rule: ValidationRule, params: ValidateParams, tables: Tables, gx: _GX, gxe: ModuleType
) -> tuple[RuleResult, list[str]]:
    """One rule's result, and every key it found (the result lists at most max_listed_files)."""
    settings = getattr(params.rules, rule.name)
    why_off = "severity is 'off'" if settings.severity == "off" else rule.why_not_applicable(tables)
    if why_off:
        return RuleResult(rule.name, rule.scope, "off", "off", "", why_off), []
    table = getattr(tables, rule.table)
    gx_results = gx.validate(table, rule.expectations(gxe, settings, tables), [rule.index])
    finding = rule.observe(Check(rule, settings, tables, table, gx_results))
    if not finding.keys:
        status = "passed"
    elif settings.severity == "warning":
        status = "warning"
    elif rule.scope == "image" and params.on_bad_images == "quarantine":
        status = "quarantined"
    else:
        status = "failed"
    result = RuleResult(
        rule.name,
        rule.scope,
        settings.severity,
        status,
        rule.description(settings, tables),
        finding.observed,
        len(finding.keys),
        finding.offending[: params.max_listed_files],
        rule.fix,
    )
    return result, finding.keys


def _quarantine_limit(params: ValidateParams, quarantined: int, images: int) -> list[RuleResult]:
    """A failed ``quarantine_limit`` when more than ``max_quarantined_fraction`` is bad, else none."""
    fraction = quarantined / max(1, images)
    if fraction <= params.max_quarantined_fraction:
        return []
    return [
        RuleResult(
            "quarantine_limit",
            "dataset",
            "error",
            "failed",
            f"at most {params.max_quarantined_fraction:.1%} of images quarantined",
            f"{quarantined} of {images} images ({fraction:.1%}) quarantined",
            quarantined,
            [],
            "too many bad images for a quarantine: look at the source "
            "(camera, export settings) or raise validate.max_quarantined_fraction",
        )
    ]


def _quarantine_table(images: pd.DataFrame, bad: list[tuple[ValidationRule, list[str]]]) -> pd.DataFrame:
    """One row per quarantined file, naming every image rule it broke and why."""
    indexed = images.drop_duplicates("source_path").set_index("source_path", drop=False)
    per_file: dict[str, list[ValidationRule]] = {}
    for rule, keys in bad:
        for key in keys:
            per_file.setdefault(key, []).append(rule)
    rows = []
    for key, broken in sorted(per_file.items()):
        row = indexed.loc[key]
        rows.append(
            {
                "source_path": key,
                "label": str(row["label"]),
                "split": str(row["split"]),
                "rules": ";".join(rule.name for rule in broken),
                "reasons": "; ".join(rule.reason(row) for rule in broken),
            }
        )
    return pd.DataFrame(rows, columns=list(QUARANTINE_COLUMNS))


# --------------------------------------------------------------------------- reports
_STATUS_MARK = {
    "passed": "PASS",
    "failed": "FAIL",
    "warning": "WARN",
    "quarantined": "QUARANTINED",
    "off": "off",
}


def render_markdown(report: ValidationReport) -> str:
    """A report a person can read: verdict, class counts, each rule, offending files."""
    verdict = "PASSED" if report.passed else "FAILED"
    lines = [
        "# Data validation report",
        "",
        f"**Verdict: {verdict}**: {report.images} images in the manifest, "
        f"{report.usable_images} usable downstream, {len(report.quarantine)} quarantined "
        f"(on_bad_images: {report.on_bad_images}). Checked with Great Expectations.",
        "",
        "## Images per class and split",
        "",
        "| class | " + " | ".join(SPLITS) + " | total |",
        "|---|" + "---:|" * (len(SPLITS) + 1),
    ]
    for _, row in report.class_counts.iterrows():
        lines.append(
            f"| {row['label']} | "
            + " | ".join(str(int(row[s])) for s in SPLITS)
            + f" | {int(row['total'])} |"
        )
    lines += [
        "",
        "## Rules",
        "",
        "| rule | severity | result | expected | observed |",
        "|---|---|---|---|---|",
    ]
    for r in report.results:
        lines.append(f"| {r.rule} | {r.severity} | {_STATUS_MARK[r.status]} | {r.threshold} | {r.observed} |")
    for r in report.results:
        if r.status in ("passed", "off"):
            continue
        lines += ["", f"### {r.rule}: {_STATUS_MARK[r.status]}", "", f"Fix: {r.fix}", ""]
        lines += [f"- `{o['file']}` ({o['label']}): {o['reason']}" for o in r.offending]
        if r.unexpected_count > len(r.offending):
            lines.append(
                f"- ... and {r.unexpected_count - len(r.offending)} more (validate.max_listed_files)"
            )
    if len(report.quarantine):
        lines += ["", "## Quarantined files", "", "Left out of every later stage; nothing was deleted.", ""]
        lines += [f"- `{q.source_path}` ({q.label}): {q.reasons}" for q in report.quarantine.itertuples()]
    return "\n".join(lines) + "\n"
