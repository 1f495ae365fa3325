"""MLflow runs: where they go, and flattening params for logging.

The tracking URI comes from ``MLFLOW_TRACKING_URI`` when set, else ``mlflow.tracking_uri``
in params.yaml (default: a SQLite file in the project root; MLflow 3.17 refuses the old
file store). The tune stage keeps one run per study with a child run per trial; later
issues grow this into parent/child runs per ``dvc repro``.
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
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


def quiet_mlflow_logs() -> None:
    """MLflow and alembic log every schema step at INFO; keep only their warnings."""
    for noisy in ("mlflow", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@contextmanager
def mlflow_run(params: MlflowParams, run_name: str, tags: Mapping[str, str] | None = None) -> Iterator[Any]:
    """Start (and end) an MLflow run in the configured store and experiment."""
    import mlflow

    quiet_mlflow_logs()
    mlflow.set_tracking_uri(tracking_uri(params))
    mlflow.set_experiment(params.experiment)
    with mlflow.start_run(run_name=run_name, tags={**git_state(), **(tags or {})}) as run:
        log.info("MLflow run %s in %s", run.info.run_id, tracking_uri(params))
        yield run


def experiment_id(params: MlflowParams) -> str:
    """The configured experiment's id in the configured store (created when missing)."""
    import mlflow

    quiet_mlflow_logs()
    mlflow.set_tracking_uri(tracking_uri(params))
    return mlflow.set_experiment(params.experiment).experiment_id


def tune_parent_run(client: Any, experiment: str, study: str, tags: Mapping[str, str]) -> str:
    """The one MLflow run that holds a study's trials, shared by every worker and resume.

    Found by its ``optuna_study`` tag; the first worker creates it. Two workers that
    create one at the same moment both keep the older and delete their own.
    """
    query = f"tags.optuna_study = '{study}' and tags.synermix_role = 'tune'"

    def oldest() -> Any:
        runs = client.search_runs([experiment], query, order_by=["attributes.start_time ASC"], max_results=50)
        return min(runs, key=lambda r: (r.info.start_time, r.info.run_id)) if runs else None

    found = oldest()
    if found is not None:
        return found.info.run_id
    mine = client.create_run(
        experiment,
        run_name="tune",
        tags={**git_state(), **tags, "optuna_study": study, "synermix_role": "tune", "stage": "tune"},
    ).info.run_id
    winner = oldest().info.run_id
    if winner != mine:
        client.delete_run(mine)
    return winner


class MlflowTrialLogger:
    """Optuna callback: each finished trial becomes a child run of the tuning run.

    The child holds the trial's values as params, the epoch curves (and the objective as
    reported to the pruner) as step metrics, the final value, and its state, worker and
    retry lineage as tags. Written for this project because optuna-integration's
    MLflowCallback is deprecated; it uses the client API so no global active run is
    needed and any number of workers can log into one parent.
    """

    def __init__(
        self,
        client: Any,
        experiment: str,
        parent_run_id: str,
        histories: Mapping[int, list[dict[str, Any]]],
        objective: str,
    ) -> None:
        self.client = client
        self.experiment = experiment
        self.parent_run_id = parent_run_id
        self.histories = histories
        self.objective = objective

    def __call__(self, study: Any, trial: Any) -> None:
        from mlflow.entities import Metric, Param

        from synermix.tuning import ATTR_FAIL_REASON, ATTR_SURPLUS, ATTR_WORKER, state_name

        if trial.user_attrs.get(ATTR_SURPLUS):
            return
        state = state_name(trial)
        tags = {
            "mlflow.parentRunId": self.parent_run_id,
            "optuna_study": study.study_name,
            "optuna_trial": str(trial.number),
            "trial_state": state,
            "worker": str(trial.user_attrs.get(ATTR_WORKER, "")),
        }
        if trial.system_attrs.get("failed_trial") is not None:
            tags["retry_of_trial"] = str(trial.system_attrs["failed_trial"])
        if trial.user_attrs.get(ATTR_FAIL_REASON):
            tags["fail_reason"] = str(trial.user_attrs[ATTR_FAIL_REASON])[:5000]
        run = self.client.create_run(self.experiment, run_name=f"trial-{trial.number}", tags=tags)
        stamp = int(time.time() * 1000)
        metrics = [
            Metric(f"{self.objective}_reported", float(v), stamp, int(step))
            for step, v in sorted(trial.intermediate_values.items())
        ]
        for row in self.histories.get(trial.number, []):
            for key, value in row.items():
                if key != "epoch" and isinstance(value, int | float) and value == value:
                    metrics.append(Metric(key, float(value), stamp, int(row["epoch"])))
        if trial.value is not None:
            metrics.append(Metric("value", float(trial.value), stamp, 0))
        params = [Param(k, str(v)) for k, v in trial.params.items()]
        self.client.log_batch(run.info.run_id, params=params)
        for start in range(0, len(metrics), 1000):  # log_batch takes at most 1000 metrics
            self.client.log_batch(run.info.run_id, metrics=metrics[start : start + 1000])
        self.client.set_terminated(run.info.run_id, "FAILED" if state == "fail" else "FINISHED")
