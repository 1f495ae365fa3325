"""The `synermix` command itself: its version line."""

import subprocess
import sys
from importlib.metadata import version

import synermix


def test_version_names_synermix_and_its_packages_and_exits_0():
    proc = subprocess.run(
        [sys.executable, "-m", "synermix.cli", "--version"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.strip()
    assert line.startswith(f"synermix {synermix.__version__} (") and "\n" not in line
    for name in ("torch", "onnxruntime-gpu", "mlflow", "dvc", "optuna", "great-expectations"):
        assert f"{name} {version(name)}" in line
