"""The manifest: one row per source image, the contract between prepare and later stages.

Columns (in order):

=================  ==================================================================
path               prepared image, relative to the prepared folder ('' if undecodable)
label              class name
split              train / val / test ('' for images that could not be decoded)
sha256             SHA-256 of the source file's bytes
width, height      pixel size from the source header (0 when no header could be read)
mode               source Pillow mode (L, RGB, CMYK, I;16, ...)
bytes              source file size
format             source file format as Pillow names it (PNG, JPEG, ...)
decodable          whether the pixels could be decoded
error              why not, when not
mean_intensity     mean grey level 0..255 of the decoded image
std_intensity      standard deviation of the grey level
content_sha256     SHA-256 of the decoded pixels: equal pictures share it
source_path        where the image came from, relative to the source
...                source-specific columns (ELPV: defect_probability, cell_type)
=================  ==================================================================
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from synermix.errors import UserError

BASE_COLUMNS = (
    "path",
    "label",
    "split",
    "sha256",
    "width",
    "height",
    "mode",
    "bytes",
    "format",
    "decodable",
    "error",
    "mean_intensity",
    "std_intensity",
    "content_sha256",
    "source_path",
)

MANIFEST_NAME = "manifest.csv"
QUARANTINE_COLUMNS = ("source_path", "label", "split", "rules", "reasons")


def write_manifest(frame: pd.DataFrame, path: Path) -> None:
    """Write the manifest deterministically (fixed row and column order, LF endings)."""
    frame.to_csv(path, index=False, lineterminator="\n")


def read_manifest(path: Path) -> pd.DataFrame:
    """Read a manifest written by :func:`write_manifest`, with the declared dtypes."""
    if not path.is_file():
        raise UserError(f"manifest '{path}' not found; run the prepare stage first (dvc repro prepare)")
    frame = pd.read_csv(
        path,
        dtype={
            "path": str,
            "label": str,
            "split": str,
            "sha256": str,
            "mode": str,
            "format": str,
            "error": str,
            "content_sha256": str,
            "source_path": str,
        },
        keep_default_na=False,
        na_values={"mean_intensity": [""], "std_intensity": [""]},
    )
    missing = [c for c in BASE_COLUMNS if c not in frame.columns]
    if missing:
        raise UserError(f"manifest '{path}' lacks column(s) {', '.join(missing)}; re-run prepare")
    frame["decodable"] = frame["decodable"].astype(bool)
    return frame


def read_quarantine(path: Path) -> pd.DataFrame:
    if not path.is_file():
        return pd.DataFrame(columns=list(QUARANTINE_COLUMNS))
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def usable_rows(manifest: pd.DataFrame, quarantine: pd.DataFrame) -> pd.DataFrame:
    """Rows later stages may use: decoded, assigned a split, and not quarantined."""
    keep = manifest["decodable"] & (manifest["split"] != "")
    keep &= ~manifest["source_path"].isin(set(quarantine["source_path"]))
    return manifest[keep].reset_index(drop=True)


def class_names(manifest: pd.DataFrame, declared: Sequence[str] = ()) -> list[str]:
    """Class index order: the declared list when given, else sorted label names."""
    return list(declared) if declared else sorted(set(manifest["label"]))
