"""Image sources: where the photos come from, listed as :class:`SourceItem` records.

A source only *lists* images (cheap) and hands out a reader per image; decoding and
checking happen in :mod:`synermix.data.prepare`. Three kinds:

* ``elpv``: the ELPV solar-cell electroluminescence images shipped by the PyPI package
  ``elpv-dataset`` (2,624 grey 300x300 cells; defect probability 0, 1/3, 2/3, 1 mapped
  to four severity classes; the cell type is kept as a column). Licence CC BY-NC-SA 4.0.
* ``folder:<path>``: the user's own photos laid out as ``<class>/<image>``.
* ``fashion-mnist[:<dir>]``: the idx files of Debian's ``dataset-fashion-mnist``.
"""

from __future__ import annotations

import gzip
import importlib.util
import logging
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from synermix.config import SourceSpec
from synermix.data.images import IMAGE_EXTENSIONS, encode_png
from synermix.errors import UserError

log = logging.getLogger(__name__)

#: ELPV defect probability -> class name (ordered from sound to defective).
ELPV_CLASSES = {
    0.0: "functional",
    1 / 3: "possibly_defective",
    2 / 3: "likely_defective",
    1.0: "defective",
}

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "tshirt_top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle_boot",
)


@dataclass(frozen=True)
class SourceItem:
    """One image of a source: where it is, its label, and how to read its file bytes."""

    source_path: str
    label: str
    read: Callable[[], bytes] = field(compare=False, repr=False)
    extra: dict[str, object] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class SourceListing:
    items: list[SourceItem]
    #: Extra manifest columns this source fills, in order.
    extra_columns: tuple[str, ...] = ()
    #: Files seen but not taken (unsupported extension), relative paths.
    skipped: tuple[str, ...] = ()
    #: Class names in the source's natural order.
    classes: tuple[str, ...] = ()


def list_source(spec: SourceSpec) -> SourceListing:
    """List the images of ``spec``; a missing or malformed source raises :class:`UserError`."""
    if spec.kind == "elpv":
        return list_elpv()
    if spec.kind == "folder":
        assert spec.path is not None
        return list_folder(spec.path)
    if spec.kind == "fashion-mnist":
        return list_fashion_mnist(spec.path or FASHION_MNIST_DIR)
    raise ValueError(f"unknown source kind {spec.kind!r}")


def _reader(path: Path) -> Callable[[], bytes]:
    return path.read_bytes


# --------------------------------------------------------------------------- ELPV
def elpv_class(probability: float) -> str:
    for value, name in ELPV_CLASSES.items():
        if abs(probability - value) < 1e-6:
            return name
    raise UserError(f"ELPV labels.csv has an unexpected defect probability {probability!r}")


def list_elpv() -> SourceListing:
    spec = importlib.util.find_spec("elpv_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "data.source 'elpv' needs the package elpv-dataset: run `make install` "
            "(or `pip install elpv-dataset`)"
        )
    root = Path(next(iter(spec.submodule_search_locations))) / "data"
    labels = root / "labels.csv"
    if not labels.is_file():
        raise UserError(f"elpv-dataset is installed but {labels} is missing; reinstall it")
    items = []
    for number, line in enumerate(labels.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rel, probability, cell_type = line.split()
            prob = float(probability)
        except ValueError:
            raise UserError(f"{labels}:{number}: expected 'path probability type'") from None
        items.append(
            SourceItem(
                source_path=Path(rel).name,
                label=elpv_class(prob),
                read=_reader(root / rel),
                extra={"defect_probability": round(prob, 4), "cell_type": cell_type},
            )
        )
    return SourceListing(
        items=items,
        extra_columns=("defect_probability", "cell_type"),
        classes=tuple(ELPV_CLASSES.values()),
    )


# --------------------------------------------------------------------------- folder
def _visible(name: str) -> bool:
    """Hidden files and folders (.DS_Store, .git) and macOS zip debris are not photos."""
    return not name.startswith(".") and name != "__MACOSX"


_FOLDER_FIX = "point data.source at a folder laid out as <class>/<image>"


def list_folder(root: Path) -> SourceListing:
    """List ``root/<class>/<image>`` (images may sit in sub-folders of a class folder)."""
    if not root.exists():
        raise UserError(f"data.source folder '{root}' does not exist; {_FOLDER_FIX}")
    if not root.is_dir():
        raise UserError(f"data.source folder '{root}' is a file, not a folder; {_FOLDER_FIX}")
    try:
        return _list_class_folders(root)
    except PermissionError as exc:
        raise UserError(f"cannot read '{exc.filename}': permission denied; make it readable") from None


def _list_class_folders(root: Path) -> SourceListing:
    entries = sorted(p for p in root.iterdir() if _visible(p.name))
    loose = [p.name for p in entries if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    class_dirs = [p for p in entries if p.is_dir()]
    if loose:
        shown = ", ".join(loose[:5]) + (" ..." if len(loose) > 5 else "")
        raise UserError(
            f"'{root}' has {len(loose)} image(s) directly inside it ({shown}); every image must "
            "be in a folder named after its class: move them into <class>/ sub-folders"
        )
    if not class_dirs:
        raise UserError(f"'{root}' has no class folders; {_FOLDER_FIX}")
    items: list[SourceItem] = []
    skipped: list[str] = []
    empty: list[str] = []
    for class_dir in class_dirs:
        files = sorted(
            p
            for p in class_dir.rglob("*")
            if p.is_file() and all(_visible(part) for part in p.relative_to(class_dir).parts)
        )
        images = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
        skipped += [str(p.relative_to(root)) for p in files if p not in images]
        if not images:
            empty.append(class_dir.name)
        for path in images:
            items.append(SourceItem(str(path.relative_to(root).as_posix()), class_dir.name, _reader(path)))
    if empty:
        raise UserError(
            f"class folder(s) with no images in '{root}': {', '.join(empty)}; add images "
            f"({', '.join(IMAGE_EXTENSIONS)}) or remove the folder"
        )
    if skipped:
        log.warning(
            "skipped %d file(s) that are not images (%s): %s",
            len(skipped),
            ", ".join(IMAGE_EXTENSIONS),
            ", ".join(skipped[:10]),
        )
    meta = root / META_CSV
    if meta.is_file():
        items, columns = _with_meta(items, meta)
    else:
        columns = ()
    return SourceListing(
        items=items, extra_columns=columns, skipped=tuple(skipped), classes=tuple(p.name for p in class_dirs)
    )


#: optional per-image columns of a photo folder (line, camera, shift...): manifest columns the
#: evaluate stage slices the test split by
META_CSV = "meta.csv"


def _with_meta(items: list[SourceItem], meta: Path) -> tuple[list[SourceItem], tuple[str, ...]]:
    """``items`` with the columns of ``meta`` (a CSV with a ``path`` column: the image's path
    under the folder, e.g. ``crack/0001.png``); images it does not list get empty values."""
    import csv

    from synermix.data.manifest import BASE_COLUMNS

    fix = f"fix {meta}: a CSV with a 'path' column (e.g. crack/0001.png) and one column per property"
    try:
        with meta.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            fields = [f.strip() for f in (reader.fieldnames or [])]
            rows = list(reader)
    except (UnicodeDecodeError, csv.Error) as exc:
        raise UserError(f"{meta} is not a readable CSV ({exc}); {fix}") from None
    if "path" not in fields:
        raise UserError(f"{meta} has no 'path' column (columns: {', '.join(fields) or 'none'}); {fix}")
    columns = tuple(f for f in fields if f != "path")
    clash = [c for c in columns if c in BASE_COLUMNS or not c]
    if clash:
        raise UserError(f"{meta}: column name(s) {clash} are taken by the manifest or empty; rename them")
    by_path: dict[str, dict[str, str]] = {}
    for row in rows:
        key = str(row.get("path") or "").strip().replace("\\", "/")
        if key in by_path:
            raise UserError(f"{meta} lists '{key}' twice; keep one row per image")
        by_path[key] = {c: str(row.get(c) or "").strip() for c in columns}
    known = {item.source_path for item in items}
    unmatched = sorted(set(by_path) - known)
    if unmatched:
        log.warning(
            "%s: %d row(s) name no image in the folder (ignored): %s",
            meta,
            len(unmatched),
            ", ".join(unmatched[:5]),
        )
    empty = dict.fromkeys(columns, "")
    out = [
        SourceItem(item.source_path, item.label, item.read, {**empty, **by_path.get(item.source_path, {})})
        for item in items
    ]
    log.info(
        "%s: %d column(s) (%s) for %d of %d images",
        meta,
        len(columns),
        ", ".join(columns),
        len(known & set(by_path)),
        len(items),
    )
    return out, columns


# --------------------------------------------------------------------------- Fashion-MNIST
def _idx_file(root: Path, stem: str) -> Path:
    for candidate in (root / stem, root / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    raise UserError(
        f"Fashion-MNIST file {stem}[.gz] not found in '{root}'; install the Debian package "
        "with `apt-get install dataset-fashion-mnist`, or set data.source to "
        "'fashion-mnist:<folder with the idx files>'"
    )


def read_idx(path: Path) -> np.ndarray:
    """Read an idx file (optionally gzip-compressed) into an array of uint8."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            data = handle.read()
    except (OSError, EOFError) as exc:
        raise UserError(f"cannot read '{path}' ({exc}); reinstall dataset-fashion-mnist") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise UserError(f"'{path}' is not an idx file of unsigned bytes")
    ndim = data[3]
    if len(data) < 4 + 4 * ndim:
        raise UserError(f"'{path}' is truncated: its header is incomplete")
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    payload = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if payload.size != int(np.prod(dims)):
        raise UserError(f"'{path}' is truncated: expected {int(np.prod(dims))} values, found {payload.size}")
    return payload.reshape(dims)


def list_fashion_mnist(root: Path) -> SourceListing:
    if not root.is_dir():
        raise UserError(
            f"Fashion-MNIST folder '{root}' does not exist; install it with "
            "`apt-get install dataset-fashion-mnist` or set data.source to 'fashion-mnist:<dir>'"
        )
    items = []
    for part, prefix in (("train", "train"), ("test", "t10k")):
        images = read_idx(_idx_file(root, f"{prefix}-images-idx3-ubyte"))
        labels = read_idx(_idx_file(root, f"{prefix}-labels-idx1-ubyte"))
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise UserError(f"Fashion-MNIST {part} files in '{root}' do not match each other")
        if labels.size and labels.max() >= len(FASHION_MNIST_CLASSES):
            raise UserError(f"Fashion-MNIST {part} labels in '{root}' go past 9")
        for index, (pixels, label) in enumerate(zip(images, labels, strict=True)):
            items.append(
                SourceItem(
                    source_path=f"{part}/{index:05d}",
                    label=FASHION_MNIST_CLASSES[int(label)],
                    read=lambda p=pixels: encode_png(Image.fromarray(p)),
                    extra={"source_set": part, "source_index": index},
                )
            )
    return SourceListing(
        items=items, extra_columns=("source_set", "source_index"), classes=FASHION_MNIST_CLASSES
    )
