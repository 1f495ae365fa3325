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


def run_params(cwd, *extra):
    return subprocess.run(
        [sys.executable, "-m", "synermix.cli", "params", *extra],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
    )


def test_params_shows_the_tuned_values_train_will_use_and_marks_them(tmp_path):
    import yaml

    (tmp_path / "params.yaml").write_text("train: {beta: 0.3, lr: 0.05}\n")
    before = run_params(tmp_path)
    assert before.returncode == 0, before.stderr
    assert before.stdout.startswith("# tune.enabled: train will use the tuned values")
    assert "  beta: 0.3\n" in before.stdout

    (tmp_path / "tuning").mkdir()
    (tmp_path / "tuning" / "best_params.yaml").write_text(
        yaml.safe_dump({"tuned": True, "study": "s1", "best_trial": 8, "params": {"beta": 0.47, "lr": 0.01}})
    )
    after = run_params(tmp_path)
    assert after.returncode == 0, after.stderr
    out = after.stdout
    assert out.splitlines()[0].startswith("# train.beta, train.lr come from tuning/best_params.yaml")
    assert "study s1, trial 8" in out.splitlines()[0]
    assert (
        "  beta: 0.47  # tuned; params.yaml: 0.3\n" in out
        and "  lr: 0.01  # tuned; params.yaml: 0.05\n" in out
    )
    assert "  momentum: 0.9\n" in out  # untouched keys stay unmarked
    assert yaml.safe_load(out)["train"]["beta"] == 0.47  # still YAML

    (tmp_path / "params.yaml").write_text("tune: {enabled: false}\ntrain: {method: erm, beta: 0.3}\n")
    off = run_params(tmp_path).stdout
    assert "  beta: 0.3\n" in off and "# tuned" not in off and not off.startswith("#")  # tune off: no overlay
