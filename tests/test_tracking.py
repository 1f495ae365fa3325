"""The tracking layer's refusals, through the real CLI on real SQLite files: a store that
is not there (a relative URI run from another folder), one that is not a database, and
one another process holds locked."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from synermix.errors import UserError
from synermix.tracking import require_store, sqlite_file, store_errors

# shells out (make test-unit leaves these out)
pytestmark = pytest.mark.integration


def synermix(*args: str, cwd: Path, uri: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    if uri:
        env["MLFLOW_TRACKING_URI"] = uri
    return subprocess.run(
        [sys.executable, "-m", "synermix.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_relative_store_read_from_another_folder_is_refused_not_created(tmp_path):
    (tmp_path / "params.yaml").write_text("seed: 123\n")  # mlflow.tracking_uri: sqlite:///mlflow.db
    elsewhere = tmp_path / "reports"
    elsewhere.mkdir()
    (elsewhere / "params.yaml").write_text("seed: 123\n")
    for command in (["status"], ["rollback", "production"], ["bundle", "--out", "b"]):
        proc = synermix(*command, cwd=elsewhere)
        assert proc.returncode == 2, proc.stderr
        assert (
            f"no MLflow store at {elsewhere / 'mlflow.db'}" in proc.stderr and "Traceback" not in proc.stderr
        )
        assert len(proc.stderr.strip().splitlines()) == 1
    assert not (elsewhere / "mlflow.db").exists()  # nothing created behind the user's back
    proc = synermix("serve", "--model", "models:/synermix@production", cwd=elsewhere)
    assert proc.returncode == 2 and "no MLflow store at" in proc.stderr


def test_a_file_that_is_not_a_database_is_one_line(tmp_path):
    (tmp_path / "params.yaml").write_text("seed: 123\n")
    (tmp_path / "mlflow.db").write_bytes(b"this is not a database, it only has the name of one" * 100)
    proc = synermix("status", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "cannot be used (file is not a database)" in proc.stderr and "Traceback" not in proc.stderr


def test_a_locked_store_is_one_line(tmp_path):
    """Another process (here this test) holds the SQLite file locked for writing."""
    (tmp_path / "params.yaml").write_text("seed: 123\n")
    created = synermix("status", cwd=tmp_path, uri=f"sqlite:///{tmp_path / 'made.db'}")
    assert created.returncode == 2  # absent: refused, so make the store with MLflow itself
    from mlflow.tracking import MlflowClient

    MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}").search_experiments()
    holder = sqlite3.connect(tmp_path / "mlflow.db")
    holder.execute("BEGIN EXCLUSIVE")
    try:
        proc = synermix("promote", "pilot", "--version", "1", "--reason", "locked test", cwd=tmp_path)
    finally:
        holder.rollback()
        holder.close()
    assert proc.returncode == 2, proc.stderr
    assert "database is locked" in proc.stderr and "Traceback" not in proc.stderr


def test_store_helpers():
    assert sqlite_file("sqlite:///mlflow.db") == Path("mlflow.db")
    assert sqlite_file("sqlite:////abs/m.db?timeout=5") == Path("/abs/m.db")
    assert sqlite_file("http://mlflow:5000") is None
    require_store("http://mlflow:5000")  # not a file: nothing to check
    with pytest.raises(UserError, match="no MLflow store at"):
        require_store("sqlite:////nonexistent/folder/mlflow.db")
    with pytest.raises(ValueError, match="other errors pass"), store_errors("sqlite:///x.db"):
        raise ValueError("other errors pass")
