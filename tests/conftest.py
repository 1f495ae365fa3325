"""Shared fixtures: image factories, tiny folder datasets, params built in code.

Every test writes under ``tmp_path``; nothing touches the project's own data/ or reports/.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from synermix.config import Params, parse_params

REPO_ROOT = Path(__file__).resolve().parents[1]


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


@pytest.fixture
def make_dataset(tmp_path: Path) -> Callable[..., Path]:
    """Build ``tmp_path/photos/<class>/<n>.png`` with healthy random images."""

    def build(classes: dict[str, int] | None = None, mode: str = "L") -> Path:
        root = tmp_path / "photos"
        classes = classes or {"scratch": 20, "crack": 20, "ok": 20}
        seed = 0
        for label, count in classes.items():
            (root / label).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                seed += 1
                noise_image(seed, mode=mode).save(root / label / f"img{i:03d}.png")
        return root

    return build


@pytest.fixture
def make_params() -> Callable[..., Params]:
    """Params from the defaults plus nested overrides, e.g. ``make_params(data={...})``."""

    def build(**sections) -> Params:
        return parse_params(sections)

    return build
