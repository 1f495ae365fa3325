"""The prepare stage's work: materialise a source into images + a manifest + splits.

:func:`prepare_dataset` lists the source, applies the optional per-class cap, decodes
and checks every image (:func:`~synermix.data.images.inspect_image`), writes the decodable
ones as canonical PNG files (optionally resized), assigns leakage-free stratified splits
and writes ``manifest.csv``. Same params and data give byte-identical outputs. The output
folder is built beside the target and swapped in at the end; it only ever replaces a
folder that prepare itself wrote (it carries a marker file), so user data is never
deleted or overwritten.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from collections import Counter
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pandas as pd
from tqdm import tqdm

from synermix.choices import MAX_PIXELS
from synermix.config import SourceSpec
from synermix.data.images import encode_png, inspect_image, resize_shorter_side
from synermix.data.manifest import BASE_COLUMNS, MANIFEST_NAME, write_manifest
from synermix.data.sources import SourceItem, list_source
from synermix.data.splits import SPLITS, assign_splits, class_rng
from synermix.errors import UserError

log = logging.getLogger(__name__)

MARKER_NAME = ".synermix-prepared"


@dataclass(frozen=True)
class PrepareResult:
    manifest: pd.DataFrame
    summary: dict


def cap_per_class(items: Sequence[SourceItem], max_per_class: int | None, seed: int) -> list[SourceItem]:
    """Keep at most ``max_per_class`` items of each class, chosen by a seeded shuffle."""
    if max_per_class is None:
        return list(items)
    by_label: dict[str, list[SourceItem]] = {}
    for item in items:
        by_label.setdefault(item.label, []).append(item)
    kept: list[SourceItem] = []
    for label in sorted(by_label):
        group = sorted(by_label[label], key=lambda it: it.source_path)
        if len(group) > max_per_class:
            order = class_rng(seed, label).permutation(len(group))[:max_per_class]
            group = [group[i] for i in sorted(order)]
        kept.extend(group)
    return kept


def _safe_name(source_path: str) -> str:
    stem = "_".join(PurePosixPath(source_path).with_suffix("").parts)
    return re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._") or "image"


def _is_within(inner: Path, outer: Path) -> bool:
    inner, outer = inner.resolve(), outer.resolve()
    return inner == outer or outer in inner.parents


def _check_output_dir(out_dir: Path, spec: SourceSpec) -> None:
    if spec.path is not None and (_is_within(out_dir, spec.path) or _is_within(spec.path, out_dir)):
        raise UserError(
            f"the prepared folder '{out_dir}' and the source folder '{spec.path}' overlap; "
            "keep your photos outside the pipeline's output folder"
        )
    if out_dir.exists():
        if not out_dir.is_dir():
            raise UserError(
                f"'{out_dir}' exists and is not a folder; move it away, prepare will not overwrite it"
            )
        if any(out_dir.iterdir()) and not (out_dir / MARKER_NAME).is_file():
            raise UserError(
                f"'{out_dir}' already holds files that prepare did not write; move them away or "
                "choose another output folder (prepare never overwrites user data)"
            )


def _process(item: SourceItem, max_pixels: int, image_size: int | None, staging: Path | None) -> dict:
    """One item's manifest row; its canonical PNG written under ``staging`` (None: nothing
    is written, for ``synermix check-data``)."""
    try:
        data = item.read()
    except OSError as exc:
        data = b""
        read_error = f"cannot read file: {exc.strerror or exc}"
    else:
        read_error = ""
    info = inspect_image(data, max_pixels)
    sha256 = hashlib.sha256(data).hexdigest()
    row = {
        "path": "",
        "label": item.label,
        "split": "",
        "sha256": sha256,
        "width": info.width,
        "height": info.height,
        "mode": info.mode,
        "bytes": len(data),
        "format": info.format,
        "decodable": info.decodable,
        "error": read_error or info.error,
        "mean_intensity": info.mean_intensity,
        "std_intensity": info.std_intensity,
        "content_sha256": info.content_sha256,
        "source_path": item.source_path,
        **item.extra,
    }
    if info.image is not None:
        rel = PurePosixPath("images", item.label, f"{_safe_name(item.source_path)}-{sha256[:10]}.png")
        row["path"] = str(rel)
        if staging is None:
            return row
        image = info.image if image_size is None else resize_shorter_side(info.image, image_size)
        target = staging / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(encode_png(image))
    return row


def prepare_dataset(
    spec: SourceSpec,
    out_dir: Path,
    *,
    seed: int,
    split: Mapping[str, float],
    image_size: int | None = None,
    max_per_class: int | None = None,
    max_pixels: int = MAX_PIXELS,
    workers: int = 2,
) -> PrepareResult:
    """Write ``out_dir/images/<label>/*.png`` and ``out_dir/manifest.csv``; return both tables."""
    _check_output_dir(out_dir, spec)
    listing = list_source(spec)
    items = cap_per_class(listing.items, max_per_class, seed)
    if not items:
        raise UserError(f"data.source '{spec.kind}' lists no images")
    log.info("preparing %d images from %s into %s", len(items), spec.kind, out_dir)

    staging = out_dir.with_name(out_dir.name + ".partial")
    if staging.exists():
        shutil.rmtree(staging)  # our own leftover from an interrupted run
    staging.mkdir(parents=True)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        jobs = pool.map(lambda it: _process(it, max_pixels, image_size, staging), items)
        rows = list(tqdm(jobs, total=len(items), desc="prepare", unit="img", disable=None))

    columns = list(BASE_COLUMNS) + list(listing.extra_columns)
    manifest = pd.DataFrame(rows, columns=columns)
    decoded = manifest["decodable"].to_numpy()
    splits = assign_splits(
        manifest.loc[decoded, "label"].tolist(),
        manifest.loc[decoded, "content_sha256"].tolist(),
        split,
        seed,
    )
    manifest.loc[decoded, "split"] = splits
    manifest = manifest.sort_values(["label", "source_path"], kind="stable").reset_index(drop=True)

    write_manifest(manifest, staging / MANIFEST_NAME)
    summary = summarise(manifest, spec, skipped=len(listing.skipped))
    (staging / MARKER_NAME).write_text("written by synermix prepare; safe to delete\n")
    if out_dir.exists():
        shutil.rmtree(out_dir)  # carries our marker (checked above)
    staging.rename(out_dir)
    return PrepareResult(manifest, summary)


def manifest_in_memory(
    spec: SourceSpec,
    *,
    seed: int,
    split: Mapping[str, float],
    max_per_class: int | None = None,
    max_pixels: int = MAX_PIXELS,
    workers: int = 2,
) -> tuple[pd.DataFrame, int]:
    """The manifest prepare would write for ``spec`` (rows, splits), and the count of files
    the listing skipped, without writing anything: what ``synermix check-data`` validates."""
    listing = list_source(spec)
    items = cap_per_class(listing.items, max_per_class, seed)
    if not items:
        raise UserError(f"data.source '{spec.kind}' lists no images")
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        jobs = pool.map(lambda it: _process(it, max_pixels, None, None), items)
        rows = list(tqdm(jobs, total=len(items), desc="check", unit="img", disable=None))
    manifest = pd.DataFrame(rows, columns=list(BASE_COLUMNS) + list(listing.extra_columns))
    decoded = manifest["decodable"].to_numpy()
    manifest.loc[decoded, "split"] = assign_splits(
        manifest.loc[decoded, "label"].tolist(),
        manifest.loc[decoded, "content_sha256"].tolist(),
        split,
        seed,
    )
    return manifest.sort_values(["label", "source_path"], kind="stable").reset_index(drop=True), len(
        listing.skipped
    )


def summarise(manifest: pd.DataFrame, spec: SourceSpec, skipped: int = 0) -> dict:
    """Counts per class and split, for ``reports/prepare.json``."""
    counts = Counter(zip(manifest["label"], manifest["split"], strict=True))
    classes = sorted(set(manifest["label"]))
    return {
        "source": spec.kind,
        "images": len(manifest),
        "decodable": int(manifest["decodable"].sum()),
        "undecodable": int((~manifest["decodable"]).sum()),
        "skipped_files": skipped,
        "classes": len(classes),
        "per_class": {c: {s: counts[(c, s)] for s in SPLITS} for c in classes},
        "per_split": {s: int((manifest["split"] == s).sum()) for s in SPLITS},
    }


def write_summary(summary: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
