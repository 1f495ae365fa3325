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


@pytest.fixture
def train_project(tmp_path, make_dataset, make_params, monkeypatch):
    """Factory: a prepared folder dataset (``counts`` images per class) and a model trained
    on it for one epoch, MLflow in ``tmp_path``; returns the raw params sections used."""
    from synermix.stages import run_prepare, run_train

    def build(counts: dict[str, int], experiment: str, **sections) -> dict:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
        monkeypatch.chdir(tmp_path)  # MLflow's default artifact root is relative to the working folder
        raw = {
            "data": {"source": f"folder:{make_dataset(counts)}"},
            "train": {"image_size": 32, "epochs": 1, "batch_size": 16, "warmup_epochs": 0.5},
            "tune": {"enabled": False},
            "mlflow": {"experiment": experiment},
            **sections,
        }
        params = make_params(**raw)
        run_prepare(params, tmp_path)
        run_train(params, tmp_path)
        return raw

    return build


@pytest.fixture(scope="session")
def postgres_url(tmp_path_factory) -> str:
    """A real PostgreSQL server on loopback for this test session (Debian ``postgresql``).

    Skipped when the server binaries are missing, unless SYNERMIX_REQUIRE_POSTGRES is set
    (CI sets it, so there the test cannot silently skip). As root, the server runs as the
    ``postgres`` user, since PostgreSQL refuses to run as root.
    """
    import glob
    import os
    import shutil
    import socket
    import subprocess
    import tempfile

    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        message = "PostgreSQL server binaries not found (apt-get install postgresql)"
        if os.environ.get("SYNERMIX_REQUIRE_POSTGRES"):
            pytest.fail(message)
        pytest.skip(message)
    bin_dir = Path(found[-1]).parent
    as_user: list[str] = []
    data_dir = Path(tempfile.mkdtemp(prefix="synermix-pg-"))
    if os.geteuid() == 0:
        as_user = ["runuser", "-u", "postgres", "--"]
        shutil.chown(data_dir, "postgres")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    pgdata = data_dir / "data"

    def run(*args: str) -> None:
        subprocess.run([*as_user, *args], check=True, capture_output=True, text=True)

    run(str(bin_dir / "initdb"), "-D", str(pgdata), "-A", "trust", "-U", "synermix", "--no-sync")
    options = f"-c listen_addresses=127.0.0.1 -p {port} -k {data_dir} -c fsync=off"
    run(str(bin_dir / "pg_ctl"), "-D", str(pgdata), "-o", options, "-l", str(data_dir / "log"), "-w", "start")
    try:
        run(str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "synermix", "tuning")
        yield f"postgresql://synermix@127.0.0.1:{port}/tuning"
    finally:
        subprocess.run(
            [*as_user, str(bin_dir / "pg_ctl"), "-D", str(pgdata), "-m", "immediate", "stop"],
            capture_output=True,
        )
        shutil.rmtree(data_dir, ignore_errors=True)
