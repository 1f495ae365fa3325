"""Shared fixtures: tiny folder datasets, params built in code, a trained project, a model
registry with hand-tagged versions, real PostgreSQL / MLflow servers (helpers that are not
fixtures live in tests/helpers/).

Every test writes under ``tmp_path``; nothing touches the project's own data/ or reports/.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from synermix.config import Params, parse_params

from .helpers import noise_image


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
    on it for one epoch, MLflow in ``tmp_path`` (or at ``tracking_uri``); returns the raw
    params sections used."""
    from synermix.stages.prepare import run_prepare
    from synermix.stages.train import run_train

    def build(counts: dict[str, int], experiment: str, tracking_uri: str | None = None, **sections) -> dict:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri or f"sqlite:///{tmp_path / 'mlflow.db'}")
        monkeypatch.chdir(tmp_path)  # MLflow's default artifact root is relative to the working folder
        raw = {
            "data": {"source": f"folder:{make_dataset(counts)}"},
            # one epoch of three steps on noise: with the default recipe the eval-mode logits
            # (BatchNorm running statistics from three steps) reach 1e3-1e29, past what the 1e-4
            # ONNX parity check can compare; the reference beta/alpha on the 64-channel network
            # with a plain shuffle keep them near 1
            "train": {
                "image_size": 32,
                "epochs": 1,
                "batch_size": 16,
                "warmup_epochs": 0.5,
                "beta": 0.1,
                "mixup_alpha": 1.0,
                "width": None,
                "sampling": "shuffle",
            },
            "tune": {"enabled": False},
            "mlflow": {"experiment": experiment},
            **sections,
        }
        params = make_params(**raw)
        run_prepare(params, tmp_path)
        run_train(params, tmp_path)
        return raw

    return build


@pytest.fixture
def fake_registry(tmp_path, monkeypatch):
    """A registry with versions whose tags a test sets (no training): the policy checks.

    Returns (params, client, add, tracking uri); ``add(gates_passed="true", gate__x="FAIL")``
    registers a version with those tags (``__`` becomes ``.``) and returns its number. The
    version names an evaluate run and an export run that agree with its tags, as the
    register stage's versions do (:mod:`synermix.evidence` re-reads them);
    ``add(runs=False, ...)`` registers one whose tags no run backs (forged)."""
    import mlflow

    from synermix import registry
    from synermix.tracking import client, experiment_id, using_store

    from .helpers.registry import PILOT_GATES, back_with_runs

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    params = parse_params({"mlflow": {"experiment": "fake"}, "registry": {"production_gates": PILOT_GATES}})
    c = client(uri)
    registry.ensure_model(c, "synermix")
    experiment = experiment_id(c, params.mlflow)
    (tmp_path / "weights.txt").write_text("not a model")

    def add(runs: bool = True, **tags) -> str:
        tags = {key.replace("__", "."): value for key, value in tags.items()}
        with using_store(uri), mlflow.start_run(experiment_id=experiment) as run:
            mlflow.log_artifact(str(tmp_path / "weights.txt"), artifact_path="model")
        mv = c.create_model_version("synermix", f"{run.info.artifact_uri}/model", run.info.run_id)
        if runs:
            tags = back_with_runs(c, uri, experiment, "synermix", str(mv.version), tags)
        for key, value in tags.items():
            c.set_model_version_tag("synermix", mv.version, key, value)
        return str(mv.version)

    return params, c, add, uri


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


@pytest.fixture(scope="session")
def mlflow_server(postgres_url: str, tmp_path_factory) -> str:
    """A real ``mlflow server`` for this test session; yields its tracking URI.

    Backend and model registry: a fresh ``mlflow`` database on the PostgreSQL server of
    ``postgres_url`` (MLflow creates/migrates the schema on first start). Artifacts: served
    by the server itself (``--serve-artifacts``; new experiments get ``mlflow-artifacts:/``
    locations, stored under a temp folder), so clients never need file access to them.
    The server's output goes to ``<tmp>/mlflow-server/server.log``.

    MLflow 3.x runs uvicorn with a security middleware (Host-header check against
    DNS rebinding, CORS blocking of cross-origin writes). Its defaults already accept
    ``Host: 127.0.0.1:<port>`` and requests without an ``Origin`` header (the Python client
    sends none), so it stays enabled here: no ``--allowed-hosts`` or
    ``--disable-security-middleware`` is needed.
    """
    from urllib.parse import urlsplit

    import psycopg

    from .helpers.mlflow_server import running_mlflow_server

    server_url = urlsplit(postgres_url)
    with psycopg.connect(postgres_url, autocommit=True) as conn:  # CREATE DATABASE needs autocommit
        conn.execute("CREATE DATABASE mlflow")
    backend_uri = f"postgresql+psycopg://{server_url.netloc}/mlflow"
    with running_mlflow_server(tmp_path_factory.mktemp("mlflow-server"), backend_uri) as uri:
        yield uri
