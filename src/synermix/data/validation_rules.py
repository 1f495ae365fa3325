"""The validate stage's rules, one :class:`ValidationRule` each in :data:`RULES`.

A rule names the table it checks, the Great Expectations expectations it runs there,
what passing means (the report's "expected" column), the fix shown to the user, and how
its GX results become an observation and a list of offending files. Its knobs
(severity, thresholds) are its section of ``validate.rules`` in params.yaml; adding a
rule means one entry here and one section in :class:`synermix.config.ValidationRules`.
:func:`synermix.data.validation.validate_manifest` runs the table, in its order.

Image rules judge single files; with ``validate.on_bad_images: quarantine`` the files
failing one of severity ``error`` are quarantined, each with the rule's ``reason``.
Dataset rules run afterwards, on the rows that remain.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Literal

import pandas as pd

from synermix.data.splits import SPLITS


@dataclass(frozen=True)
class Tables:
    """The tables rules run on. The dataset tables exist only once quarantine is decided.

    ``images``: the manifest plus ``min_side`` / ``max_side``; ``decoded``: its decodable
    rows; ``kept``: decoded, split, not quarantined; ``counts``: images of ``kept`` per
    class and split (:func:`~synermix.data.validation.class_count_table`); ``hashes``:
    labels, splits and copies per content hash (:func:`~synermix.data.validation.hash_table`).
    """

    images: pd.DataFrame
    decoded: pd.DataFrame
    declared_classes: tuple[str, ...]
    kept: pd.DataFrame | None = None
    counts: pd.DataFrame | None = None
    hashes: pd.DataFrame | None = None


@dataclass(frozen=True)
class Finding:
    """What a rule saw: ``keys`` are the offending files (or class/split cells, for rules
    over ``counts``), one each; ``offending`` describes them for the reports."""

    keys: list[str]
    observed: str
    offending: list[dict[str, str]]


@dataclass(frozen=True)
class Check:
    """A rule's GX results together with what they were computed on; ``observe``'s input."""

    rule: ValidationRule
    settings: Any
    tables: Tables
    table: pd.DataFrame
    results: list

    def unexpected(self, column: str) -> list[str]:
        """``column`` of the rows failing any of the expectations, first failure first."""
        keys: list[str] = []
        for res in self.results:
            for entry in res.result.get("unexpected_index_list") or []:
                value = str(entry[column])
                if value not in keys:
                    keys.append(value)
        return keys

    def files(self, keys: list[str], observed: str) -> Finding:
        """A finding over files of ``table``, each with the rule's ``reason``."""
        reason = self.rule.reason
        if reason is None:
            raise TypeError(f"rule {self.rule.name!r} lists files, so it needs a reason")
        indexed = self.table.set_index("source_path", drop=False)
        entries = []
        for key in keys:
            row = indexed.loc[key]
            if isinstance(row, pd.DataFrame):
                row = row.iloc[0]
            entries.append({"file": key, "label": str(row["label"]), "reason": reason(row)})
        return Finding(keys, observed, entries)


def _always_applicable(tables: Tables) -> str | None:
    return None


@dataclass(frozen=True)
class ValidationRule:
    """One rule. The callables get the rule's ``validate.rules`` section (``s``) and the
    :class:`Tables` (``t``); ``expectations`` gets GX's expectations module first, so GX
    is imported only when validation runs.

    ``expectations`` run as one GX suite on ``getattr(tables, table)``, with ``index`` as
    the column GX reports failing rows by. ``observe`` turns the results into a
    :class:`Finding`. ``reason`` says why one row breaks the rule (reports and the
    quarantine table). ``why_not_applicable`` returns why the rule is off despite its
    severity, or None.
    """

    name: str
    scope: Literal["image", "dataset"]
    table: Literal["images", "decoded", "kept", "counts", "hashes"]
    expectations: Callable[[ModuleType, Any, Tables], list]
    description: Callable[[Any, Tables], str]
    fix: str
    observe: Callable[[Check], Finding]
    reason: Callable[[pd.Series], str] | None = None
    index: str = "source_path"
    why_not_applicable: Callable[[Tables], str | None] = _always_applicable


# --------------------------------------------------------------------------- observations
def _image_files(check: Check) -> Finding:
    keys = check.unexpected("source_path")
    return check.files(keys, f"{len(keys)} of {len(check.table)} images")


def _undeclared_files(check: Check) -> Finding:
    keys = check.unexpected("source_path")
    strays = sorted(set(check.table.set_index("source_path").loc[keys, "label"])) if keys else []
    return check.files(keys, f"{len(keys)} images in undeclared classes: {', '.join(strays) or 'none'}")


def _short_classes(check: Check) -> Finding:
    """One entry per class and split below its minimum, after one for a single-class dataset."""
    counts = check.table
    by_label = counts.set_index("label")
    entries = []
    for split, r in zip(SPLITS, check.results, strict=True):
        for entry in r.result.get("unexpected_index_list") or []:
            label = str(entry["label"])
            have = int(by_label.loc[label, split])
            entries.append(
                {
                    "file": f"{label}/{split}",
                    "label": label,
                    "reason": f"{have} image(s) in {split}, need {getattr(check.settings, split)}",
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
    return Finding([e["file"] for e in entries], shown or "every class has enough images", entries)


def _imbalanced_classes(check: Check) -> Finding:
    counts = check.table
    keys = check.unexpected("label")
    ratio = float(counts["ratio_to_smallest"].max()) if len(counts) else 0.0
    smallest = counts.loc[counts["total"].idxmin(), "label"] if len(counts) else ""
    by_label = counts.set_index("label")
    entries = [
        {
            "file": k,
            "label": k,
            "reason": f"{float(by_label.loc[k, 'ratio_to_smallest']):.2f}x the smallest class",
        }
        for k in keys
    ]
    return Finding(keys, f"largest / smallest class = {ratio:.2f} (smallest: '{smallest}')", entries)


def _hash_files(check: Check) -> Finding:
    keys = check.unexpected("source_path")
    return check.files(keys, f"{len(keys)} images affected")


def _no_class_list(tables: Tables) -> str | None:
    return None if tables.declared_classes else "no class list declared in data.classes"


# --------------------------------------------------------------------------- the table
RULES: tuple[ValidationRule, ...] = (
    ValidationRule(
        name="decodable",
        scope="image",
        table="images",
        expectations=lambda gxe, s, t: [
            gxe.ExpectColumnValuesToBeInSet(column="decodable", value_set=[True])
        ],
        description=lambda s, t: "every file decodes",
        fix="replace or remove these files in the source, or set validate.on_bad_images: quarantine",
        observe=_image_files,
        reason=lambda row: str(row["error"]),
    ),
    ValidationRule(
        name="allowed_modes",
        scope="image",
        table="decoded",
        expectations=lambda gxe, s, t: [
            gxe.ExpectColumnValuesToBeInSet(column="mode", value_set=list(s.modes))
        ],
        description=lambda s, t: f"mode in {', '.join(s.modes)}",
        fix="convert these images, or add their mode to validate.rules.allowed_modes.modes "
        "(prepare then converts them to L or RGB)",
        observe=_image_files,
        reason=lambda row: f"mode {row['mode']}",
    ),
    ValidationRule(
        name="size_limits",
        scope="image",
        table="decoded",
        expectations=lambda gxe, s, t: [
            gxe.ExpectColumnValuesToBeBetween(column="min_side", min_value=s.min_side),
            gxe.ExpectColumnValuesToBeBetween(column="max_side", max_value=s.max_side),
        ],
        description=lambda s, t: f"{s.min_side} <= each side <= {s.max_side} px",
        fix="remove these images or change validate.rules.size_limits",
        observe=_image_files,
        reason=lambda row: f"{row['width']}x{row['height']} px",
    ),
    ValidationRule(
        name="exposure",
        scope="image",
        table="decoded",
        expectations=lambda gxe, s, t: [
            gxe.ExpectColumnValuesToBeBetween(
                column="mean_intensity", min_value=s.min_mean, max_value=s.max_mean
            ),
            gxe.ExpectColumnValuesToBeBetween(column="std_intensity", min_value=s.min_std),
        ],
        description=lambda s, t: f"{s.min_mean} <= mean grey <= {s.max_mean}, std >= {s.min_std}",
        fix="blank or saturated frames (a camera fault?): remove them, or adjust validate.rules.exposure",
        observe=_image_files,
        reason=lambda row: f"mean {row['mean_intensity']:.1f}, std {row['std_intensity']:.1f}",
    ),
    ValidationRule(
        name="declared_labels",
        scope="dataset",
        table="kept",
        expectations=lambda gxe, s, t: [
            gxe.ExpectColumnValuesToBeInSet(column="label", value_set=list(t.declared_classes))
        ],
        description=lambda s, t: f"label in data.classes ({', '.join(t.declared_classes)})",
        fix="add the class to data.classes, or move these images out of the source",
        observe=_undeclared_files,
        reason=lambda row: f"class '{row['label']}' is not declared",
        why_not_applicable=_no_class_list,
    ),
    ValidationRule(
        name="min_per_class",
        scope="dataset",
        table="counts",
        index="label",
        expectations=lambda gxe, s, t: [
            gxe.ExpectColumnValuesToBeBetween(column=split, min_value=getattr(s, split)) for split in SPLITS
        ],
        description=lambda s, t: f"per class: train >= {s.train}, val >= {s.val}, test >= {s.test}",
        fix="add images of these classes, or lower validate.rules.min_per_class",
        observe=_short_classes,
    ),
    ValidationRule(
        name="class_imbalance",
        scope="dataset",
        table="counts",
        index="label",
        expectations=lambda gxe, s, t: [
            gxe.ExpectColumnValuesToBeBetween(column="ratio_to_smallest", max_value=s.max_ratio)
        ],
        description=lambda s, t: f"largest / smallest class <= {s.max_ratio:g}",
        fix="collect more images of the small class, cap large ones (data.max_per_class), "
        "or raise validate.rules.class_imbalance.max_ratio",
        observe=_imbalanced_classes,
    ),
    ValidationRule(
        name="split_leakage",
        scope="dataset",
        table="hashes",
        expectations=lambda gxe, s, t: [
            gxe.ExpectColumnValuesToBeBetween(column="splits_for_content", max_value=1)
        ],
        description=lambda s, t: "each picture in one split",
        fix="a picture is shared across splits: re-run prepare (it keeps equal pictures together) "
        "and never edit the manifest's split column by hand",
        observe=_hash_files,
        reason=lambda row: f"same picture in several splits (hash {row['content_sha256'][:10]})",
    ),
    ValidationRule(
        name="conflicting_labels",
        scope="dataset",
        table="hashes",
        expectations=lambda gxe, s, t: [
            gxe.ExpectColumnValuesToBeBetween(column="labels_for_content", max_value=1)
        ],
        description=lambda s, t: "each picture under one class",
        fix="the same picture is filed under several classes: keep it in the right class folder only",
        observe=_hash_files,
        reason=lambda row: f"same picture also under another class (hash {row['content_sha256'][:10]})",
    ),
    ValidationRule(
        name="duplicates",
        scope="dataset",
        table="hashes",
        expectations=lambda gxe, s, t: [
            gxe.ExpectColumnValuesToBeBetween(column="copies_in_class", max_value=1)
        ],
        description=lambda s, t: "no repeated picture within a class",
        fix="remove the extra copies; duplicates weigh those pictures twice in training",
        observe=_hash_files,
        reason=lambda row: f"{row['copies_in_class']} copies in class '{row['label']}'",
    ),
)
