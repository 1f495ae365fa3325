"""MLflow runs: where they go, and flattening params for logging.

The tracking URI comes from ``MLFLOW_TRACKING_URI`` when set, else ``mlflow.tracking_uri``
in params.yaml (default: a SQLite file in the project root; MLflow 3.17 refuses the old
file store). Later issues grow this into parent/child runs per ``dvc repro``.
"""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from synermix.config import MlflowParams

log = logging.getLogger(__name__)


def tracking_uri(params: MlflowParams) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or params.tracking_uri


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists become strings)."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value if isinstance(value, int | float | str | bool) or value is None else str(value)
    return flat


def git_state() -> dict[str, str]:
    """The commit and whether the work tree has uncommitted changes ('' outside git)."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return {"git_commit": "", "git_dirty": ""}
    return {"git_commit": commit.strip(), "git_dirty": str(bool(dirty.strip())).lower()}


@contextmanager
def mlflow_run(params: MlflowParams, run_name: str, tags: Mapping[str, str] | None = None) -> Iterator[Any]:
    """Start (and end) an MLflow run in the configured store and experiment."""
    import mlflow

    for noisy in ("mlflow", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    mlflow.set_tracking_uri(tracking_uri(params))
    mlflow.set_experiment(params.experiment)
    with mlflow.start_run(run_name=run_name, tags={**git_state(), **(tags or {})}) as run:
        log.info("MLflow run %s in %s", run.info.run_id, tracking_uri(params))
        yield run
