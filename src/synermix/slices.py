"""Slices of the test split over manifest columns: is the model as good on mono cells as on
poly ones, on camera 2 as on camera 1, on the night shift? A model that is fine on average
and poor on one line's images fails that line.

The columns: ``evaluate.slices`` (``auto``: ELPV's ``cell_type``; for ``folder:`` data every
column of the folder's optional ``meta.csv``; none for Fashion-MNIST). Per slice value: test
images, accuracy with its 95 % Wilson interval, macro recall over the classes present, and
the line's escape and overkill rates when there are defect classes. The gates
(``gates.max_slice_accuracy_gap``, ``gates.max_slice_escape_rate``) judge the slices with
at least ``gates.slice_min_images`` test images (:func:`synermix.gates.slice_gates`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pandas as pd

from synermix.data.manifest import BASE_COLUMNS
from synermix.errors import UserError
from synermix.metrics import wilson_interval

#: slice columns of ``evaluate.slices: auto`` per source kind (folder: meta.csv's columns)
AUTO_COLUMNS = {"elpv": ("cell_type",), "fashion-mnist": ()}
SLICE_COLUMNS = [
    "column",
    "value",
    "images",
    "accuracy",
    "accuracy_ci95_low",
    "accuracy_ci95_high",
    "macro_recall",
    "escape_rate",
    "overkill_rate",
]


def slice_columns(
    setting: str | Sequence[str], source_kind: str, manifest_columns: Sequence[str]
) -> list[str]:
    """The manifest columns to slice by; a named column the manifest lacks is a UserError."""
    extra = [c for c in manifest_columns if c not in BASE_COLUMNS]
    if setting == "auto":
        if source_kind in AUTO_COLUMNS:
            return [c for c in AUTO_COLUMNS[source_kind] if c in extra]
        return extra  # folder: the columns of its meta.csv
    missing = [c for c in setting if c not in manifest_columns]
    if missing:
        have = ", ".join(extra) or "none (add a meta.csv to the photo folder)"
        raise UserError(
            f"evaluate.slices names column(s) {', '.join(missing)} that the manifest does not have; "
            f"its extra columns: {have}. Fix evaluate.slices (auto, or a list of those columns)"
        )
    return list(setting)


def slice_table(
    test_rows: pd.DataFrame,
    predictions: pd.DataFrame,
    columns: Sequence[str],
    defect_classes: Sequence[str],
) -> pd.DataFrame:
    """One row per (column, value) over the test split; rows without a value are the slice
    ``(none)``."""
    joined = predictions.merge(test_rows[["path", *columns]], on="path", how="left", validate="one_to_one")
    decided = "decision" in joined and joined["decision"].astype(bool).any() and bool(defect_classes)
    defect = joined["actual"].isin(list(defect_classes))
    rows: list[dict[str, Any]] = []
    for column in columns:
        values = joined[column].astype("string").fillna("(none)").replace("", "(none)")
        for value in sorted(values.unique()):
            mine = (values == value).to_numpy()
            part = joined[mine]
            n = len(part)
            right = int(part["correct"].astype(bool).sum())
            low, high = wilson_interval(right, n)
            recalls = part.groupby("actual")["correct"].mean()
            row = {
                "column": column,
                "value": str(value),
                "images": n,
                "accuracy": right / n if n else math.nan,
                "accuracy_ci95_low": low,
                "accuracy_ci95_high": high,
                "macro_recall": float(recalls.mean()) if len(recalls) else math.nan,
                "escape_rate": math.nan,
                "overkill_rate": math.nan,
            }
            if decided:
                bad, good = defect[mine], ~defect[mine]
                if bad.sum():
                    row["escape_rate"] = float(((part["decision"] == "accept") & bad).sum() / bad.sum())
                if good.sum():
                    row["overkill_rate"] = float(((part["decision"] == "reject") & good).sum() / good.sum())
            rows.append(row)
    return pd.DataFrame(rows, columns=SLICE_COLUMNS)
