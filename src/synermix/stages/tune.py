"""The tune stage: an Optuna study of beta (and the knobs in tune.space) in short trials ->
tuning/best_params.yaml, reports/tune.md and the tables; and the worker mode that lets
more machines share one study."""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import yaml
from mlflow.entities import Param
from optuna.trial import TrialState

from synermix import tune_report, tuning
from synermix.config import Params, TrainParams
from synermix.data.datasets import infer_channels
from synermix.errors import CheckFailed, UserError
from synermix.paths import (
    BEST_PARAMS,
    PREPARED_DIR,
    TUNE_DB,
    TUNE_METRICS,
    TUNE_PLOTS_DIR,
    TUNE_REPORT,
    TUNE_STATE_DIR,
    TUNE_TABLES,
    TUNE_TRIALS_DIR,
    TUNE_TRUST,
)
from synermix.stages.common import train_val_rows
from synermix.tracking import (
    MlflowTrialLogger,
    PipelineLineage,
    client_for,
    experiment_id,
    flatten,
    mlflow_run,
    redact_uri,
    stage_outcome,
    tracking_uri,
    tune_parent_run,
)
from synermix.training import TrainingData, check_training_inputs, load_training_data

log = logging.getLogger(__name__)


def _write_untuned(params: Params, root: Path) -> dict:
    """tune.enabled: false: record that train uses params.yaml's train.* unchanged."""
    note = "tune.enabled is false: train uses train.* from params.yaml"
    content = {"tuned": False, "reason": note, "params": {}}
    (root / BEST_PARAMS).parent.mkdir(parents=True, exist_ok=True)
    (root / BEST_PARAMS).write_text(_BEST_HEADER + yaml.safe_dump(content, sort_keys=False))
    metrics = {"trials": 0}
    (root / TUNE_METRICS).write_text(json.dumps(metrics, indent=2) + "\n")
    (root / TUNE_REPORT).write_text(f"# Tuning\n\nNo search: {note}.\n")
    empty = pd.DataFrame(columns=["trial", "state", "value", "last_reported", "beta", "worker", "seconds"])
    no_history = pd.DataFrame(columns=["trial", "value", "best_so_far"])
    tune_report.write_tables(root / TUNE_PLOTS_DIR, empty, no_history, {})
    tune_report.write_figures(root / TUNE_PLOTS_DIR, empty, no_history, {}, params.tune.objective)
    # the stage ran, so the repro's record holds it, saying why there was no search
    with mlflow_run(params, "tune", root, {"tuned": "false", "mlflow.note.content": f"No search: {note}."}):
        mlflow.log_artifact(str(root / BEST_PARAMS), artifact_path="tune")
    log.info(note)
    return metrics


_BEST_HEADER = (
    "# Written by the tune stage. train uses these values in place of the same keys of\n"
    "# train.* in params.yaml (see reports/tune.md for the search behind them).\n"
)


def _tune_mlflow(params: Params, study: str, manifest_sha: str, root: Path, worker: bool) -> tuple:
    """The MLflow client, experiment id, the study's run (found or created) and, for the
    main tune stage, its place in this dvc repro (a worker belongs to no repro)."""
    client = client_for(params)
    experiment = experiment_id(client, params.mlflow)
    place = None if worker else PipelineLineage(client, experiment, params, "tune", root)
    tags = {"manifest_sha256": manifest_sha, **(place.tags() if place else {})}
    run_id = tune_parent_run(client, experiment, study, tags)
    if place:
        place.attach(run_id)
    return client, experiment, run_id, place


@dataclass(frozen=True)
class _TuneInputs:
    """What the main stage and a worker both derive from params and the prepared data: the
    trial rows, the trial settings, the starting weights, the study's name and storage."""

    names: list[str]
    train_rows: pd.DataFrame
    trial_rows: pd.DataFrame
    val_rows: pd.DataFrame
    manifest_sha: str
    base: TrainParams
    init: Any
    name: str
    url: str
    storage: Any
    budget_note: str

    @classmethod
    def read(cls, params: Params, root: Path) -> _TuneInputs:
        tune = params.tune
        names, train_rows, val_rows, manifest_sha = train_val_rows(params, root)
        trial_rows = tuning.cap_train_rows(train_rows, tune.max_per_class, params.tune_seed)
        base = tuning.trial_base(params.train, tune)
        # bad class weights, input size or starting weights stop before the study is opened, and
        # the starting weights are read once for every trial and re-run, not once per trial
        channels = infer_channels(trial_rows) if base.channels == "auto" else int(base.channels)
        init = check_training_inputs(base, names, channels, tracking_uri(params.mlflow))
        name = tuning.study_name(
            root / PREPARED_DIR, trial_rows, val_rows, names, params.tune_seed, base, tune
        )
        (root / TUNE_STATE_DIR).mkdir(parents=True, exist_ok=True)
        url = tuning.storage_url(tune, root / TUNE_DB)
        budget_note = (
            f"Short trials: {tune.epochs} epochs on "
            + (f"at most {tune.max_per_class} training images per class " if tune.max_per_class else "all ")
            + f"({len(trial_rows)} of {len(train_rows)} images); train then uses train.epochs on all "
            f"{len(train_rows)}."
        )
        return cls(
            names,
            train_rows,
            trial_rows,
            val_rows,
            manifest_sha,
            base,
            init,
            name,
            url,
            tuning.open_storage(url, tune),
            budget_note,
        )

    def tuner(self, params: Params, root: Path, study: Any) -> tuple[tuning.BudgetState, bool, tuning.Tuner]:
        """The study's budget state, whether it is complete, and the Tuner that runs its trials."""
        # a complete study (a rerun for a param that changes nothing here) needs no images
        done = tuning.BudgetState.of(study.get_trials(deepcopy=False))
        complete = done.counted >= params.tune.n_trials and not done.running

        def load_data() -> TrainingData:  # trials or re-runs still to train
            return load_training_data(
                self.trial_rows, self.val_rows, root / PREPARED_DIR, self.names, self.base
            )

        tuner = tuning.Tuner(
            study,
            params.tune,
            self.base,
            params.tune_seed,
            self.names,
            None if complete else load_data(),
            root / TUNE_TRIALS_DIR / self.name,
            load_data=load_data,
            init=self.init,
        )
        return done, complete, tuner

    def trust_settings(self, params: Params) -> dict[str, Any]:
        """The settings a ``bench/tune_trust.py`` measurement must have been made with for
        tune.md to quote it (the search's own seed aside: it only draws the configurations)."""
        tune = params.tune
        return {
            "objective": tune.objective,
            "tune_epochs": tune.epochs,
            "tune_max_per_class": tune.max_per_class,
            "train_epochs": params.train.epochs,
            "trial_images": len(self.trial_rows),
            "full_images": len(self.train_rows),
            "val_images": len(self.val_rows),
            "max_per_class_full": None,
            "manifest_sha256": self.manifest_sha,
            "trial_recipe": tuning.recipe_digest(self.base, tune.space),
            "full_recipe": tuning.recipe_digest(params.train, tune.space),
        }

    def log_study(self, params: Params) -> None:
        tune = params.tune
        log.info(
            "study %s in %s: %d trial(s) wanted, objective %s; %s",
            self.name,
            redact_uri(self.url),
            tune.n_trials,
            tune.objective,
            self.budget_note,
        )


def run_tune(params: Params, root: Path = Path(".")) -> dict:
    """Search beta (and the knobs in tune.space) with Optuna; write the best values for train.

    Workers on other machines (:func:`run_tune_worker`) may share the study's trials; this
    stage alone re-runs the top trials and writes the outputs.
    """
    tune = params.tune
    if not tune.enabled:
        return _write_untuned(params, root)
    inputs = _TuneInputs.read(params, root)
    name = inputs.name
    client, experiment, parent, place = _tune_mlflow(params, name, inputs.manifest_sha, root, worker=False)
    _drop_other_studies_checkpoints(root / TUNE_TRIALS_DIR, keep=name)
    with stage_outcome(place, parent):
        study = _open_study(inputs.storage, name, params, inputs.url, create=True, wait_seconds=0)
        if "description" not in study.user_attrs:
            study.set_user_attr("description", inputs.budget_note)
            study.set_user_attr("objective", tune.objective)
            study.set_user_attr("manifest_sha256", inputs.manifest_sha)
        inputs.log_study(params)
        done, complete, tuner = inputs.tuner(params, root, study)
        trial_logger = MlflowTrialLogger(client, experiment, parent, tuner.histories, tune.objective)
        # params are write-once in MLflow: log the settings a resumed study has not seen yet;
        # the budget (it may grow) and the storage URL (it may hold a password) become tags
        existing = client.get_run(parent).data.params
        settings = flatten({"seed": params.tune_seed, "tune": tune.model_dump(mode="json")})
        budget = (
            "tune.n_trials",
            "tune.timeout_minutes",
            "tune.storage",
            "tune.rerun_top_k",
            "tune.rerun_seeds",
        )
        fresh = [Param(k, str(v)) for k, v in settings.items() if k not in existing and k not in budget]
        client.log_batch(parent, params=fresh)
        client.set_tag(parent, "n_trials", str(tune.n_trials))
        client.set_tag(parent, "storage", redact_uri(inputs.url))
        client.set_tag(parent, "rerun_top_k", str(tune.rerun_top_k))
        client.set_tag(parent, "rerun_seeds", str(tune.rerun_seeds))

        state = done if complete else tuner.run([trial_logger], wait_for_others=True)
        _log_missing_trial_runs(study, client, experiment, parent, trial_logger)
        counted = tuning.counted_trials(study.get_trials(deepcopy=False), tune.n_trials)
        baseline = tuning.baseline_values(params.train, tune) if tune.keep_baseline else None
        candidates = tuning.rerun_top(study, counted, tune, params.tune_seed, tuner.rerun, baseline)
        if not state.waiting and not state.running:  # no retry left to resume from a checkpoint
            shutil.rmtree(root / TUNE_TRIALS_DIR / name, ignore_errors=True)
        return _write_tune_outputs(
            params,
            root,
            study,
            client,
            parent,
            inputs.budget_note,
            len(inputs.trial_rows),
            candidates,
            inputs.trust_settings(params),
        )


def run_tune_worker(params: Params, root: Path = Path("."), wait_seconds: float = 120) -> dict:
    """``synermix tune --worker``: join the study the main tune stage created (same data and
    params, shared ``tune.storage``), run trials until the budget is used up; write nothing."""
    tune = params.tune
    if not tune.enabled:
        raise UserError("tune.enabled is false: there is no study to work on")
    inputs = _TuneInputs.read(params, root)
    if not inputs.url.startswith("sqlite") and tracking_uri(params.mlflow).startswith("sqlite"):
        log.warning(
            "this worker shares a database study but logs to a local MLflow store (%s): its trials "
            "join the tuning run only if MLFLOW_TRACKING_URI points at the same server everywhere",
            tracking_uri(params.mlflow),
        )
    study = _open_study(
        inputs.storage, inputs.name, params, inputs.url, create=False, wait_seconds=wait_seconds
    )
    inputs.log_study(params)
    done, complete, tuner = inputs.tuner(params, root, study)
    # the main stage created the MLflow store and the parent run before the study
    client, experiment, parent, _ = _tune_mlflow(params, inputs.name, inputs.manifest_sha, root, worker=True)
    trial_logger = MlflowTrialLogger(client, experiment, parent, tuner.histories, tune.objective)
    state = done if complete else tuner.run([trial_logger], wait_for_others=False)
    # re-runs are the main process's: it alone writes the outputs
    log.info("worker done: %d of %d trials counted in study %s", state.counted, tune.n_trials, inputs.name)
    return {"trials": state.counted}


def _open_study(storage, name: str, params: Params, url: str, create: bool, wait_seconds: float):
    """Create (or load) the study; a worker (``create=False``) waits for it to appear."""
    deadline = time.monotonic() + wait_seconds
    while True:
        try:
            return tuning.open_study(storage, name, params.tune_seed, params.tune, create=create)
        except KeyError:
            if time.monotonic() > deadline:
                raise UserError(
                    f"no study {name} in {redact_uri(url)} after {wait_seconds:g} s: start the main "
                    "tune (dvc repro or synermix tune) first, with the same data and params here "
                    "(the study name hashes both)"
                ) from None
            time.sleep(0.5)


def _drop_other_studies_checkpoints(trials_dir: Path, keep: str) -> None:
    """Trial checkpoints of other studies can never resume (their study is not this one)."""
    if trials_dir.is_dir():
        for folder in trials_dir.iterdir():
            if folder.is_dir() and folder.name != keep:
                shutil.rmtree(folder, ignore_errors=True)


def _log_missing_trial_runs(study, client, experiment: str, parent: str, trial_logger) -> None:
    """Child runs for finished trials that got none: a dead worker's trial (failed later by
    the heartbeat check) or a crashed one (Optuna runs callbacks only for trials it ends)."""
    runs = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parent}'", max_results=50_000)
    logged = {r.data.tags.get("optuna_trial") for r in runs}
    for trial in study.get_trials(deepcopy=False):
        if str(trial.number) not in logged and trial.state not in (TrialState.RUNNING, TrialState.WAITING):
            trial_logger(study, trial)


def _write_tune_outputs(
    params: Params,
    root: Path,
    study,
    client,
    parent: str,
    budget_note: str,
    trial_images: int,
    candidates=(),
    trust_settings: dict[str, Any] | None = None,
) -> dict:
    """best_params.yaml, the tables, tune.md and tune.json; the same and the plots to MLflow.

    With ``candidates`` (the re-run top trials) the values are those of the best mean over
    seeds; without, those of the single best trial."""
    tune = params.tune
    name = study.study_name
    all_trials = study.get_trials(deepcopy=False)
    counted = tuning.counted_trials(all_trials, tune.n_trials)
    last = counted[-1].number if counted else max((t.number for t in all_trials), default=-1)
    table = tune_report.trials_table([t for t in all_trials if t.number <= last], tune.space)
    history = tune_report.history_table(counted)
    best = tuning.best_trial(counted)
    if best is None:
        tune_report.write_tables(root / TUNE_PLOTS_DIR, table, history, {})
        states = table["state"].value_counts().to_dict()
        raise CheckFailed(
            f"no trial of study {name} completed ({states}): widen tune.space, relax tune.pruner "
            f"or raise tune.n_trials; the trials are in {TUNE_TABLES['trials']}"
        )
    importances = tune_report.param_importances(counted, params.tune_seed)
    metrics = tune_report.summary_metrics(counted, best, tune.epochs)
    reruns = tune_report.rerun_table(candidates, tune.space.searched())
    paths = tune_report.write_tables(root / TUNE_PLOTS_DIR, table, history, importances, reruns)
    # only what train needs: a larger budget that finds no better trial leaves the file, and
    # so the trained model, unchanged (counts and values are in reports/tune.json)
    chosen = best
    best_content = {"tuned": True, "study": name, "best_trial": best.number, "params": dict(best.params)}
    metrics["trial_images"] = trial_images
    trust = tune_report.trust_figures(root / TUNE_TRUST, trust_settings) if trust_settings else None
    metrics["trial_rank_correlation"] = None if trust is None else trust["rho"]
    metrics["trial_rank_configs"] = 0 if trust is None else trust["configs"]
    if candidates:
        pick = tuning.choose(candidates)
        chosen = pick.trial
        failed = f" ({pick.failed} diverged)" if pick.failed else ""
        chosen_on = f"mean of {len(pick.values)} seeds{failed}"
        margin = tuning.margin_over_baseline(candidates)
        if margin is not None:
            gap, spread = margin
            verdict = "kept" if pick.number == tuning.BASELINE else "beaten"
            chosen_on += (
                f"; params.yaml's values {verdict}: the best trial's mean is {gap:+.4f} against "
                f"theirs, seed spread {spread:.4f}"
            )
        best_content = {
            "tuned": True,
            "study": name,
            "best_trial": pick.number,
            "params": dict(pick.trial.params),
            "chosen_on": chosen_on,
            "mean": round(pick.mean, 6),
            "spread": None if pick.std is None else round(pick.std, 6),
            "seeds": [run.seed for run in pick.runs],
            "values": [None if run.value is None else round(run.value, 6) for run in pick.runs],
        }
        metrics.update(tune_report.rerun_metrics(candidates, pick))
    (root / BEST_PARAMS).parent.mkdir(parents=True, exist_ok=True)
    (root / BEST_PARAMS).write_text(_BEST_HEADER + yaml.safe_dump(best_content, sort_keys=False))
    (root / TUNE_METRICS).write_text(json.dumps(metrics, indent=2) + "\n")
    report = tune_report.render_markdown(
        name,
        tune.objective,
        metrics,
        best.params,
        table,
        importances,
        budget_note,
        candidates,
        trust,
        trust_settings,
    )
    (root / TUNE_REPORT).write_text(report)

    figures = tune_report.write_figures(
        root / TUNE_PLOTS_DIR, table, history, importances, tune.objective, reruns
    )
    for figure in figures:
        client.log_artifact(parent, str(figure), artifact_path="plots")
    for path in (*paths.values(), root / BEST_PARAMS, root / TUNE_REPORT):
        client.log_artifact(parent, str(path), artifact_path="tune")
    for key, value in metrics.items():
        if value is not None:
            client.log_metric(parent, key, float(value))
    for c in candidates:  # per re-run candidate, stepped by trial number; the baseline apart
        prefix = "baseline" if c.number == tuning.BASELINE else "rerun"
        client.log_metric(parent, f"{prefix}_mean", c.mean, step=max(c.number, 0))
        if c.std is not None:
            client.log_metric(parent, f"{prefix}_std", c.std, step=max(c.number, 0))
    for key, value in chosen.params.items():
        client.set_tag(parent, f"best.{key}", str(value))
    if candidates:
        client.set_tag(parent, "chosen_on", best_content["chosen_on"])
        client.set_tag(parent, "rerun_seed_values", ",".join(str(s) for s in best_content["seeds"]))
    client.set_terminated(parent, "FINISHED")
    described = ", ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in chosen.params.items()
    )
    if candidates:
        log.info(
            "chosen: %s (%s), mean %s %.4f over %d seeds (single best: trial %d, %.4f); "
            "seed spread %s; %d of %d epochs run in trials (%s); values in %s",
            "params.yaml's values"
            if metrics["chosen_trial"] == tuning.BASELINE
            else f"trial {metrics['chosen_trial']}",
            described,
            tune.objective,
            metrics["chosen_mean"],
            metrics["seeds_per_candidate"],
            best.number,
            best.value,
            "n/a" if metrics["seed_spread"] is None else f"{metrics['seed_spread']:.4f}",
            metrics["epochs_spent"],
            metrics["epochs_without_pruning"],
            "pruner " + tune.pruner.kind,
            BEST_PARAMS,
        )
        return metrics
    log.info(
        "best %s %.4f in trial %d: %s; %d of %d epochs run (%s); best values in %s",
        tune.objective,
        best.value,
        best.number,
        described,
        metrics["epochs_spent"],
        metrics["epochs_without_pruning"],
        "pruner " + tune.pruner.kind,
        BEST_PARAMS,
    )
    return metrics
