"""MLflow runs: where they go, and flattening params for logging.

The tracking URI comes from ``MLFLOW_TRACKING_URI`` when set, else ``mlflow.tracking_uri``
in params.yaml (default: a SQLite file in the project root; MLflow 3.17 refuses the old
file store). This module is the only one that builds an MLflow client
(:func:`client`, :func:`client_for`) or sets MLflow's process-global tracking URI
(:func:`using_store`, for the fluent ``mlflow.log_*`` calls inside :func:`mlflow_run`; it
puts the previous value back afterwards, so nothing leaks into the next stage or test).

Lineage: each ``dvc repro`` leaves one *pipeline* run (run name ``dvc repro``, tag
``synermix_role=pipeline``) holding every param, params.yaml, dvc.yaml and dvc.lock, with
a child run per stage that ran. The tune stage's run is the study's run, with a child per
trial; a study resumed by a later repro moves under that repro. Every run carries the
git commit and dirty flag, the manifest's sha256 and the dvc.lock hash of each stage
upstream of it (``dvc_lock.<stage>``); the pipeline run points at its children with
``run.<stage>`` tags. How stages of one repro find each other: :mod:`synermix.lineage`.

What the pipeline run says at a glance: the evaluate stage gives it the verdict
(:func:`publish_verdict`: a run name such as ``dvc repro: gates FAILED (min_accuracy)``, the
top of reports/evaluation.md as its description, the headline metrics and a
``failed_gates`` tag), and the train stage the training values really used, tuned ones
included (:func:`log_effective_train_params`). A stage's run starts when the stage's work
starts (:mod:`synermix.progress`), and every stage logs the run's UI link.
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from synermix import lineage, progress
from synermix.config import TUNABLE_TRAIN_KEYS, MlflowParams, Params, check_no_password
from synermix.errors import UserError
from synermix.paths import DVC_LOCK, DVC_YAML, MANIFEST, PARAMS_FILE

log = logging.getLogger(__name__)


def redact_uri(uri: str) -> str:
    """A URL with its password hidden (``postgresql://tuner:***@host/db``), for messages,
    run tags and model cards: the one redaction helper (MLflow stores, tune.storage,
    params errors)."""
    from urllib.parse import urlsplit, urlunsplit

    try:
        parts = urlsplit(uri)
        password = parts.password
    except ValueError:  # not a URL urllib parses (a bad port): show the scheme only
        return uri.split("://", 1)[0] + "://…"
    if not password:
        return uri
    user = parts.username or ""
    netloc = f"{user}:***@{parts.hostname or ''}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def tracking_uri(params: MlflowParams) -> str:
    """The store's URI: MLFLOW_TRACKING_URI when set, else mlflow.tracking_uri; one that
    holds a password is refused (MLflow would write it into runs and logs)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or params.tracking_uri
    try:
        check_no_password(uri, "MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI") else "the URI")
    except ValueError as exc:
        raise UserError(str(exc)) from None
    return uri


def sqlite_file(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (relative to the current folder, as
    SQLAlchemy reads it); None for any other store."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///") :].split("?", 1)[0])


def require_store(uri: str) -> None:
    """Refuse to read a SQLite store that does not exist: MLflow would create an empty one
    (a relative ``sqlite:///mlflow.db`` run from another folder answered "no versions")."""
    path = sqlite_file(uri)
    if path is not None and not path.is_file():
        raise UserError(
            f"no MLflow store at {path.absolute()}: nothing was tracked there yet (run the pipeline: "
            f"dvc repro), or this is not the project root ({redact_uri(uri)} is read relative to the "
            "current folder; run from the project root or give sqlite:////absolute/path/mlflow.db)"
        )


@contextmanager
def store_errors(uri: str) -> Iterator[None]:
    """A store that is locked, corrupt or not a database: one line naming it, not a
    traceback from SQLAlchemy inside MLflow."""
    from sqlalchemy.exc import DatabaseError, OperationalError

    try:
        yield
    except (OperationalError, DatabaseError) as exc:
        reason = getattr(exc, "orig", None) or exc
        raise UserError(
            f"the MLflow store {redact_uri(uri)} cannot be used ({str(reason).splitlines()[0]}): "
            "another process may hold it locked (try again), or the file is not an MLflow database"
        ) from None
    except Exception as exc:  # MLflow wraps SQLAlchemy's errors in its own exceptions
        cause = exc.__cause__ or exc.__context__
        if isinstance(cause, OperationalError | DatabaseError):
            reason = getattr(cause, "orig", None) or cause
            raise UserError(
                f"the MLflow store {redact_uri(uri)} cannot be used ({str(reason).splitlines()[0]}): "
                "another process may hold it locked (try again), or the file is not an MLflow database"
            ) from None
        raise


def client(uri: str | None) -> Any:
    """The MLflow client on the store at ``uri`` (its model registry too, unless
    ``MLFLOW_REGISTRY_URI`` names another one): the one place a client is built. None:
    the store MLflow itself would pick (MLFLOW_TRACKING_URI, else its default)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    quiet_mlflow_logs()
    uri = uri or mlflow.get_tracking_uri()
    return MlflowClient(tracking_uri=uri, registry_uri=os.environ.get("MLFLOW_REGISTRY_URI") or uri)


def client_for(params: Params) -> Any:
    """The MLflow client on the configured store (MLFLOW_TRACKING_URI overrides params)."""
    return client(tracking_uri(params.mlflow))


@contextmanager
def using_store(uri: str) -> Iterator[None]:
    """MLflow's fluent API (``mlflow.start_run``, ``mlflow.log_*``, ``mlflow.onnx.log_model``)
    on the store at ``uri`` for the block; the previous setting (usually none) is put back
    after it. The only place the process-global tracking URI is set.

    ``mlflow.set_tracking_uri`` also writes (or, given None, deletes) the
    MLFLOW_TRACKING_URI environment variable; both are restored as they were."""
    import mlflow
    from mlflow.tracking._tracking_service import utils

    before, before_env = utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)
        if before_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = before_env


def ui_link(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """The run's page in the MLflow UI (the classic ML view, not the GenAI overview). A SQLite
    store has no server: the link is the one `mlflow ui` (default 127.0.0.1:5000; `make ui`)
    serves."""
    base = (
        tracking_uri.rstrip("/")
        if tracking_uri.startswith(("http://", "https://"))
        else "http://127.0.0.1:5000"
    )
    return f"{base}/{ui_fragment(experiment_id, run_id)}"


def ui_fragment(experiment_id: str, run_id: str) -> str:
    """The run's page relative to the MLflow UI's address (for links inside MLflow's own
    Markdown descriptions)."""
    return f"#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"


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
    """MLflow and alembic log every schema step at INFO; keep only their warnings (and no
    progress bar for each small artifact download)."""
    for noisy in ("mlflow", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


PIPELINE_ROLE = "pipeline"
PIPELINE_RUN_NAME = "dvc repro"


class PipelineLineage:
    """A stage's place in its ``dvc repro``: the pipeline run (found or created) and the
    tags that tie the stage's own run to it. Without a pipeline key (a stage run by hand)
    there is no pipeline run and the stage's run stands alone."""

    def __init__(self, client: Any, experiment: str, params: Params, stage: str, root: Path) -> None:
        self.client = client
        self.stage = stage
        self.root = root
        self.key = lineage.pipeline_key()
        self.locks = lineage.dvc_lock_hashes(root, before=stage)
        self.parent = self._find_or_create(experiment, params) if self.key else None

    def _find_or_create(self, experiment: str, params: Params) -> str:
        """The oldest run with this key; two stages creating one at once keep the older."""
        query = f"tags.synermix_pipeline_key = '{self.key}'"

        def oldest() -> Any:
            runs = self.client.search_runs([experiment], query, max_results=50)
            return min(runs, key=lambda r: (r.info.start_time, r.info.run_id)) if runs else None

        found = oldest()
        if found is not None:
            return found.info.run_id
        tags = {**git_state(), "synermix_pipeline_key": self.key, "synermix_role": PIPELINE_ROLE}
        mine = self.client.create_run(
            experiment, start_time=progress.stage_started_ms(), run_name=PIPELINE_RUN_NAME, tags=tags
        ).info.run_id
        winner = oldest().info.run_id
        if winner != mine:
            self.client.delete_run(mine)
            return winner
        self._log_params(mine, params)
        for name in (PARAMS_FILE, DVC_YAML):
            if (self.root / name).is_file():
                self.client.log_artifact(mine, str(self.root / name), artifact_path="pipeline")
        log.info("pipeline run %s for this dvc repro", mine)
        return mine

    def _log_params(self, run_id: str, params: Params) -> None:
        from mlflow.entities import Param

        flat = flatten(params.model_dump(mode="json", by_alias=True))
        # a storage URL may hold a password: tuning logs it redacted, so leave it out here
        flat.pop("tune.storage", None)
        if params.tune.enabled:
            # params.yaml's train.beta is not what trains when tune sets it: the train stage
            # (or evaluate, for a model trained by an earlier repro) logs the values used
            for key in TUNABLE_TRAIN_KEYS:
                flat.pop(f"train.{key}", None)
        batch = [Param(k, str(v)[:6000]) for k, v in sorted(flat.items())]
        for start in range(0, len(batch), 100):  # log_batch takes at most 100 params
            self.client.log_batch(run_id, params=batch[start : start + 100])

    def tags(self) -> dict[str, str]:
        """Tags for the stage's own run."""
        tags = {**git_state(), "stage": self.stage, "synermix_role": self.stage}
        tags |= {f"dvc_lock.{name}": value for name, value in self.locks.items()}
        manifest = lineage.file_sha256(self.root / MANIFEST)
        if manifest:
            tags["manifest_sha256"] = manifest
        if self.parent:
            tags |= {"mlflow.parentRunId": self.parent, "pipeline_run_id": self.parent}
        return tags

    def attach(self, run_id: str) -> None:
        """Record the stage's run on the pipeline run, which is open while a stage runs."""
        if not self.parent:
            return
        self.client.update_run(self.parent, status="RUNNING")
        self.client.set_tag(self.parent, f"run.{self.stage}", run_id)
        for name, value in self.locks.items():
            self.client.set_tag(self.parent, f"dvc_lock.{name}", value)
        if (self.root / DVC_LOCK).is_file():  # as left by the stages before this one
            self.client.log_artifact(self.parent, str(self.root / DVC_LOCK), artifact_path="pipeline")

    def finish(self, run_id: str, failed: bool) -> None:
        """Stamp the manifest (prepare writes it) and close the pipeline run with this
        stage's outcome: the last stage that ran decides how the repro ended."""
        manifest = lineage.file_sha256(self.root / MANIFEST)
        if manifest:
            self.client.set_tag(run_id, "manifest_sha256", manifest)
        if not self.parent:
            return
        if manifest:
            self.client.set_tag(self.parent, "manifest_sha256", manifest)
        ran = self.client.get_run(self.parent).data.tags.get("stages_ran", "")
        stages = [s for s in ran.split(",") if s and s != self.stage] + [self.stage]
        self.client.set_tag(self.parent, "stages_ran", ",".join(stages))
        if failed:
            self.client.set_tag(self.parent, "failed_stage", self.stage)
            tags = self.client.get_run(self.parent).data.tags
            if not (self.stage == "evaluate" and tags.get("failed_gates")):  # evaluate named it
                self.client.set_tag(
                    self.parent, "mlflow.runName", f"{PIPELINE_RUN_NAME}: FAILED at {self.stage}"
                )
        self.client.set_terminated(self.parent, "FAILED" if failed else "FINISHED")


@contextmanager
def mlflow_run(
    params: Params, stage: str, root: Path = Path("."), tags: Mapping[str, str] | None = None
) -> Iterator[Any]:
    """An MLflow run for one stage, a child of this ``dvc repro``'s pipeline run.

    The run ends FAILED, and so does the pipeline run, when the stage raises.
    """
    import mlflow

    uri = tracking_uri(params.mlflow)
    store = client(uri)
    experiment = experiment_id(store, params.mlflow)
    place = PipelineLineage(store, experiment, params, stage, root)
    # started when the stage's work started (its clock), not when its logging began
    created = store.create_run(
        experiment,
        start_time=progress.stage_started_ms(),
        run_name=stage,
        tags={**place.tags(), **(tags or {})},
    )
    with using_store(uri), mlflow.start_run(run_id=created.info.run_id) as run:
        log.info(
            "MLflow run of %s: %s (store %s)",
            stage,
            ui_link(redact_uri(uri), experiment, run.info.run_id),
            redact_uri(uri),
        )
        place.attach(run.info.run_id)
        with stage_outcome(place, run.info.run_id):
            yield run


@contextmanager
def stage_outcome(place: PipelineLineage | None, run_id: str | None) -> Iterator[None]:
    """Close the stage's place in the pipeline run with its outcome, failure included."""
    failed = True
    try:
        yield
        failed = False
    finally:
        if place is not None and run_id:
            place.finish(run_id, failed)


def experiment_id(store: Any, params: MlflowParams) -> str:
    """The configured experiment's id in ``store`` (created when missing; two processes
    creating it at once both get the one that won)."""
    from mlflow.exceptions import MlflowException

    from synermix.errors import UserError

    found = store.get_experiment_by_name(params.experiment)
    if found is None:
        try:
            return store.create_experiment(params.experiment)
        except MlflowException as exc:
            if getattr(exc, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
                raise
        found = store.get_experiment_by_name(params.experiment)  # another process created it
    if found.lifecycle_stage == "deleted":
        where = redact_uri(store.tracking_uri)
        raise UserError(
            f"MLflow experiment '{params.experiment}' is deleted in {where}: "
            "restore it (mlflow experiments restore) or set mlflow.experiment to another name"
        )
    return found.experiment_id


def tune_parent_run(client: Any, experiment: str, study: str, tags: Mapping[str, str]) -> str:
    """The one MLflow run that holds a study's trials, shared by every worker and resume.

    Found by its ``optuna_study`` tag; the first worker creates it. Two workers that
    create one at the same moment both keep the older and delete their own. ``tags``
    (lineage) are set on a found run too: a resuming repro takes the study's run over.
    """
    query = f"tags.optuna_study = '{study}' and tags.synermix_role = 'tune'"

    def oldest() -> Any:
        runs = client.search_runs([experiment], query, order_by=["attributes.start_time ASC"], max_results=50)
        return min(runs, key=lambda r: (r.info.start_time, r.info.run_id)) if runs else None

    found = oldest()
    if found is not None:
        for key, value in tags.items():
            client.set_tag(found.info.run_id, key, value)
        return found.info.run_id
    mine = client.create_run(
        experiment,
        run_name="tune",
        tags={**git_state(), **tags, "optuna_study": study, "synermix_role": "tune"},
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
        # a pruned trial did not finish: its name and status (KILLED) say so in the runs table
        name = f"trial-{trial.number}" + (f" ({state})" if state in ("pruned", "fail") else "")
        run = self.client.create_run(self.experiment, run_name=name, tags=tags)
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
        status = {"fail": "FAILED", "pruned": "KILLED"}.get(state, "FINISHED")
        self.client.set_terminated(run.info.run_id, status)


def _pipeline_parent(store: Any, run_id: str) -> str | None:
    return store.get_run(run_id).data.tags.get("pipeline_run_id") or None


def log_effective_train_params(store: Any, run_id: str, values: Mapping[str, Any], origin: str) -> None:
    """Log on the pipeline run of ``run_id`` the tunable train.* values training really used
    (``origin``: where they came from, e.g. the study and trial) — params.yaml's own values
    of those keys are left out of the pipeline run while tuning is on. Keys the pipeline run
    already holds are kept (MLflow params are write-once)."""
    from mlflow.entities import Param

    parent = _pipeline_parent(store, run_id)
    if not parent:
        return
    held = store.get_run(parent).data
    batch = [
        Param(f"train.{k}", str(v)) for k, v in sorted(values.items()) if f"train.{k}" not in held.params
    ]
    if batch:
        store.log_batch(parent, params=batch)
    if batch or "train_params_from" not in held.tags:
        store.set_tag(parent, "train_params_from", origin[:5000])


def publish_verdict(
    store: Any,
    run_id: str,
    *,
    verdict: str,
    description: str,
    metrics: Mapping[str, float],
    tags: Mapping[str, str],
) -> str | None:
    """The evaluate stage's verdict where a person looks first: ``description`` (Markdown)
    on the stage's run and on its pipeline run, and on the pipeline run the headline
    ``metrics``, ``tags`` (``failed_gates``, ...) and a run name that carries ``verdict``.
    Returns the pipeline run's id (None for a stage run by hand)."""
    from mlflow.entities import Metric, RunTag

    note = description[:60000]  # MLflow keeps tag values up to 64 KiB on SQL stores
    store.set_tag(run_id, "mlflow.note.content", note)
    parent = _pipeline_parent(store, run_id)
    if not parent:
        return None
    stamp = int(time.time() * 1000)
    values = [Metric(k, float(v), stamp, 0) for k, v in sorted(metrics.items()) if v is not None]
    batch = [RunTag(k, str(v)) for k, v in tags.items()]
    batch += [
        RunTag("mlflow.note.content", note),
        RunTag("mlflow.runName", f"{PIPELINE_RUN_NAME}: {verdict}"),
    ]
    store.log_batch(parent, metrics=values, tags=batch)
    return parent


def log_manifest_input(rows: Any, manifest: Path, context: str) -> None:
    """Log ``rows`` (manifest rows a stage used) as an MLflow dataset input of the active run,
    under ``context`` (train / val / test / prepared): the run's Datasets column then names
    the data, its digest, row count and schema."""
    import warnings

    import mlflow

    with warnings.catch_warnings():  # a local path reads as two equal sources; MLflow takes the first
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
        # MLflow's own schema inference: a hint about integer columns and a pandas deprecation
        warnings.filterwarnings("ignore", message="Hint: Inferred schema contains integer")
        warnings.filterwarnings("ignore", message="Starting with pandas version 4.0")
        dataset = mlflow.data.from_pandas(
            rows.reset_index(drop=True),
            source=str(Path(manifest).resolve()),
            targets="label",
            name="manifest",
        )
        mlflow.log_input(dataset, context=context)
