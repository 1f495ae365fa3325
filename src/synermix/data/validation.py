"""The validate stage's work: Great Expectations suites over the image manifest.

GX checks tables, so the per-image facts (decodable, mode, size, grey-level mean and
std, content hash) are columns of the manifest written by prepare, and the dataset-level
facts (images per class and split, class imbalance, hashes shared across classes or
splits) are derived tables built here. Each rule of ``validate.rules`` becomes one or two
GX expectations; their results are gathered per rule into :class:`RuleResult` with the
observed value and the offending files.

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
from dataclasses import asdict, dataclass, field
from typing import Any

import pandas as pd

from synermix.config import ValidateParams
from synermix.data.manifest import QUARANTINE_COLUMNS
from synermix.data.splits import SPLITS

log = logging.getLogger(__name__)

IMAGE_RULES = ("decodable", "allowed_modes", "size_limits", "exposure")
DATASET_RULES = (
    "declared_labels",
    "min_per_class",
    "class_imbalance",
    "split_leakage",
    "conflicting_labels",
    "duplicates",
)


#: Why a file breaks an image rule, as shown in reports and the quarantine table.
IMAGE_REASONS = {
    "decodable": lambda row: str(row["error"]),
    "allowed_modes": lambda row: f"mode {row['mode']}",
    "size_limits": lambda row: f"{row['width']}x{row['height']} px",
    "exposure": lambda row: f"mean {row['mean_intensity']:.1f}, std {row['std_intensity']:.1f}",
}


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


def _unexpected(results, column: str) -> list[str]:
    keys: list[str] = []
    for res in results:
        for entry in res.result.get("unexpected_index_list") or []:
            value = str(entry[column])
            if value not in keys:
                keys.append(value)
    return keys


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


# --------------------------------------------------------------------------- the rules
def _file_entries(table: pd.DataFrame, keys: list[str], reason) -> list[dict[str, str]]:
    indexed = table.set_index("source_path", drop=False)
    entries = []
    for key in keys:
        row = indexed.loc[key]
        if isinstance(row, pd.DataFrame):
            row = row.iloc[0]
        entries.append({"file": key, "label": str(row["label"]), "reason": reason(row)})
    return entries


def validate_manifest(
    manifest: pd.DataFrame,
    params: ValidateParams,
    declared_classes: Sequence[str] = (),
) -> ValidationReport:
    """Run every rule of ``params.rules`` over ``manifest``; never raises on bad data."""
    import great_expectations.expectations as gxe

    rules = params.rules
    limit = params.max_listed_files
    gx = _GX()
    results: list[RuleResult] = []
    images = image_table(manifest)
    decoded = images[images["decodable"]]

    def finish(name, scope, threshold, fix, keys, observed, entries) -> RuleResult:
        severity = getattr(rules, name).severity
        if not keys:
            status = "passed"
        elif severity == "warning":
            status = "warning"
        elif scope == "image" and params.on_bad_images == "quarantine":
            status = "quarantined"
        else:
            status = "failed"
        result = RuleResult(
            name, scope, severity, status, threshold, observed, len(keys), entries[:limit], fix
        )
        results.append(result)
        return result

    def off(name, scope, why="severity is 'off'"):
        results.append(RuleResult(name, scope, "off", "off", "", why))

    # ---- image rules ---------------------------------------------------------------
    image_checks: dict[str, tuple[pd.DataFrame, list]] = {}
    if rules.decodable.severity != "off":
        image_checks["decodable"] = (
            images,
            [gxe.ExpectColumnValuesToBeInSet(column="decodable", value_set=[True])],
        )
    if rules.allowed_modes.severity != "off":
        image_checks["allowed_modes"] = (
            decoded,
            [gxe.ExpectColumnValuesToBeInSet(column="mode", value_set=list(rules.allowed_modes.modes))],
        )
    if rules.size_limits.severity != "off":
        s = rules.size_limits
        image_checks["size_limits"] = (
            decoded,
            [
                gxe.ExpectColumnValuesToBeBetween(column="min_side", min_value=s.min_side),
                gxe.ExpectColumnValuesToBeBetween(column="max_side", max_value=s.max_side),
            ],
        )
    if rules.exposure.severity != "off":
        e = rules.exposure
        image_checks["exposure"] = (
            decoded,
            [
                gxe.ExpectColumnValuesToBeBetween(
                    column="mean_intensity", min_value=e.min_mean, max_value=e.max_mean
                ),
                gxe.ExpectColumnValuesToBeBetween(column="std_intensity", min_value=e.min_std),
            ],
        )
    image_meta = {
        "decodable": (
            "every file decodes",
            "replace or remove these files in the source, or set validate.on_bad_images: quarantine",
        ),
        "allowed_modes": (
            f"mode in {', '.join(rules.allowed_modes.modes)}",
            "convert these images, or add their mode to validate.rules.allowed_modes.modes "
            "(prepare then converts them to L or RGB)",
        ),
        "size_limits": (
            f"{rules.size_limits.min_side} <= each side <= {rules.size_limits.max_side} px",
            "remove these images or change validate.rules.size_limits",
        ),
        "exposure": (
            f"{rules.exposure.min_mean} <= mean grey <= {rules.exposure.max_mean}, "
            f"std >= {rules.exposure.min_std}",
            "blank or saturated frames (a camera fault?): remove them, or adjust validate.rules.exposure",
        ),
    }
    bad_image_keys: dict[str, list[str]] = {}
    for name in IMAGE_RULES:
        if name not in image_checks:
            off(name, "image")
            continue
        table, expectations = image_checks[name]
        gx_results = gx.validate(table, expectations, ["source_path"])
        keys = _unexpected(gx_results, "source_path")
        threshold, fix = image_meta[name]
        observed = f"{len(keys)} of {len(table)} images"
        entries = _file_entries(table, keys, IMAGE_REASONS[name])
        result = finish(name, "image", threshold, fix, keys, observed, entries)
        if result.status == "quarantined":
            bad_image_keys[name] = keys

    # ---- quarantine ----------------------------------------------------------------
    quarantine = _quarantine_table(images, bad_image_keys)
    kept = decoded[~decoded["source_path"].isin(set(quarantine["source_path"]))]
    kept = kept[kept["split"] != ""]
    if params.on_bad_images == "quarantine":
        fraction = len(quarantine) / max(1, len(images))
        if fraction > params.max_quarantined_fraction:
            results.append(
                RuleResult(
                    "quarantine_limit",
                    "dataset",
                    "error",
                    "failed",
                    f"at most {params.max_quarantined_fraction:.1%} of images quarantined",
                    f"{len(quarantine)} of {len(images)} images ({fraction:.1%}) quarantined",
                    len(quarantine),
                    [],
                    "too many bad images for a quarantine: look at the source "
                    "(camera, export settings) or raise validate.max_quarantined_fraction",
                )
            )

    # ---- dataset rules -------------------------------------------------------------
    counts = class_count_table(kept, [*declared_classes, *images["label"]])
    hashes = hash_table(kept)

    if rules.declared_labels.severity == "off":
        off("declared_labels", "dataset")
    elif not declared_classes:
        off("declared_labels", "dataset", "no class list declared in data.classes")
    else:
        res = gx.validate(
            kept,
            [gxe.ExpectColumnValuesToBeInSet(column="label", value_set=list(declared_classes))],
            ["source_path"],
        )
        keys = _unexpected(res, "source_path")
        strays = sorted(set(kept.set_index("source_path").loc[keys, "label"])) if keys else []
        finish(
            "declared_labels",
            "dataset",
            f"label in data.classes ({', '.join(declared_classes)})",
            "add the class to data.classes, or move these images out of the source",
            keys,
            f"{len(keys)} images in undeclared classes: {', '.join(strays) or 'none'}",
            _file_entries(kept, keys, lambda r: f"class '{r['label']}' is not declared"),
        )

    if rules.min_per_class.severity == "off":
        off("min_per_class", "dataset")
    else:
        m = rules.min_per_class
        expectations = [gxe.ExpectColumnValuesToBeBetween(column=s, min_value=getattr(m, s)) for s in SPLITS]
        res = gx.validate(counts, expectations, ["label"])
        entries = []
        for split, r in zip(SPLITS, res, strict=True):
            for entry in r.result.get("unexpected_index_list") or []:
                label = str(entry["label"])
                have = int(counts.set_index("label").loc[label, split])
                entries.append(
                    {
                        "file": f"{label}/{split}",
                        "label": label,
                        "reason": f"{have} image(s) in {split}, need {getattr(m, split)}",
                    }
                )
        if len(counts) < 2:
            entries.insert(
                0,
                {
                    "file": "dataset",
                    "label": "",
                    "reason": f"{len(counts)} class(es) in the data, need at least 2",
                },
            )
        shown = "; ".join(f"'{e['label']}' {e['reason']}" if e["label"] else e["reason"] for e in entries[:5])
        finish(
            "min_per_class",
            "dataset",
            f"per class: train >= {m.train}, val >= {m.val}, test >= {m.test}",
            "add images of these classes, or lower validate.rules.min_per_class",
            [e["file"] for e in entries],
            shown or "every class has enough images",
            entries,
        )

    if rules.class_imbalance.severity == "off":
        off("class_imbalance", "dataset")
    else:
        limit_ratio = rules.class_imbalance.max_ratio
        res = gx.validate(
            counts,
            [gxe.ExpectColumnValuesToBeBetween(column="ratio_to_smallest", max_value=limit_ratio)],
            ["label"],
        )
        keys = _unexpected(res, "label")
        ratio = float(counts["ratio_to_smallest"].max()) if len(counts) else 0.0
        smallest = counts.loc[counts["total"].idxmin(), "label"] if len(counts) else ""
        finish(
            "class_imbalance",
            "dataset",
            f"largest / smallest class <= {limit_ratio:g}",
            "collect more images of the small class, cap large ones (data.max_per_class), "
            "or raise validate.rules.class_imbalance.max_ratio",
            keys,
            f"largest / smallest class = {ratio:.2f} (smallest: '{smallest}')",
            [
                {
                    "file": k,
                    "label": k,
                    "reason": f"{float(counts.set_index('label').loc[k, 'ratio_to_smallest']):.2f}x "
                    f"the smallest class",
                }
                for k in keys
            ],
        )

    hash_rules = {
        "conflicting_labels": (
            "labels_for_content",
            "each picture under one class",
            "the same picture is filed under several classes: keep it in the right class folder only",
            lambda r: f"same picture also under another class (hash {r['content_sha256'][:10]})",
        ),
        "split_leakage": (
            "splits_for_content",
            "each picture in one split",
            "a picture is shared across splits: re-run prepare (it keeps equal pictures together) "
            "and never edit the manifest's split column by hand",
            lambda r: f"same picture in several splits (hash {r['content_sha256'][:10]})",
        ),
        "duplicates": (
            "copies_in_class",
            "no repeated picture within a class",
            "remove the extra copies; duplicates weigh those pictures twice in training",
            lambda r: f"{r['copies_in_class']} copies in class '{r['label']}'",
        ),
    }
    for name in ("split_leakage", "conflicting_labels", "duplicates"):
        column, threshold, fix, reason = hash_rules[name]
        if getattr(rules, name).severity == "off":
            off(name, "dataset")
            continue
        res = gx.validate(
            hashes, [gxe.ExpectColumnValuesToBeBetween(column=column, max_value=1)], ["source_path"]
        )
        keys = _unexpected(res, "source_path")
        finish(
            name,
            "dataset",
            threshold,
            fix,
            keys,
            f"{len(keys)} images affected",
            _file_entries(hashes, keys, reason),
        )

    order = {name: i for i, name in enumerate((*IMAGE_RULES, "quarantine_limit", *DATASET_RULES))}
    results.sort(key=lambda r: order[r.rule])
    return ValidationReport(
        results=results,
        quarantine=quarantine,
        images=len(images),
        usable_images=len(kept),
        class_counts=counts[["label", *SPLITS, "total"]],
        on_bad_images=params.on_bad_images,
    )


def _quarantine_table(images: pd.DataFrame, bad: dict[str, list[str]]) -> pd.DataFrame:
    """One row per quarantined file, naming every image rule it broke and why."""
    indexed = images.drop_duplicates("source_path").set_index("source_path", drop=False)
    per_file: dict[str, list[str]] = {}
    for rule, keys in bad.items():
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
                "rules": ";".join(broken),
                "reasons": "; ".join(IMAGE_REASONS[rule](row) for rule in broken),
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
