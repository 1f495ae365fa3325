"""Optuna search over beta and a few training knobs (no MLflow or DVC here).

One *study* per data and search: its name is a hash of the train/val images, the class
list, the seed, the trial settings, the search space and the training code, so a changed
dataset or space never mixes with old trials, while a larger ``n_trials`` or time budget
continues the same study. The storage is a database URL: a local SQLite file by default,
PostgreSQL when several workers (on one machine or many) share a study.

Budget: a study is done when ``n_trials`` trials are *counted*: complete, pruned, or
failed for a reason that would repeat (a diverged loss). A trial whose worker died
(no heartbeat for ``grace_seconds``) or crashed is marked failed and retried with the
same parameters, up to ``max_retry`` times; its epoch checkpoint lets the retry resume
where the dead worker stopped. Trials beyond the budget that a race between workers
starts are stopped at once and marked failed as surplus, never counted.

Determinism: every trial trains with the same ``seed``; the TPE sampler draws trial
``n`` from randomness seeded by ``(seed, n)`` alone, so the same params and data give
the same trials on CPU, and two workers never draw the same random start-up points.

Re-runs: one short trial per configuration is a noisy judge (a config's objective moves
by several points from seed to seed). Once the budget is used, the main process trains
the ``rerun_top_k`` best complete trials again with ``rerun_seeds`` more seeds each (the
same seeds for every candidate, derived from ``seed`` and the re-run index) and the
values with the best *mean* win. Each finished re-run is stored at once as a study user
attr keyed by (trial number, seed), so a killed stage resumes without redoing one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pandas as pd
from optuna.samplers import TPESampler
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from synermix.config import BASELINE_TRIAL, PrunerParams, SearchSpace, TrainParams, TuneParams
from synermix.data.splits import class_rng
from synermix.engine import TrainingDiverged
from synermix.errors import UserError, first_line
from synermix.tracking import redact_uri
from synermix.training import TRAINING_CODE, TrainingData, train_model

log = logging.getLogger(__name__)

STUDY_PREFIX = "synermix-tune-"
#: user attrs a trial carries
ATTR_FAIL_REASON = "fail_reason"
ATTR_SURPLUS = "surplus"
ATTR_EPOCHS = "epochs_used"
ATTR_WORKER = "worker"
ATTR_RESUMED = "resumed_from_epoch"
#: study user attrs holding finished re-runs: ``rerun:<trial number>:<seed>``
RERUN_PREFIX = "rerun:"
#: train params that do not change what a trial computes (left out of the study hash)
_NOT_RESULT_AFFECTING = ("device", "num_workers", "cache_images")
#: tune params that set the budget or plumbing, not the trials (left out of the study hash)
_NOT_TRIAL_AFFECTING = (
    "enabled",
    "n_trials",
    "timeout_minutes",
    "storage",
    "heartbeat_seconds",
    "grace_seconds",
    "max_retry",
    "rerun_top_k",
    "rerun_seeds",
    "seed",  # the effective seed (tune.seed or the top-level one) is hashed on its own
)
#: tuning.py holds only what trials compute (tables and plots live in tune_report.py)
_CODE = ("tuning.py", *TRAINING_CODE)

warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
# Optuna's messages (trial finished, pruned) go through the application's logging setup
optuna.logging.disable_default_handler()
optuna.logging.enable_propagation()


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def cap_train_rows(rows: pd.DataFrame, max_per_class: int | None, seed: int) -> pd.DataFrame:
    """At most ``max_per_class`` training images per class, a seeded choice per class."""
    if max_per_class is None:
        return rows
    kept = []
    for label, group in rows.sort_values("path").groupby("label", sort=True):
        if len(group) > max_per_class:
            order = np.sort(class_rng(seed, f"tune:{label}").permutation(len(group))[:max_per_class])
            group = group.iloc[order]
        kept.append(group)
    return pd.concat(kept).sort_values("path")


#: train.* keys every trial sets to the defaults: trials run in one process (they scale out
#: as Optuna workers, one per GPU, not under torchrun), so these never enter a study's name
TRIAL_FIXED = {
    name: TrainParams.model_fields[name].default for name in ("launcher", "nproc_per_node", "sync_batchnorm")
}


def recipe_digest(train: TrainParams, space: SearchSpace) -> str:
    """A short hash of what a run computes with, the searched knobs (every configuration
    sets its own) and the plumbing left out: what ``bench/tune_trust.py`` records with its
    figures and the tune stage compares before quoting them."""
    ignored = {*_NOT_RESULT_AFFECTING, *space.searched(), *TRIAL_FIXED}
    kept = {k: v for k, v in train.model_dump(mode="json").items() if k not in ignored}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:16]


def trial_base(train: TrainParams, tune: TuneParams) -> TrainParams:
    """The train params every trial starts from: train.* with the trial's epoch count, in
    one process (:data:`TRIAL_FIXED`)."""
    return TrainParams.model_validate({**train.model_dump(), "epochs": tune.epochs, **TRIAL_FIXED})


def suggest(trial: optuna.Trial, space: SearchSpace) -> dict[str, Any]:
    """Draw one point of the search space (the dimension names are the train.* keys)."""
    values: dict[str, Any] = {}
    for name in ("beta", "lr", "weight_decay", "mixup_alpha"):
        dim = getattr(space, name)
        if dim is not None:
            values[name] = trial.suggest_float(name, dim.low, dim.high, log=dim.log)
    if space.inter_method is not None:
        values["inter_method"] = trial.suggest_categorical("inter_method", list(space.inter_method))
    return values


def with_values(base: TrainParams, values: dict[str, Any]) -> TrainParams:
    return TrainParams.model_validate({**base.model_dump(), **values})


def study_name(
    image_root: Path,
    train_rows: pd.DataFrame,
    val_rows: pd.DataFrame,
    class_names: Sequence[str],
    seed: int,
    base: TrainParams,
    tune: TuneParams,
) -> str:
    """``synermix-tune-<hash>`` of everything that decides what the trials compute."""
    digest = hashlib.sha256()
    ignored = {*_NOT_RESULT_AFFECTING, *tune.space.searched()}  # searched: every trial sets its own
    settings = {
        "classes": list(class_names),
        "seed": seed,
        "train": {k: v for k, v in base.model_dump(mode="json").items() if k not in ignored},
        "tune": {k: v for k, v in tune.model_dump(mode="json").items() if k not in _NOT_TRIAL_AFFECTING},
    }
    digest.update(json.dumps(settings, sort_keys=True).encode())
    for name, rows in (("train", train_rows), ("val", val_rows)):
        digest.update(name.encode())
        for path, label in rows.sort_values("path")[["path", "label"]].itertuples(index=False):
            # the prepared file's bytes: what trials train on (resized by data.image_size)
            file_hash = hashlib.sha256((image_root / path).read_bytes()).hexdigest()
            digest.update(f"{path}\t{label}\t{file_hash}\n".encode())
    package = Path(__file__).parent
    for name in _CODE:
        digest.update((package / name).read_bytes())
    return STUDY_PREFIX + digest.hexdigest()[:16]


class TrialSeededTPESampler(TPESampler):
    """TPE whose random draws for trial ``n`` are seeded by ``(seed, n)`` alone.

    A plain seeded TPESampler carries one random stream through a process: a resumed
    study or a second worker would then draw different (or, for two workers with one
    seed, identical) points. Seeding per trial number makes each draw a function of the
    seed, the trial number and the trials already finished.
    """

    def __init__(self, seed: int, **kwargs: Any) -> None:
        super().__init__(seed=seed, **kwargs)
        self._base_seed = seed

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        trial_seed = int(np.random.SeedSequence([self._base_seed, trial.number]).generate_state(1)[0])
        self._rng.rng.seed(trial_seed)
        self._random_sampler._rng.rng.seed(trial_seed)
        super().before_trial(study, trial)


def build_sampler(seed: int, tune: TuneParams) -> TPESampler:
    # multivariate: lr and beta interact; constant_liar: workers avoid the points that
    # running trials are already trying
    return TrialSeededTPESampler(
        seed, n_startup_trials=tune.startup_trials, multivariate=True, constant_liar=True
    )


def build_pruner(pruner: PrunerParams, epochs: int) -> optuna.pruners.BasePruner:
    if pruner.kind == "median":
        # steps are 1-based epochs, and Optuna may prune at step >= n_warmup_steps
        return optuna.pruners.MedianPruner(
            n_startup_trials=pruner.startup_trials, n_warmup_steps=pruner.warmup_epochs + 1
        )
    if pruner.kind == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=pruner.min_epochs, reduction_factor=pruner.reduction_factor
        )
    if pruner.kind == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=pruner.min_epochs, max_resource=epochs, reduction_factor=pruner.reduction_factor
        )
    return optuna.pruners.NopPruner()


#: overrides tune.storage, so a URL with a password need not sit in params.yaml
STORAGE_ENV = "SYNERMIX_TUNE_STORAGE"


def storage_url(tune: TuneParams, local_file: Path) -> str:
    """SYNERMIX_TUNE_STORAGE, else tune.storage, else a SQLite file at ``local_file``."""
    return os.environ.get(STORAGE_ENV) or tune.storage or f"sqlite:///{local_file.resolve()}"


def open_storage(url: str, tune: TuneParams, attempts: int = 4) -> RDBStorage:
    """An Optuna RDB storage with heartbeats: dead workers' trials are failed and retried."""
    # SQLite: wait for a lock rather than fail when two local workers write at once
    sqlite = url.startswith("sqlite")
    engine_kwargs: dict[str, Any] = {"connect_args": {"timeout": 60}} if sqlite else {"pool_pre_ping": True}
    try:
        for attempt in range(attempts):
            try:
                return RDBStorage(
                    url,
                    engine_kwargs=engine_kwargs,
                    heartbeat_interval=tune.heartbeat_seconds,
                    grace_period=tune.grace_seconds,
                    heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=tune.max_retry),
                )
            except ImportError:
                raise
            except Exception:
                # workers starting together on an empty database race to create its tables
                # (PostgreSQL enum types); the loser sees them on its next try
                if attempt == attempts - 1:
                    raise
                time.sleep(1 + attempt)
        raise AssertionError("unreachable")
    except ImportError as exc:  # Optuna wraps the driver's ModuleNotFoundError
        missing = getattr(exc.__cause__, "name", None) or getattr(exc, "name", None) or "?"
        raise UserError(
            f"tune.storage {redact_uri(url)}: the database driver '{missing}' is not installed; "
            "for PostgreSQL use postgresql://… (psycopg 3 is installed with synermix)"
        ) from None
    except Exception as exc:
        reason = first_line(exc)
        raise UserError(
            f"tune.storage {redact_uri(url)}: cannot open the study database ({reason}); "
            "check the server is running and reachable and the URL, user and password"
        ) from None


def open_study(storage: RDBStorage, name: str, seed: int, tune: TuneParams, create: bool) -> optuna.Study:
    sampler = build_sampler(seed, tune)
    pruner = build_pruner(tune.pruner, tune.epochs)
    if create:
        return optuna.create_study(
            study_name=name,
            storage=storage,
            sampler=sampler,
            pruner=pruner,
            direction="maximize",
            load_if_exists=True,
        )
    return optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner)


# -- budget --------------------------------------------------------------------------


def is_counted(trial: FrozenTrial) -> bool:
    """Whether a trial uses up one unit of the trial budget."""
    if trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
        return True
    return trial.state == TrialState.FAIL and bool(trial.user_attrs.get(ATTR_FAIL_REASON))


def counted_trials(trials: Sequence[FrozenTrial], n_trials: int) -> list[FrozenTrial]:
    """The first ``n_trials`` counted trials by number: the study as this budget sees it
    (a study extended by a larger budget gives the same answer for the smaller one)."""
    return [t for t in sorted(trials, key=lambda t: t.number) if is_counted(t)][:n_trials]


def seconds_used(trials: Sequence[FrozenTrial]) -> float:
    total = 0.0
    for t in trials:
        if t.datetime_start is not None and t.datetime_complete is not None:
            total += (t.datetime_complete - t.datetime_start).total_seconds()
    return total


@dataclass
class BudgetState:
    counted: int
    running: int
    waiting: int
    seconds: float

    @classmethod
    def of(cls, trials: Sequence[FrozenTrial]) -> BudgetState:
        live = [t for t in trials if not t.user_attrs.get(ATTR_SURPLUS)]
        return cls(
            counted=sum(is_counted(t) for t in live),
            running=sum(t.state == TrialState.RUNNING for t in live),
            waiting=sum(t.state == TrialState.WAITING for t in live),
            seconds=seconds_used(live),
        )


class _Surplus(Exception):
    """A trial started after the budget was already taken by other workers."""


# -- the objective and the worker loop -------------------------------------------------


@dataclass
class Tuner:
    """Runs trials of one study: each trains ``base`` with the suggested values."""

    study: optuna.Study
    tune: TuneParams
    base: TrainParams
    seed: int
    class_names: list[str]
    data: TrainingData | None  # None only when no trial is left to run
    checkpoint_dir: Path
    #: per trial number: the epoch rows of that trial (for reports and MLflow)
    histories: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    #: loads ``data`` when it is None and a re-run needs it
    load_data: Callable[[], TrainingData] | None = None
    #: the starting weights (:func:`synermix.training.check_training_inputs`), read once for
    #: every trial; None: each trial resolves ``train.init`` itself
    init: Any = None

    def objective(self, trial: optuna.Trial) -> float:
        frozen = next(t for t in self.study.get_trials(deepcopy=False) if t.number == trial.number)
        retry_of = RetryHeartbeatStaleTrialCallback.retried_trial_number(frozen)
        if retry_of is None:
            self._check_not_surplus(trial)
        values = suggest(trial, self.tune.space)
        params = with_values(self.base, values)
        trial.set_user_attr(ATTR_WORKER, worker_id())
        trial.set_user_attr(ATTR_RESUMED, 0)  # a retry inherits the failed trial's attrs
        checkpoint = self.checkpoint_dir / f"{_values_key(values)}.pt"
        history = self.histories.setdefault(trial.number, [])
        objective = self.tune.objective

        def report(row: dict[str, Any]) -> None:
            history.append(row)
            trial.set_user_attr(ATTR_EPOCHS, len(history))
            trial.report(float(row[objective]), step=int(row["epoch"]))
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned after epoch {row['epoch']}")

        log.info(
            "trial %d%s, budget %d trials: %s",
            trial.number,
            f" (retry of trial {retry_of})" if retry_of is not None else "",
            self.tune.n_trials,
            ", ".join(f"{k}={_fmt(v)}" for k, v in values.items()),
        )
        try:
            result = train_model(
                self._training_data(),
                self.class_names,
                params,
                self.seed,
                checkpoint_path=checkpoint,
                on_epoch_end=report,
                on_resume=lambda epoch: trial.set_user_attr(ATTR_RESUMED, epoch),
                init=self.init,
            )
        except optuna.TrialPruned:
            checkpoint.unlink(missing_ok=True)
            raise
        except TrainingDiverged as exc:
            # the same values and seed diverge again: record it, count it, do not retry
            trial.set_user_attr(ATTR_FAIL_REASON, f"diverged: {exc}")
            checkpoint.unlink(missing_ok=True)
            raise
        except (Exception, KeyboardInterrupt):
            # a crash or Ctrl-C (Optuna marks the trial failed): queue these values again,
            # and keep the checkpoint so the retry resumes. Anything else (SystemExit) leaves
            # the trial running; its heartbeat stops and the stale-trial check retries it.
            frozen = next(t for t in self.study.get_trials(deepcopy=False) if t.number == trial.number)
            retried = len(frozen.system_attrs.get("retry_history", []))
            if retried < self.tune.max_retry:
                RetryHeartbeatStaleTrialCallback(max_retry=self.tune.max_retry)(self.study, frozen)
            else:
                log.error("trial %d failed after %d retries; not retried again", trial.number, retried)
                checkpoint.unlink(missing_ok=True)
            raise
        checkpoint.unlink(missing_ok=True)
        return objective_value(result, objective)

    def _training_data(self) -> TrainingData:
        """The shared images, loaded on first need (a complete study needs none)."""
        if self.data is None:
            if self.load_data is None:
                raise RuntimeError("a trial or re-run needs the training data and no loader was given")
            self.data = self.load_data()
        return self.data

    def rerun(self, trial: FrozenTrial, seed: int) -> float:
        """Train ``trial``'s values once more, as the trial did but with ``seed``.

        An epoch checkpoint lets a re-run killed half-way resume; a diverged loss raises
        :class:`TrainingDiverged` (recorded by :func:`rerun_top`)."""
        values = dict(trial.params)
        checkpoint = self.checkpoint_dir / f"rerun-{_values_key(values)}-{seed}.pt"
        try:
            result = train_model(
                self._training_data(),
                self.class_names,
                with_values(self.base, values),
                seed,
                checkpoint_path=checkpoint,
                init=self.init,
            )
        except TrainingDiverged:
            checkpoint.unlink(missing_ok=True)
            raise
        checkpoint.unlink(missing_ok=True)
        return objective_value(result, self.tune.objective)

    def _check_not_surplus(self, trial: optuna.Trial) -> None:
        before = [
            t
            for t in self.study.get_trials(deepcopy=False)
            if t.number < trial.number
            and not t.user_attrs.get(ATTR_SURPLUS)
            and (is_counted(t) or t.state in (TrialState.RUNNING, TrialState.WAITING))
        ]
        if len(before) >= self.tune.n_trials:
            trial.set_user_attr(ATTR_SURPLUS, True)
            raise _Surplus(f"trial {trial.number} is beyond the budget of {self.tune.n_trials}")

    def run(
        self,
        callbacks: Sequence[Callable[[optuna.Study, FrozenTrial], None]] = (),
        wait_for_others: bool = True,
        poll_seconds: float | None = None,
    ) -> BudgetState:
        """Run trials until the budget is used up.

        ``wait_for_others``: also wait for trials other workers are running (a dead one's
        trial is failed after ``grace_seconds`` and retried here), so the study is complete
        on return. Extra workers return as soon as no trial is left to start."""
        poll = poll_seconds if poll_seconds is not None else self.tune.heartbeat_seconds
        limit = self.tune.timeout_minutes * 60 if self.tune.timeout_minutes else None
        announced = False
        while True:
            optuna.storages.fail_stale_trials(self.study)
            state = BudgetState.of(self.study.get_trials(deepcopy=False))
            if state.counted >= self.tune.n_trials:
                return state
            out_of_time = limit is not None and state.seconds >= limit
            if not out_of_time and (state.waiting or state.counted + state.running < self.tune.n_trials):
                announced = False
                self.study.optimize(
                    self.objective,
                    n_trials=1,
                    catch=(TrainingDiverged, _Surplus),
                    callbacks=list(callbacks),
                    gc_after_trial=True,
                )
                continue
            if not (wait_for_others and state.running):
                if out_of_time:
                    log.info(
                        "time budget of %g min used up (%.0f s of trials); %d of %d trials counted",
                        self.tune.timeout_minutes,
                        state.seconds,
                        state.counted,
                        self.tune.n_trials,
                    )
                return state
            if not announced:
                announced = True
                log.info(
                    "waiting for %d trial(s) running elsewhere (a dead worker's trial is retried "
                    "after %d s without a heartbeat)",
                    state.running,
                    self.tune.grace_seconds,
                )
            time.sleep(poll)


def objective_value(result: Any, objective: str) -> float:
    """The objective of a training run: its kept epoch's row (``TrainingResult.selected``,
    train.keep), or the last epoch's where the result has no selection."""
    row = getattr(result, "selected", None) or result.final
    return float(row[objective])


def _values_key(values: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


# -- results ---------------------------------------------------------------------------


def best_trial(trials: Sequence[FrozenTrial]) -> FrozenTrial | None:
    """The complete trial with the highest value (the lowest number on a tie)."""
    complete = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
    if not complete:
        return None
    return max(complete, key=lambda t: (t.value, -t.number))


def state_name(trial: FrozenTrial) -> str:
    if trial.user_attrs.get(ATTR_SURPLUS):
        return "surplus"
    return trial.state.name.lower()


# -- re-runs of the best trials ----------------------------------------------------------

#: tags the seed stream of the re-runs apart from every other use of ``seed``
_RERUN_STREAM = 0x52455255


def rerun_seeds(seed: int, count: int) -> list[int]:
    """The seeds of re-runs 1..``count``: a function of ``seed`` and the re-run index alone
    (more re-runs keep the first ones), none equal to ``seed`` or to another."""
    seeds: list[int] = []
    index = 0
    while len(seeds) < count:
        index += 1
        drawn = int(np.random.SeedSequence([seed, _RERUN_STREAM, index]).generate_state(1)[0])
        if drawn != seed and drawn not in seeds:
            seeds.append(drawn)
    return seeds


def top_trials(trials: Sequence[FrozenTrial], k: int) -> list[FrozenTrial]:
    """The ``k`` complete trials with the highest values (the lower number first on a tie)."""
    complete = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
    return sorted(complete, key=lambda t: (-t.value, t.number))[:k]


@dataclass(frozen=True)
class SeedRun:
    """One training run of a candidate's values: the trial itself or a re-run."""

    seed: int
    value: float | None  # None: the loss diverged
    rerun: int  # 0: the trial itself; i: re-run i
    fail_reason: str | None = None


@dataclass(frozen=True)
class Candidate:
    """A trial re-run with more seeds: its values on every seed and their statistics."""

    trial: FrozenTrial
    runs: tuple[SeedRun, ...]

    @property
    def number(self) -> int:
        return self.trial.number

    @property
    def values(self) -> list[float]:
        return [r.value for r in self.runs if r.value is not None]

    @property
    def failed(self) -> int:
        return sum(r.value is None for r in self.runs)

    @property
    def mean(self) -> float:
        return float(np.mean(self.values))

    @property
    def std(self) -> float | None:
        """Sample standard deviation over the seeds (None with fewer than two values)."""
        return float(np.std(self.values, ddof=1)) if len(self.values) > 1 else None

    @property
    def min(self) -> float:
        return float(np.min(self.values))

    @property
    def max(self) -> float:
        return float(np.max(self.values))


#: the trial number of the baseline candidate: params.yaml's own values of the searched knobs
BASELINE = BASELINE_TRIAL


@dataclass(frozen=True)
class BaselineTrial:
    """params.yaml's values of the searched knobs, re-run like a trial (it is no Optuna trial:
    the search itself is left as it is)."""

    params: dict[str, Any]
    number: int = BASELINE
    value: float | None = None


def best_candidate(candidates: Sequence[Candidate]) -> Candidate:
    """The candidate with the best mean over its seeds (the lower trial number on a tie);
    one with a diverged run ranks after every candidate without one. Means equal to 12
    places tie (float sums of the same values in another order differ in the last bit)."""
    if not candidates:
        raise ValueError("no candidate to choose from")
    return max(candidates, key=lambda c: (c.failed == 0, round(c.mean, 12), -c.number))


def _split_baseline(candidates: Sequence[Candidate]) -> tuple[Candidate | None, list[Candidate]]:
    """The baseline candidate (None without one) and the trials' candidates."""
    baseline = next((c for c in candidates if c.number == BASELINE), None)
    return baseline, [c for c in candidates if c.number != BASELINE]


def choose(candidates: Sequence[Candidate]) -> Candidate:
    """The values train gets. Without a baseline among ``candidates``: the best mean. With one
    (:data:`BASELINE`, params.yaml's values on the same seeds): the best other candidate only
    when its mean beats the baseline's by more than one seed spread (:func:`seed_spread`, over
    every candidate), else the baseline: a difference the seeds alone make is not a finding."""
    baseline, others = _split_baseline(candidates)
    if baseline is None or not others:
        return best_candidate(candidates)
    best = best_candidate(others)
    if baseline.failed or not baseline.values:
        return best
    beats = best.failed == 0 and best.mean - baseline.mean > (seed_spread(candidates) or 0.0)
    return best if beats else baseline


def margin_over_baseline(candidates: Sequence[Candidate]) -> tuple[float, float] | None:
    """(best other mean - baseline mean, seed spread) when a baseline was run, else None."""
    baseline, others = _split_baseline(candidates)
    if baseline is None or not others or not baseline.values:
        return None
    return best_candidate(others).mean - baseline.mean, seed_spread(candidates) or 0.0


def seed_spread(candidates: Sequence[Candidate]) -> float | None:
    """The pooled within-candidate standard deviation: how far the objective moves from
    seed to seed at a fixed configuration (None without two values of one candidate)."""
    dof = sum(len(c.values) - 1 for c in candidates if len(c.values) > 1)
    if not dof:
        return None
    squares = sum((len(c.values) - 1) * c.std**2 for c in candidates if c.std is not None)
    return float(np.sqrt(squares / dof))


def _rerun_key(trial: int, seed: int) -> str:
    return f"{RERUN_PREFIX}{trial}:{seed}"


def stored_reruns(study: optuna.Study) -> dict[tuple[int, int], dict[str, Any]]:
    """The finished re-runs of ``study`` by (trial number, seed)."""
    found = {}
    for key, record in study.user_attrs.items():
        if key.startswith(RERUN_PREFIX) and isinstance(record, dict):
            trial, _, seed = key[len(RERUN_PREFIX) :].partition(":")
            found[(int(trial), int(seed))] = record
    return found


def baseline_values(train: Any, tune: TuneParams) -> dict[str, Any]:
    """params.yaml's values (``train``) of the knobs ``tune`` searches."""
    return {name: getattr(train, name) for name in tune.space.searched()}


def rerun_top(
    study: optuna.Study,
    counted: Sequence[FrozenTrial],
    tune: TuneParams,
    seed: int,
    rerun: Callable[[FrozenTrial, int], float],
    baseline: Mapping[str, Any] | None = None,
) -> list[Candidate]:
    """Re-run the ``tune.rerun_top_k`` best complete trials of ``counted`` with
    ``tune.rerun_seeds`` more seeds each; [] when re-runs are off. With ``baseline``
    (params.yaml's values of the searched knobs) it is trained too, with the trials' own seed
    and the same re-run seeds, and comes last as candidate :data:`BASELINE`; its stored runs
    count only while they were trained on the same values.

    ``rerun(trial, seed)`` trains the trial's values with ``seed`` and returns the
    objective (:meth:`Tuner.rerun`). Each result is stored in the study as it finishes,
    and stored ones are not run again. A :class:`TrainingDiverged` is stored as a failed
    run; any other error stops here (the next call resumes after the stored runs)."""
    if tune.rerun_top_k == 0:
        return []
    top = top_trials(counted, tune.rerun_top_k)
    seeds = rerun_seeds(seed, tune.rerun_seeds)
    stored = stored_reruns(study)
    pending = [(t, s) for t in top for s in seeds if (t.number, s) not in stored]
    base = BaselineTrial(dict(baseline)) if baseline is not None and top else None
    if base is not None:
        # stored under the seed alone, so a run of other values (params.yaml changed since,
        # while the study, which does not hash the searched knobs, stayed) is run again
        for s in (seed, *seeds):
            record = stored.get((BASELINE, s))
            if record is not None and record.get("params") != base.params:
                del stored[(BASELINE, s)]
        pending += [(base, s) for s in (seed, *seeds) if (BASELINE, s) not in stored]
    if pending:
        runs = len(top) * len(seeds) + (0 if base is None else 1 + len(seeds))
        log.info(
            "re-running the top %d trial(s) with %d more seed(s) each%s: %d run(s) of %d epochs "
            "to go, %d stored",
            len(top),
            len(seeds),
            "" if base is None else f", and params.yaml's values on {1 + len(seeds)} seeds",
            len(pending),
            tune.epochs,
            runs - len(pending),
        )
    for done, (trial, run_seed) in enumerate(pending, start=1):
        start = time.perf_counter()
        log.info(
            "re-run %d/%d: %s (%s%s) with seed %d",
            done,
            len(pending),
            "params.yaml's values" if trial.number == BASELINE else f"trial {trial.number}",
            ", ".join(f"{k}={_fmt(v)}" for k, v in trial.params.items()),
            "" if trial.value is None else f", value {trial.value:.4f}",
            run_seed,
        )
        record: dict[str, Any] = {"params": dict(trial.params), "worker": worker_id()}
        try:
            record["value"] = float(rerun(trial, run_seed))
        except TrainingDiverged as exc:
            record["value"], record["fail_reason"] = None, f"diverged: {exc}"
            log.warning("re-run of trial %d with seed %d diverged: %s", trial.number, run_seed, exc)
        record["seconds"] = round(time.perf_counter() - start, 3)
        study.set_user_attr(_rerun_key(trial.number, run_seed), record)
        stored[(trial.number, run_seed)] = record
        if record["value"] is not None:
            log.info("re-run of trial %d with seed %d: %.4f", trial.number, run_seed, record["value"])

    def stored_run(number: int, run_seed: int, index: int) -> SeedRun:
        record = stored[(number, run_seed)]
        value = record.get("value")
        return SeedRun(run_seed, None if value is None else float(value), index, record.get("fail_reason"))

    candidates = []
    for trial in top:
        runs = [SeedRun(seed, float(trial.value), 0)]
        runs += [stored_run(trial.number, s, i) for i, s in enumerate(seeds, start=1)]
        candidates.append(Candidate(trial, tuple(runs)))
    if base is not None:  # its run 0 is a stored run too: the baseline is no Optuna trial
        runs = [stored_run(BASELINE, s, i) for i, s in enumerate((seed, *seeds))]
        candidates.append(Candidate(base, tuple(runs)))  # type: ignore[arg-type]
    return candidates
