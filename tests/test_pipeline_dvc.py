"""dvc.yaml: static checks, and real `dvc repro` in a temporary git repo on real ELPV images."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from synermix.config import Params

from .helpers import REPO_ROOT

DVC = Path(sys.executable).with_name("dvc")
STAGES = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]


def _param_exists(dotted: str) -> bool:
    node: object = Params
    for part in dotted.split("."):
        fields = {(f.alias or name): f for name, f in node.model_fields.items()}  # type: ignore[attr-defined]
        if part not in fields:
            return False
        node = fields[part].annotation
    return True


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_deps_exist_and_params_are_real_keys(stage):
    spec = STAGES[stage]
    for dep in spec["deps"]:
        produced = any(
            dep == out or dep.startswith(f"{out}/")
            for other in STAGES.values()
            for entry in other.get("outs", []) + other.get("metrics", [])
            for out in (entry if isinstance(entry, str) else next(iter(entry)),)
        )
        assert produced or (REPO_ROOT / dep).exists(), f"{stage}: dependency {dep} does not exist"
    script = spec["cmd"].split()[-1]
    assert script in spec["deps"], f"{stage} must depend on its own script"
    for key in spec["params"]:
        assert _param_exists(key), f"{stage}: params key {key} is not in synermix.config.Params"


def run(cmd, cwd, env, check=True):
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture
def project(tmp_path):
    """A copy of the pipeline in a fresh git + DVC repo, importing the copied src/."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("dvc.yaml", "params.yaml", "requirements.lock", ".gitignore"):
        shutil.copy(REPO_ROOT / name, repo / name)
    for name in ("pipeline", "src", "data/raw"):  # data/raw: the photo folder prepare watches
        shutil.copytree(
            REPO_ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
        )
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": str(repo / "src"),
        "DVC_NO_ANALYTICS": "1",
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.com",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.com",
    }
    run(["git", "init", "-q"], repo, env)
    run([str(DVC), "init", "-q"], repo, env)
    run([str(DVC), "config", "core.analytics", "false"], repo, env)
    return repo, env


def set_params(repo: Path, **changes) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for dotted, value in changes.items():
        node = params
        *parents, leaf = dotted.split("__")
        for part in parents:
            node = node[part]
        node[leaf] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def ran(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")}


def check_lineage(repo: Path, env: dict) -> None:
    """One pipeline run for the repro, a child per stage, trials under tune, and a registered
    version that leads back to all of them."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    (experiment,) = [e.experiment_id for e in client.search_experiments() if e.name == "synermix"]
    (parent,) = client.search_runs([experiment], "tags.synermix_role = 'pipeline'")
    children = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    by_stage = {r.data.tags["stage"]: r for r in children}
    assert set(by_stage) == {"prepare", "validate", "tune", "train", "evaluate", "export", "register"}
    tags = parent.data.tags
    assert set(tags["stages_ran"].split(",")) == set(by_stage)
    assert parent.info.status == "FINISHED" and parent.data.params["train.epochs"] == "2"
    # the verdict (gates not enforced here) and the training values train really used
    assert parent.info.run_name.startswith("dvc repro: ") and parent.data.tags["mlflow.note.content"]
    assert {"test_accuracy", "test_macro_recall", "gates_passed"} <= set(parent.data.metrics)
    tuned = yaml.safe_load((repo / "tuning/best_params.yaml").read_text())
    assert float(parent.data.params["train.beta"]) == pytest.approx(tuned["params"]["beta"])
    head = run(["git", "rev-parse", "HEAD"], repo, env).stdout.strip()
    assert tags["git_commit"] == head and tags["git_dirty"] in ("true", "false")
    assert {f"dvc_lock.{s}" for s in ("prepare", "validate", "tune", "train", "evaluate", "export")} <= set(
        tags
    )
    assert tags["run.train"] == by_stage["train"].info.run_id
    for stage, child in by_stage.items():
        assert child.data.tags["git_commit"] == head and child.data.tags["manifest_sha256"], stage
        assert child.data.tags["pipeline_run_id"] == parent.info.run_id
    assert by_stage["evaluate"].data.tags["dvc_lock.train"] == tags["dvc_lock.train"]
    trials = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{by_stage['tune'].info.run_id}'")
    assert len(trials) == 2
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "pipeline")}
    assert {"pipeline/params.yaml", "pipeline/dvc.yaml", "pipeline/dvc.lock"} <= artifacts
    assert client.list_artifacts(by_stage["validate"].info.run_id, "validation")
    assert any(
        a.path.endswith(".onnx") for a in client.list_artifacts(by_stage["export"].info.run_id, "onnx")
    )
    version = client.get_model_version("synermix", "1")
    assert version.run_id == by_stage["register"].info.run_id
    assert version.tags["pipeline_run_id"] == parent.info.run_id
    for stage in ("train", "evaluate", "export", "tune"):
        assert version.tags[f"{stage}_run_id"] == by_stage[stage].info.run_id, stage
    aliases = client.get_registered_model("synermix").aliases
    assert {k: str(v) for k, v in aliases.items()} == {"candidate": "1"}
    assert json.loads((repo / "reports/register.json").read_text())["version"] == "1"


@pytest.mark.slow
@pytest.mark.integration
def test_dvc_repro_on_real_elpv_subset(project):
    repo, env = project
    set_params(
        repo,
        data__max_per_class=15,
        data__image_size=64,
        train__epochs=2,
        train__image_size=32,
        train__batch_size=16,
        tune__n_trials=2,
        tune__epochs=2,
        tune__max_per_class=8,
        tune__startup_trials=1,
        # a 2-epoch model on 60 images: no thresholds (the gates are checked at the end), so it
        # is registered
        gates__enforce=False,
        gates__min_accuracy=None,
        gates__min_macro_recall=None,
        gates__min_class_recall=None,
        gates__max_recall_spread=None,
        gates__max_intra_class_variance=None,
        gates__max_ece=None,
        gates__beat_majority=False,
        gates__max_escape_rate=None,
        gates__max_overkill_rate=None,
        gates__max_review_rate=None,
        gates__max_slice_accuracy_gap=None,
    )
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-qm", "init"], repo, env)

    first = run([str(DVC), "repro"], repo, env)
    everything = {"prepare", "validate", "tune", "train", "evaluate", "export", "register"}
    assert ran(first.stdout) == everything
    check_lineage(repo, env)
    tuned = yaml.safe_load((repo / "tuning/best_params.yaml").read_text())
    assert tuned["tuned"] and json.loads((repo / "reports/tune.json").read_text())["trials"] == 2
    meta = json.loads((repo / "models/model/model.json").read_text())
    assert meta["beta"] == tuned["params"]["beta"]  # train used the tuned beta
    manifest = (repo / "data/prepared/manifest.csv").read_text().splitlines()
    assert len(manifest) == 1 + 60 and "cell_type" in manifest[0]
    assert (repo / "reports/validation.md").read_text().startswith("# Data validation report")
    assert (repo / "dvc.lock").is_file()
    assert (repo / "models/model/weights.pt").is_file() and (repo / "mlflow.db").is_file()
    assert json.loads((repo / "reports/train.json").read_text())["epochs"] == 2
    plots = run([str(DVC), "plots", "show", "--json"], repo, env).stdout
    assert '"Training loss"' in plots and '"Training scores (val)"' in plots  # apart
    assert "reports/evaluation/predictions.csv" in plots
    # every plot also as a PNG (the HTML page's charts need a CDN): the losses and scores apart
    for png in ("train/loss", "train/scores", "tune/beta_vs_objective", "evaluation/confusion"):
        assert f"reports/{png}.png" in plots and (repo / f"reports/{png}.png").stat().st_size > 1000, png
    # one small headline file is the only DVC metric
    shown = json.loads(run([str(DVC), "metrics", "show", "--json"], repo, env).stdout)[""]["data"]
    assert set(shown) == {"reports/metrics.json"}
    headline = shown["reports/metrics.json"]["data"]
    assert 10 <= len(headline) <= 15 and headline["train_beta"] == pytest.approx(
        tuned["params"]["beta"], abs=1e-6
    )
    evaluation = json.loads((repo / "reports/evaluation.json").read_text())
    test_images = sum(",test," in line for line in manifest)
    assert evaluation["test"]["images"] == test_images > 0 and evaluation["enforced"] is False
    exported = json.loads((repo / "reports/export.json").read_text())
    assert exported["parity"]["passed"] and (repo / "models/onnx/model.onnx").is_file()

    again = run([str(DVC), "repro"], repo, env)
    assert ran(again.stdout) == set() and "Data and pipelines are up to date" in again.stdout

    # one room per stage: a changed line in the export stage's module changes export alone
    # (register follows through export's outputs), and the re-exported file is the same
    export_code = repo / "src/synermix/stages/export.py"
    export_code.write_text(export_code.read_text() + "\n# a changed line\n")
    status = json.loads(run([str(DVC), "status", "--json"], repo, env).stdout)
    assert set(status) == {"export"}, status
    reran = ran(run([str(DVC), "repro"], repo, env).stdout)
    assert "export" in reran and reran <= {"export", "register"}
    assert json.loads(run([str(DVC), "status", "--json"], repo, env).stdout) == {}

    # validate's outputs do not change, so training is not redone
    set_params(repo, validate__rules__exposure__min_std=1.5)
    only_validate = run([str(DVC), "repro"], repo, env)
    assert ran(only_validate.stdout) == {"validate"}

    # train.lr is searched: tune reruns and finds its study complete (no new trial, the top
    # trials' re-runs stored); only params.yaml's new values, the baseline, are trained
    reruns = pd.read_csv(repo / "reports/tune/reruns.csv")
    set_params(repo, train__lr=0.03)
    retune = run([str(DVC), "repro"], repo, env)
    assert ran(retune.stdout) == {"tune", "train", "evaluate", "export", "register"}
    log = retune.stdout + retune.stderr
    assert "budget 2 trials" not in log  # no trial trained
    beta = yaml.safe_load((repo / "params.yaml").read_text())["train"]["beta"]
    baseline = f"params.yaml's values (beta={beta:.4g}, lr=0.03) with seed"
    assert all(f"re-run {i}/3: {baseline}" in log for i in (1, 2, 3)) and "4 stored" in log
    retuned = yaml.safe_load((repo / "tuning/best_params.yaml").read_text())
    assert retuned["study"] == tuned["study"]
    assert json.loads((repo / "reports/tune.json").read_text())["trials"] == 2
    now = pd.read_csv(repo / "reports/tune/reruns.csv")
    trials = ["trial", "rerun", "seed", "value", "beta", "lr"]
    assert now[now.trial >= 0][trials].equals(reruns[reruns.trial >= 0][trials])
    assert set(now[now.trial < 0].lr) == {0.03} and set(reruns[reruns.trial < 0].lr) == {0.02}
    if retuned["best_trial"] == -1:
        assert retuned["params"] == {"beta": beta, "lr": 0.03}
    else:  # the best mean of the trials' candidates, which have not changed
        assert retuned["mean"] == pytest.approx(now[now.trial >= 0]["mean"].max(), abs=1e-6)

    # only train.* keys that trials do not use leave tuning alone
    set_params(repo, train__epochs=1)
    assert ran(run([str(DVC), "repro"], repo, env).stdout) == {"train", "evaluate", "export", "register"}

    # two training processes under torchrun (gloo on this CPU): train and what follows rerun,
    # tuning does not (its trials run in one process whatever the launcher)
    set_params(repo, train__launcher="torchrun", train__nproc_per_node=2)
    distributed = run([str(DVC), "repro"], repo, env)
    assert ran(distributed.stdout) == {"train", "evaluate", "export", "register"}
    assert "torchrun with 2 processes" in distributed.stdout + distributed.stderr
    assert json.loads((repo / "models/model/model.json").read_text())["processes"] == 2
    assert json.loads((repo / "reports/export.json").read_text())["parity"]["passed"]
    set_params(repo, train__launcher="single")
    assert ran(run([str(DVC), "repro"], repo, env).stdout) == {"train", "evaluate", "export", "register"}

    # a larger trial budget continues the same study by one trial
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-qm", "tuned"], repo, env)
    before = (repo / "tuning/best_params.yaml").read_text()
    exp = run([str(DVC), "exp", "run", "-S", "tune.n_trials=3"], repo, env)
    # train and what follows rerun exactly when the choice changed: the top-k re-runs may
    # keep the same candidate, and then best_params.yaml is byte-identical
    downstream = {"train", "evaluate", "export", "register"}
    changed = (repo / "tuning/best_params.yaml").read_text() != before
    assert "tune" in ran(exp.stdout) and (downstream <= ran(exp.stdout)) == changed
    assert json.loads((repo / "reports/tune.json").read_text())["trials"] == 3
    assert "trial 2, budget 3 trials" in exp.stdout + exp.stderr
    assert "trial 0, budget" not in exp.stdout + exp.stderr  # trial 0 is not trained again

    # resizing rewrites the images but not the manifest, so validate has nothing new to check
    set_params(repo, data__image_size=48)
    assert ran(run([str(DVC), "repro"], repo, env).stdout) == everything - {"validate"}
    # the headline metrics: compared with the committed ones
    diff = json.loads(run([str(DVC), "metrics", "diff", "--all", "--json"], repo, env).stdout)
    accuracy = diff["reports/metrics.json"]["test_accuracy"]
    assert accuracy["old"] is not None and accuracy["new"] is not None

    set_params(repo, data__max_per_class=14)
    assert ran(run([str(DVC), "repro"], repo, env).stdout) == everything
    metrics = json.loads(run([str(DVC), "metrics", "show", "--json"], repo, env).stdout)
    prepared = json.loads((repo / "reports/prepare.json").read_text())
    assert prepared["images"] == 56 and prepared["classes"] == 4
    assert 0 <= metrics[""]["data"]["reports/metrics.json"]["data"]["test_accuracy"] <= 1

    # a photo in the watched folder re-runs the pipeline from prepare (the folder is a dep)
    (repo / "data/raw/note.txt").write_text("a new photo would land here\n")
    assert set(json.loads(run([str(DVC), "status", "--json"], repo, env).stdout)) == {"prepare"}
    (repo / "data/raw/note.txt").unlink()

    # a gate the model cannot meet: only evaluate reruns, dvc repro fails with the table, and
    # the model is not exported
    set_params(repo, gates__enforce=True, gates__min_accuracy=1.0)
    failed = run([str(DVC), "repro"], repo, env, check=False)
    assert failed.returncode != 0 and ran(failed.stdout) == {"evaluate"}
    output = failed.stdout + failed.stderr
    assert "evaluation gates failed" in output and "accuracy >= 1.0000" in output
    assert (repo / "reports/evaluation.md").read_text().startswith("# Evaluation: FAILED: min_accuracy")
    # the pipeline run of that repro carries the verdict in its name
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    (last,) = client.search_runs(
        [client.get_experiment_by_name("synermix").experiment_id],
        "tags.synermix_role = 'pipeline'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    assert last.info.run_name.startswith("dvc repro: gates FAILED (min_accuracy")
    assert last.data.tags["failed_gates"].startswith("min_accuracy") and last.info.status == "FAILED"


@pytest.mark.slow
@pytest.mark.integration
def test_dvc_repro_fails_on_a_bad_image_and_names_it(project, make_dataset):
    repo, env = project
    photos = make_dataset()
    (photos / "ok" / "zero.png").write_bytes(b"")
    set_params(repo, data__source=f"folder:{photos}")
    proc = run([str(DVC), "repro"], repo, env, check=False)
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    assert "validation rule 'decodable' failed" in output and "ok/zero.png" in output
    assert (photos / "ok" / "zero.png").exists()  # user data untouched
