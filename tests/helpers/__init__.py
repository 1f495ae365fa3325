"""Test helpers that are not fixtures: image factories, a small prepared ELPV subset, and
training from rows in one call (tests/helpers/registry.py: a project ready to register and
the staged rollout flow)."""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[2]


def noise_image(seed: int, size: tuple[int, int] = (32, 32), mode: str = "L") -> Image.Image:
    """A random, well-exposed picture (unique per seed)."""
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
    return Image.fromarray(rng.integers(20, 236, size=shape, dtype=np.uint8))


def png_bytes(image: Image.Image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **kwargs)
    return buffer.getvalue()


def huge_png_header(width: int, height: int) -> bytes:
    """A tiny PNG file whose header declares ``width`` x ``height`` pixels (a 'bomb')."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def prepare_elpv(out: Path, seed: int, max_per_class: int, image_size: int) -> Path:
    """A class-capped ELPV subset prepared into ``out`` (the real cells the package ships)."""
    from synermix.config import SourceSpec
    from synermix.data.prepare import prepare_dataset

    prepare_dataset(
        SourceSpec("elpv"),
        out,
        seed=seed,
        split={"train": 0.6, "val": 0.2, "test": 0.2},
        max_per_class=max_per_class,
        image_size=image_size,
    )
    return out


def fit(
    train: Any, val: Any, root: Path, names: Sequence[str], params: Any, seed: int, **options: Any
) -> Any:
    """``train_model`` on rows: load the images, then train (what the train stage does)."""
    from synermix.training import load_training_data, train_model

    return train_model(load_training_data(train, val, root, names, params), names, params, seed, **options)
