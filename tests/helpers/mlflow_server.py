"""A real ``mlflow server`` on a free loopback port, for the fixtures that need one (the
session server on PostgreSQL in conftest.py, the auth server in tests/test_mlflow_auth.py)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def running_mlflow_server(
    root: Path,
    backend_uri: str,
    *,
    app_name: str | None = None,
    env: dict[str, str] | None = None,
    probe_api: bool = True,
) -> Iterator[str]:
    """Start ``mlflow server`` (artifacts served by it under ``root/artifacts``, output in
    ``root/server.log``), yield its URI once it answers, stop its whole process group after.

    ``env`` is added to this process's environment without its ``MLFLOW_*`` and
    ``SYNERMIX_*`` variables. ``probe_api``: also wait for an API call to answer 200 (not
    possible on a server that asks for credentials: there /health alone)."""
    (root / "artifacts").mkdir(parents=True, exist_ok=True)
    log_path = root / "server.log"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    command = [
        str(Path(sys.executable).parent / "mlflow"), "server",
        *(["--app-name", app_name] if app_name else []),
        "--backend-store-uri", backend_uri,
        "--serve-artifacts",
        "--artifacts-destination", str(root / "artifacts"),
        "--default-artifact-root", "mlflow-artifacts:/",
        "--host", "127.0.0.1",
        "--port", str(port),
        "--workers", "1",
    ]  # fmt: skip
    server_env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "SYNERMIX_"))}
    server_env.update(
        MLFLOW_DISABLE_TELEMETRY="true",  # no network from tests
        # no background job runner (huey consumer; GenAI evaluation jobs, trace rollups)
        MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
        **(env or {}),
    )

    def log_tail(lines: int = 60) -> str:
        return "\n".join(log_path.read_text(errors="replace").splitlines()[-lines:])

    def answers(path: str, data: bytes | None = None) -> bool:
        request = urllib.request.Request(uri + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def ready() -> bool:
        if not answers("/health"):
            return False
        return not probe_api or answers("/api/2.0/mlflow/experiments/search", b'{"max_results": 1}')

    with log_path.open("wb") as log_file:
        # its own session: `mlflow server` forks uvicorn, so stop the whole process group
        proc = subprocess.Popen(
            command,
            cwd=root,
            env=server_env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            start = time.monotonic()
            deadline = start + 120  # the first start creates the schema (~7 s here, more on slow machines)
            while not ready():
                if proc.poll() is not None:
                    pytest.fail(f"mlflow server exited with {proc.returncode}:\n{log_tail()}")
                if time.monotonic() > deadline:
                    pytest.fail(f"mlflow server not ready after 120 s:\n{log_tail()}")
                time.sleep(0.5)
            log_file.write(f"[running_mlflow_server] ready after {time.monotonic() - start:.1f} s\n".encode())
            log_file.flush()
            yield uri
        finally:
            # SIGTERM to the whole group (the CLI and its uvicorn child), SIGKILL what is left
            # after a few seconds; ProcessLookupError: the group is already gone
            with contextlib.suppress(ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=10)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
