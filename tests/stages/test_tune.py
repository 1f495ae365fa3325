"""The tune stage (synermix.stages.tune): real Optuna studies (SQLite and PostgreSQL), real
training, real MLflow; killed and parallel ``synermix tune`` workers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
import yaml
from optuna.trial import TrialState
from PIL import Image

from synermix import lineage, tracking
from synermix.config import Params, parse_params
from synermix.engine import load_checkpoint
from synermix.errors import CheckFailed
from synermix.paths import BEST_PARAMS, MODEL_DIR, TUNE_METRICS, TUNE_PLOTS_DIR, TUNE_REPORT, TUNE_STATE_DIR
from synermix.stages.prepare import run_prepare
from synermix.stages.train import apply_tuned, run_train
from synermix.stages.tune import run_tune
from synermix.stages.validate import run_validate
from synermix.training import load_trained_model
from synermix.tuning import ATTR_SURPLUS, RERUN_PREFIX, cap_train_rows, is_counted, rerun_seeds

# trains a model, starts a server or shells out (make test-unit leaves these out)
pytestmark = pytest.mark.integration

#: columns of trials.csv that must repeat exactly for the same params and data on CPU
STABLE = ["trial", "state", "value", "last_reported", "beta", "lr", "epochs_used"]


def learnable_photos(root: Path, per_class: int = 24) -> Path:
    """Three classes that differ in brightness and texture, so trials really differ."""
    rng = np.random.default_rng(7)
    for k, label in enumerate(("bright", "dark", "striped")):
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            base = rng.normal(70 + 60 * (k == 0), 25, size=(24, 24))
            if label == "striped":
                base[:, ::4] += 70
            Image.fromarray(np.clip(base, 10, 245).astype(np.uint8)).save(root / label / f"{i:03d}.png")
    return root


def tune_params(photos: Path, **tune) -> Params:
    return parse_params(
        {
            "data": {"source": f"folder:{photos}"},
            "train": {"image_size": 16, "batch_size": 16, "warmup_epochs": 0.5, "epochs": 2},
            "tune": {
                "n_trials": 6,
                "epochs": 3,
                "max_per_class": 12,
                "startup_trials": 2,
                "heartbeat_seconds": 1,
                "grace_seconds": 3,
                **tune,
            },
            "mlflow": {"experiment": "tune-test"},
        }
    )


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A prepared and validated project folder; MLflow in a SQLite file inside it."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)
    photos = learnable_photos(tmp_path / "photos")
    params = tune_params(photos)
    run_prepare(params, tmp_path)
    run_validate(params, tmp_path)
    return tmp_path, photos


def load(root: Path, params: Params) -> optuna.Study:
    names = optuna.get_all_study_names(f"sqlite:///{root / TUNE_STATE_DIR / 'optuna.db'}")
    assert len(names) == 1
    return optuna.load_study(study_name=names[0], storage=f"sqlite:///{root / TUNE_STATE_DIR / 'optuna.db'}")


def test_same_seed_gives_the_same_trials_and_pruning_prunes(tmp_path, monkeypatch):
    tables, reruns = [], []
    for copy in ("a", "b"):
        root = tmp_path / copy
        root.mkdir()
        monkeypatch.chdir(root)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        halving = {"kind": "successive_halving", "min_epochs": 1, "reduction_factor": 3}
        params = tune_params(learnable_photos(root / "photos"), pruner=halving)
        run_prepare(params, root)
        run_validate(params, root)
        metrics = run_tune(params, root)
        tables.append(pd.read_csv(root / TUNE_PLOTS_DIR / "trials.csv"))
        reruns.append((root / TUNE_PLOTS_DIR / "reruns.csv").read_text())
    first, second = tables
    pd.testing.assert_frame_equal(first[STABLE], second[STABLE])
    # the re-runs (their seeds and values) repeat exactly too
    assert reruns[0] == reruns[1] and len(reruns[0].splitlines()) > 1
    # successive halving (rungs at epochs 1 and 3) stopped trials at its rungs, some early
    pruned = first[first["state"] == "pruned"]
    assert (pruned["epochs_used"] < 3).any() and pruned["epochs_used"].isin([1, 3]).all()
    assert metrics["trials"] == 6 and metrics["epochs_spent"] < metrics["epochs_without_pruning"]
    assert metrics["trials_complete"] + metrics["trials_pruned"] == 6
    assert first["beta"].between(0, 1).all() and first["lr"].between(0.01, 0.2).all()
    # in MLflow a pruned trial does not look finished: KILLED, and its name says pruned
    client = tracking.client(f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tune-test").experiment_id
    runs = client.search_runs([experiment], "tags.trial_state = 'pruned'")
    assert sorted(int(r.data.tags["optuna_trial"]) for r in runs) == sorted(pruned["trial"])
    assert {r.info.status for r in runs} == {"KILLED"}
    assert all(r.info.run_name == f"trial-{r.data.tags['optuna_trial']} (pruned)" for r in runs)
    complete = client.search_runs([experiment], "tags.trial_state = 'complete'")
    assert complete and {r.info.status for r in complete} == {"FINISHED"}


def test_tune_writes_best_params_that_train_uses_and_logs_every_trial(project, monkeypatch):

    root, photos = project
    params = tune_params(photos, rerun_top_k=0)  # today's choice: the single best trial
    metrics = run_tune(params, root)

    best = yaml.safe_load((root / BEST_PARAMS).read_text())
    assert best["tuned"] is True and set(best["params"]) == {"beta", "lr"}
    # rerun_top_k: 0 keeps the outputs as they were before re-runs existed
    assert set(best) == {"tuned", "study", "best_trial", "params"}
    assert not {"seed_spread", "chosen_mean", "chosen_trial"} & set(metrics)
    assert pd.read_csv(root / TUNE_PLOTS_DIR / "reruns.csv").empty
    assert "Seed spread" not in (root / TUNE_REPORT).read_text()
    assert not [k for k in load(root, params).user_attrs if k.startswith(RERUN_PREFIX)]
    table = pd.read_csv(root / TUNE_PLOTS_DIR / "trials.csv")
    winner = table.loc[table["trial"] == best["best_trial"]].iloc[0]
    assert winner["state"] == "complete" and winner["value"] == pytest.approx(table["value"].max())
    assert json.loads((root / TUNE_METRICS).read_text()) == metrics
    assert (metrics["epochs_per_trial"], metrics["trial_images"]) == (3, 36)
    assert metrics["best_value"] == pytest.approx(winner["value"], abs=1e-6)
    report = (root / TUNE_REPORT).read_text()
    assert "Short trials: 3 epochs on at most 12 training images per class (36 of" in report
    assert "the test split is never used" in report
    history = pd.read_csv(root / TUNE_PLOTS_DIR / "history.csv")
    assert history["best_so_far"].dropna().is_monotonic_increasing
    importances = pd.read_csv(root / TUNE_PLOTS_DIR / "importances.csv")
    assert set(importances["param"]) == {"beta", "lr"} and importances["importance"].sum() == pytest.approx(1)

    # the test split never reached tuning: the study saw only train and val images
    study = load(root, params)
    assert "manifest_sha256" in study.user_attrs

    monkeypatch.setenv(lineage.PIPELINE_KEY_ENV, "repro-tuned")  # train as dvc repro runs it
    run_train(params, root)
    _, meta = load_trained_model(root / MODEL_DIR)
    assert meta["beta"] == best["params"]["beta"] and meta["tuned"]["study"] == best["study"]

    client = tracking.client(f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tune-test").experiment_id
    parents = client.search_runs([experiment], "tags.synermix_role = 'tune'")
    assert len(parents) == 1
    parent = parents[0]
    assert parent.data.tags["optuna_study"] == best["study"] and parent.info.status == "FINISHED"
    children = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(int(r.data.tags["optuna_trial"]) for r in children) == list(range(6))
    child = next(r for r in children if r.data.tags["optuna_trial"] == str(best["best_trial"]))
    assert float(child.data.params["beta"]) == pytest.approx(best["params"]["beta"])
    assert child.data.metrics["value"] == pytest.approx(metrics["best_value"], abs=1e-6)
    assert [m.step for m in client.get_metric_history(child.info.run_id, "val_accuracy")] == [1, 2, 3]
    plots = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    figures = {"beta_vs_objective.png", "optimisation_history.png", "param_importances.png"}
    assert plots == {f"plots/{name}" for name in figures}
    train_run = client.get_run(meta["mlflow_run_id"])
    assert float(train_run.data.params["train.beta"]) == pytest.approx(best["params"]["beta"])
    # the pipeline run holds the values train used (the tuned ones), not params.yaml's
    pipeline = client.get_run(train_run.data.tags["pipeline_run_id"])
    for key in ("beta", "lr"):
        assert float(pipeline.data.params[f"train.{key}"]) == pytest.approx(best["params"][key]), key
    assert pipeline.data.params["train.epochs"] == "2"  # untuned keys as params.yaml has them
    assert (
        pipeline.data.tags["train_params_from"] == f"tune study {best['study']}, trial {best['best_trial']}"
    )

    # a rerun finds the study complete: no new trial, the same best values
    again = run_tune(params, root)
    assert again == metrics and len(load(root, params).trials) == 6
    # a larger budget continues the same study
    more = run_tune(tune_params(photos, n_trials=7, rerun_top_k=0), root)
    assert more["trials"] == 7 and len(load(root, params).trials) == 7


def test_tune_reruns_the_top_trials_and_reports_the_seed_spread(project, monkeypatch):

    from synermix import tuning

    root, photos = project
    # defaults: top 3, 2 more seeds; the choice on the mean alone (the baseline: next test)
    params = tune_params(photos, n_trials=4, pruner={"kind": "none"}, keep_baseline=False)
    seeds = rerun_seeds(params.seed, 2)
    real_train = tuning.train_model
    calls: list[tuple[int, bool]] = []  # (seed, is a re-run)
    crash_on_call = {"n": 2}

    def train_model(*args, **kwargs):
        rerun = kwargs.get("on_epoch_end") is None
        calls.append((args[3], rerun))  # (data, class_names, params, seed)
        if rerun and sum(r for _, r in calls) == crash_on_call["n"]:
            raise RuntimeError("killed during a re-run")
        return real_train(*args, **kwargs)

    monkeypatch.setattr(tuning, "train_model", train_model)
    with pytest.raises(RuntimeError, match="killed during a re-run"):
        run_tune(params, root)
    # trials train with the seed param, re-runs with the derived seeds
    assert [s for s, r in calls if not r] == [params.seed] * 4
    assert [s for s, r in calls if r] == seeds
    calls.clear()
    crash_on_call["n"] = -1
    metrics = run_tune(params, root)  # resumes: the trials and the first re-run are stored
    assert not [c for c in calls if not c[1]] and len(calls) == 3 * 2 - 1
    assert {s for s, _ in calls} == set(seeds)

    reruns = pd.read_csv(root / TUNE_PLOTS_DIR / "reruns.csv")
    trials = pd.read_csv(root / TUNE_PLOTS_DIR / "trials.csv")
    top3 = trials.sort_values(["value", "trial"], ascending=[False, True])["trial"].head(3).tolist()
    assert reruns.groupby("trial", sort=False).ngroups == 3 and set(reruns["trial"]) == set(top3)
    assert reruns.groupby("trial")["seed"].apply(list).map(lambda s: s == [params.seed, *seeds]).all()
    own = reruns[reruns["rerun"] == 0].set_index("trial")["value"]
    assert own.to_dict() == pytest.approx(trials.set_index("trial")["value"][top3].to_dict(), abs=1e-5)
    means = reruns.groupby("trial")["value"].mean()
    stds = reruns.groupby("trial")["value"].std(ddof=1)
    chosen = max(means.index, key=lambda t: (round(means[t], 5), -t))  # the csv has 6 digits
    assert reruns.loc[reruns["chosen"], "trial"].unique().tolist() == [chosen]

    best = yaml.safe_load((root / BEST_PARAMS).read_text())
    assert best["best_trial"] == chosen and best["chosen_on"] == "mean of 3 seeds"
    assert best["mean"] == pytest.approx(means[chosen], abs=1e-5)
    assert best["spread"] == pytest.approx(stds[chosen], abs=1e-5)
    assert best["seeds"] == [params.seed, *seeds]
    train_params, tuned = apply_tuned(params.train, root / BEST_PARAMS)
    assert train_params.beta == best["params"]["beta"] and tuned["best_trial"] == str(chosen)

    pooled = float(np.sqrt((stds**2).mean()))  # each candidate has 3 values
    saved = json.loads((root / TUNE_METRICS).read_text())
    assert saved == metrics and metrics["chosen_trial"] == chosen
    assert metrics["chosen_mean"] == pytest.approx(means[chosen], abs=1e-5)
    assert metrics["seed_spread"] == pytest.approx(pooled, abs=1e-5)
    assert metrics["best_trial"] == top3[0]  # the single best trial is still reported
    report = (root / TUNE_REPORT).read_text()
    assert f"**Chosen: trial {chosen}**" in report and "## Seed spread" in report
    assert f"Seed spread **{pooled:.4f}**" in report
    assert f"| trial | beta | lr | seed {params.seed} (trial) | seed {seeds[0]} | seed {seeds[1]} |" in report
    assert f"| **{chosen}** (chosen) |" in report

    client = tracking.client(f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tune-test").experiment_id
    (parent,) = client.search_runs([experiment], "tags.synermix_role = 'tune'")
    assert parent.data.metrics["seed_spread"] == pytest.approx(pooled, abs=1e-5)
    assert parent.data.metrics["chosen_trial"] == chosen
    assert parent.data.metrics["chosen_mean"] == pytest.approx(means[chosen], abs=1e-5)
    assert parent.data.tags["chosen_on"] == "mean of 3 seeds" and parent.data.tags["rerun_top_k"] == "3"
    assert float(parent.data.tags["best.beta"]) == pytest.approx(best["params"]["beta"])
    steps = {m.step for m in client.get_metric_history(parent.info.run_id, "rerun_mean")}
    assert steps == set(top3)
    children = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(int(r.data.tags["optuna_trial"]) for r in children) == [0, 1, 2, 3]  # trials only

    # complete study, every re-run stored: nothing trains, the outputs stay the same
    calls.clear()
    assert run_tune(params, root) == metrics and calls == []
    assert yaml.safe_load((root / BEST_PARAMS).read_text()) == best


def test_params_yaml_values_run_beside_the_top_trials_and_win_unless_beaten(project, monkeypatch):
    """keep_baseline (the default): params.yaml's beta and lr train on the trials' seed and
    the re-run seeds; train gets them unless the best mean beats theirs by more than the seed
    spread, and every output says which way it went and by how much."""
    from synermix import tuning

    root, photos = project
    params = tune_params(photos, n_trials=4, pruner={"kind": "none"})
    seeds = [params.seed, *rerun_seeds(params.seed, 2)]
    real_train = tuning.train_model
    baseline_runs = []

    def train_model(*args, **kwargs):
        if kwargs.get("on_epoch_end") is None and (args[2].beta, args[2].lr) == (0.3, 0.05):
            baseline_runs.append(args[3])
        return real_train(*args, **kwargs)

    monkeypatch.setattr(tuning, "train_model", train_model)
    metrics = run_tune(params, root)
    assert baseline_runs == seeds  # params.yaml's values on the same three seeds

    reruns = pd.read_csv(root / TUNE_PLOTS_DIR / "reruns.csv")
    base = reruns[reruns["trial"] == tuning.BASELINE]
    assert base["seed"].tolist() == seeds and set(base["beta"]) == {0.3} and set(base["lr"]) == {0.05}
    means = reruns.groupby("trial")["value"].mean()
    others = means.drop(tuning.BASELINE)
    best_other = max(others.index, key=lambda t: (round(others[t], 5), -t))
    stds = reruns.groupby("trial")["value"].std(ddof=1)
    spread = float(np.sqrt((stds**2).mean()))
    gap = others[best_other] - means[tuning.BASELINE]
    expected = best_other if gap > spread else tuning.BASELINE
    best = yaml.safe_load((root / BEST_PARAMS).read_text())
    assert best["best_trial"] == expected and metrics["chosen_trial"] == expected
    assert metrics["baseline_kept"] is (expected == tuning.BASELINE)
    assert metrics["margin_over_baseline"] == pytest.approx(gap, abs=1e-5)
    assert metrics["seed_spread"] == pytest.approx(spread, abs=1e-5) and metrics["rerun_candidates"] == 3
    verdict = "kept" if expected == tuning.BASELINE else "beaten"
    assert f"params.yaml's values {verdict}: the best trial's mean is {gap:+.4f}" in best["chosen_on"]
    report = (root / TUNE_REPORT).read_text()
    assert "| **params.yaml** (chosen) |" in report or "| params.yaml |" in report
    if expected == tuning.BASELINE:
        assert "**Kept params.yaml's values**" in report and best["params"] == {"beta": 0.3, "lr": 0.05}
        train_params, _ = apply_tuned(params.train, root / BEST_PARAMS)
        assert (train_params.beta, train_params.lr) == (0.3, 0.05)
    # stored: a second run trains nothing
    baseline_runs.clear()
    assert run_tune(params, root) == metrics and baseline_runs == []


def test_disabled_tuning_leaves_train_params_as_written(project):
    root, photos = project
    params = tune_params(photos, enabled=False)
    run_tune(params, root)
    assert yaml.safe_load((root / BEST_PARAMS).read_text())["tuned"] is False
    train, tuned = apply_tuned(params.train, root / BEST_PARAMS)
    assert train == params.train and tuned == {}


def test_no_completed_trial_fails_with_the_states(project, monkeypatch):
    root, photos = project
    params = tune_params(photos, n_trials=1)
    from synermix import tuning

    def always_pruned(self, trial):
        raise optuna.TrialPruned()

    monkeypatch.setattr(tuning.Tuner, "objective", always_pruned)
    with pytest.raises(CheckFailed, match=r"no trial of study .* completed \({'pruned': 1}\)"):
        run_tune(params, root)


def _write_params_file(root: Path, params: Params) -> Path:
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(params.model_dump(mode="json", by_alias=True)))
    return path


def _tune_process(root: Path, *extra: str, gpu: str | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if gpu is not None:  # one worker per GPU, as docs/tuning.md shows (a CPU host ignores it)
        env["CUDA_VISIBLE_DEVICES"] = gpu
    return subprocess.Popen(
        [sys.executable, "-m", "synermix.cli", "tune", *extra],
        cwd=root,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_kill_during_a_trial_then_resume_keeps_finished_trials_and_the_budget(project):
    root, photos = project
    # eight epochs, and the kill lands between the third and the sixth: a window of four
    # epochs that the poll below cannot miss, and the dead worker's last checkpoint is then
    # of an unfinished trial even when a loaded host stretches the poll
    params = tune_params(photos, n_trials=4, epochs=8, pruner={"kind": "none"})
    _write_params_file(root, params)
    storage = f"sqlite:///{root / TUNE_STATE_DIR / 'optuna.db'}"
    worker = _tune_process(root)
    victim = None
    deadline = time.monotonic() + 240
    while victim is None and time.monotonic() < deadline and worker.poll() is None:
        time.sleep(0.3)
        try:
            study = optuna.load_study(study_name=optuna.get_all_study_names(storage)[0], storage=storage)
        except (IndexError, KeyError, Exception):
            continue
        trials = study.get_trials()
        done = [t for t in trials if t.state == TrialState.COMPLETE]
        running = [t for t in trials if t.state == TrialState.RUNNING and 2 <= len(t.intermediate_values) < 6]
        if done and running:
            victim = running[0]
    assert victim is not None, worker.stderr.read() if worker.poll() is not None else "no trial reached"
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    (left,) = (root / TUNE_STATE_DIR / "trials").rglob("*.pt")  # the dead trial's checkpoint
    left_at = int(load_checkpoint(left)["epoch"])
    assert 2 <= left_at < params.tune.epochs
    finished_before = {
        t.number: (t.params, t.value) for t in study.get_trials() if t.state == TrialState.COMPLETE
    }

    metrics = run_tune(params, root)  # waits out the dead worker's heartbeat, then retries its trial

    study = load(root, params)
    trials = {t.number: t for t in study.get_trials()}
    for number, (values, value) in finished_before.items():
        assert (trials[number].params, trials[number].value) == (values, value)
    assert trials[victim.number].state == TrialState.FAIL
    retries = [t for t in trials.values() if t.system_attrs.get("failed_trial") == victim.number]
    assert len(retries) == 1 and retries[0].params == victim.params
    assert retries[0].state == TrialState.COMPLETE
    assert retries[0].user_attrs["resumed_from_epoch"] == left_at  # from the dead worker's checkpoint
    assert metrics["trials"] == 4 and sum(is_counted(t) for t in trials.values()) == 4
    table = pd.read_csv(root / TUNE_PLOTS_DIR / "trials.csv")
    assert table.loc[table["trial"] == victim.number, "state"].item() == "fail"
    assert table.loc[table["trial"] == retries[0].number, "retry_of"].item() == victim.number
    assert not list((root / TUNE_STATE_DIR / "trials").rglob("*.pt"))  # checkpoints cleaned up


@pytest.mark.slow  # a real PostgreSQL server (~30 s): make test-slow and CI run it
def test_two_workers_share_one_study_on_postgresql(project, postgres_url):
    root, photos = project
    params = tune_params(photos, n_trials=8, epochs=3, storage=postgres_url, pruner={"kind": "none"})
    _write_params_file(root, params)
    # the helper starts first and waits for the study, so both are up when trials begin
    helper = _tune_process(root, "--worker", "--wait", "120", gpu="1")
    time.sleep(2)
    main = _tune_process(root, gpu="0")
    main_err = main.communicate(timeout=420)[1]
    helper_err = helper.communicate(timeout=120)[1]
    assert main.returncode == 0, main_err[-3000:]
    assert helper.returncode == 0, helper_err[-3000:]

    (name,) = optuna.get_all_study_names(postgres_url)
    trials = optuna.load_study(study_name=name, storage=postgres_url).get_trials()
    assert sum(is_counted(t) for t in trials) == 8  # the budget, not one trial more
    assert not [t for t in trials if t.state == TrialState.FAIL and not t.user_attrs.get(ATTR_SURPLUS)]
    workers = {t.user_attrs["worker"] for t in trials if is_counted(t)}
    assert len(workers) == 2, workers  # both processes ran trials
    assert len({json.dumps(t.params, sort_keys=True) for t in trials if is_counted(t)}) == 8
    best = yaml.safe_load((root / BEST_PARAMS).read_text())
    assert best["study"] == name and json.loads((root / TUNE_METRICS).read_text())["trials"] == 8


def test_tune_seed_reruns_the_search_on_the_same_splits(project, monkeypatch):
    """tune.seed gives the search its own random source: trials and re-runs train with it,
    the study is another one, and prepare's splits (the top-level seed) are untouched;
    a tune.seed equal to the top-level seed is the same study as null."""
    from synermix import tuning
    from synermix.stages.tune import _TuneInputs

    root, photos = project
    base = tune_params(photos)
    same = tune_params(photos, seed=base.seed)
    other = tune_params(photos, seed=7, n_trials=2, rerun_top_k=1, rerun_seeds=1, pruner={"kind": "none"})
    assert base.tune_seed == same.tune_seed == base.seed and other.tune_seed == 7
    assert _TuneInputs.read(same, root).name == _TuneInputs.read(base, root).name
    inputs = _TuneInputs.read(other, root)
    assert inputs.name != _TuneInputs.read(base, root).name
    # the trial image cap follows the search's seed; the train and val rows do not move
    assert inputs.trial_rows["path"].tolist() == cap_train_rows(inputs.train_rows, 12, 7)["path"].tolist()
    assert (
        inputs.trial_rows["path"].tolist()
        != cap_train_rows(inputs.train_rows, 12, base.seed)["path"].tolist()
    )
    assert inputs.val_rows["path"].tolist() == _TuneInputs.read(base, root).val_rows["path"].tolist()

    real_train = tuning.train_model
    seeds: list[int] = []

    def train_model(*args, **kwargs):
        seeds.append(args[3])  # (data, class_names, params, seed)
        return real_train(*args, **kwargs)

    monkeypatch.setattr(tuning, "train_model", train_model)
    run_tune(other, root)
    # two trials, the re-run of the best, then params.yaml's values on the same two seeds
    assert seeds == [7, 7, *rerun_seeds(7, 1), 7, *rerun_seeds(7, 1)]
    assert yaml.safe_load((root / BEST_PARAMS).read_text())["seeds"] == [7, *rerun_seeds(7, 1)]


def test_tune_md_quotes_the_trust_bench_only_for_its_own_settings(project):
    """reports/tune.md says whether short trials were shown to rank full trainings: the
    rank correlation of bench/tune_trust.py when it was measured with these settings, else
    that it was not measured (a bench of another recipe or data is never quoted)."""
    from synermix.paths import TUNE_TRUST
    from synermix.stages.tune import _TuneInputs

    root, photos = project
    params = tune_params(photos, rerun_top_k=0, n_trials=2)
    metrics = run_tune(params, root)
    assert metrics["trial_rank_correlation"] is None and metrics["trial_rank_configs"] == 0
    report = (root / TUNE_REPORT).read_text()
    assert "Not measured for these settings (trials of 3 epochs on 36 images" in report

    settings = _TuneInputs.read(params, root).trust_settings(params)
    bench = {"report": {"settings": {**settings, "seed": 99}, "rows": [{}] * 8, "trial_best_full_rank": 2}}
    bench["report"]["spearman"] = {"rho": 0.8333, "p": 0.0102}
    (root / TUNE_TRUST).parent.mkdir(parents=True, exist_ok=True)
    (root / TUNE_TRUST).write_text(json.dumps(bench))
    metrics = run_tune(params, root)  # the study is complete: only the outputs are written again
    assert metrics["trial_rank_correlation"] == 0.8333 and metrics["trial_rank_configs"] == 8
    assert json.loads((root / TUNE_METRICS).read_text())["trial_rank_correlation"] == 0.8333
    report = (root / TUNE_REPORT).read_text()
    assert "Spearman rho **+0.833** (p 0.0102)" in report and "over 8 configurations" in report
    assert "ranked 2 of 8 in full training. At 0.7 or more, the trials rank" in report

    # measured with another full-training recipe (or epochs, data, objective): not quoted
    for key, value in (("full_recipe", "0" * 16), ("train_epochs", 99), ("manifest_sha256", "x")):
        bench["report"]["settings"] = {**settings, key: value}
        (root / TUNE_TRUST).write_text(json.dumps(bench))
        assert run_tune(params, root)["trial_rank_correlation"] is None, key
    # a damaged file is not measured either
    (root / TUNE_TRUST).write_text("{not json")
    assert run_tune(params, root)["trial_rank_correlation"] is None
