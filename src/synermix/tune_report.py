"""The tune stage's reports: trial tables and plots as files, and a readable summary.

Pure rendering from the study's trials (no MLflow, DVC or Optuna storage here): CSV files
that ``dvc plots`` draws, PNG figures for MLflow, ``reports/tune.md`` and the numbers
behind ``reports/tune.json``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
from optuna.trial import FrozenTrial, TrialState

from synermix.config import SearchSpace
from synermix.tuning import (
    ATTR_EPOCHS,
    ATTR_FAIL_REASON,
    ATTR_RESUMED,
    ATTR_SURPLUS,
    ATTR_WORKER,
    is_counted,
    state_name,
)

log = logging.getLogger(__name__)


def trials_table(trials: Sequence[FrozenTrial], space: SearchSpace) -> pd.DataFrame:
    """One row per trial: number, state, value, the searched values, epochs used, time."""
    names = space.searched()
    rows = []
    for t in sorted(trials, key=lambda t: t.number):
        if t.user_attrs.get(ATTR_SURPLUS):
            continue
        duration = (
            (t.datetime_complete - t.datetime_start).total_seconds()
            if t.datetime_start is not None and t.datetime_complete is not None
            else None
        )
        last = max(t.intermediate_values) if t.intermediate_values else None
        rows.append(
            {
                "trial": t.number,
                "state": state_name(t),
                "value": t.value if t.state == TrialState.COMPLETE else None,
                "last_reported": t.intermediate_values[last] if last is not None else None,
                **{name: t.params.get(name) for name in names},
                "epochs_used": t.user_attrs.get(ATTR_EPOCHS, len(t.intermediate_values)),
                "counted": is_counted(t),
                "retry_of": t.system_attrs.get("failed_trial"),
                "resumed_from_epoch": t.user_attrs.get(ATTR_RESUMED),
                "fail_reason": t.user_attrs.get(ATTR_FAIL_REASON),
                "worker": t.user_attrs.get(ATTR_WORKER),
                "seconds": duration,
            }
        )
    columns = [
        "trial",
        "state",
        "value",
        "last_reported",
        *names,
        "epochs_used",
        "counted",
        "retry_of",
        "resumed_from_epoch",
        "fail_reason",
        "worker",
        "seconds",
    ]
    return pd.DataFrame(rows, columns=columns)


def history_table(trials: Sequence[FrozenTrial]) -> pd.DataFrame:
    """Optimisation history: each counted trial's value (complete ones) and the best so far."""
    rows, best = [], None
    for t in sorted(trials, key=lambda t: t.number):
        value = t.value if t.state == TrialState.COMPLETE else None
        if value is not None:
            best = value if best is None else max(best, value)
        rows.append({"trial": t.number, "state": state_name(t), "value": value, "best_so_far": best})
    return pd.DataFrame(rows, columns=["trial", "state", "value", "best_so_far"])


def param_importances(trials: Sequence[FrozenTrial], seed: int) -> dict[str, float]:
    """fANOVA importances over the complete trials ({} with fewer than two of them)."""
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    searched = {name for t in complete for name in t.params}
    if len(complete) < 2:
        return {}
    if len(searched) == 1:
        return {searched.pop(): 1.0}
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "new study in memory" line
    try:
        study = optuna.create_study(direction="maximize")
    finally:
        optuna.logging.set_verbosity(verbosity)
    study.add_trials(complete)
    try:
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=seed)
        values = optuna.importance.get_param_importances(study, evaluator=evaluator)
    except (RuntimeError, ValueError) as exc:  # e.g. every trial with the same values
        log.warning("parameter importances not computed: %s", exc)
        return {}
    return {name: round(float(v), 6) for name, v in values.items()}


def summary_metrics(
    trials: Sequence[FrozenTrial], best: FrozenTrial, epochs_per_trial: int
) -> dict[str, Any]:
    """Counts and the epoch budget: ``epochs_fraction`` is the share of the epochs the
    counted trials would have used without pruning."""
    counted = list(trials)
    spent = sum(len(t.intermediate_values) for t in counted)
    full = len(counted) * epochs_per_trial
    return {
        "best_value": round(float(best.value), 6),
        "best_trial": best.number,
        "trials": len(counted),
        "trials_complete": sum(t.state == TrialState.COMPLETE for t in counted),
        "trials_pruned": sum(t.state == TrialState.PRUNED for t in counted),
        "trials_failed": sum(t.state == TrialState.FAIL for t in counted),
        "epochs_per_trial": epochs_per_trial,
        "epochs_spent": spent,
        "epochs_without_pruning": full,
        "epochs_fraction": round(spent / full, 6) if full else 0.0,
    }


def write_tables(
    out_dir: Path, trials: pd.DataFrame, history: pd.DataFrame, importances: Mapping[str, float]
) -> dict[str, Path]:
    """``trials.csv``, ``history.csv`` and ``importances.csv`` (the DVC plots)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {name: out_dir / f"{name}.csv" for name in ("trials", "history", "importances")}
    shown = trials.drop(columns=["worker", "seconds"])  # host names and timings stay in MLflow
    shown.to_csv(paths["trials"], index=False, lineterminator="\n", float_format="%.6g")
    history.to_csv(paths["history"], index=False, lineterminator="\n", float_format="%.6g")
    frame = pd.DataFrame(sorted(importances.items(), key=lambda kv: -kv[1]), columns=["param", "importance"])
    frame.to_csv(paths["importances"], index=False, lineterminator="\n", float_format="%.6g")
    return paths


def write_figures(
    out_dir: Path,
    trials: pd.DataFrame,
    history: pd.DataFrame,
    importances: Mapping[str, float],
    objective: str,
) -> list[Path]:
    """PNG figures: beta against the objective, optimisation history, importances."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    colours = {"complete": "tab:blue", "pruned": "tab:orange", "fail": "tab:red"}

    fig, ax = plt.subplots(figsize=(6, 4))
    for state, group in trials.groupby("state"):
        ax.scatter(group["beta"], group["last_reported"], label=state, c=colours.get(state, "grey"), s=28)
    ax.set(xlabel="beta", ylabel=f"{objective} (last epoch run)", title="beta against the objective")
    ax.legend()
    written.append(_save(fig, out_dir / "beta_vs_objective.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter(history["trial"], history["value"], label="complete trial", s=28)
    ax.step(history["trial"], history["best_so_far"], where="post", label="best so far", c="tab:green")
    ax.set(xlabel="trial", ylabel=objective, title="optimisation history")
    ax.legend()
    written.append(_save(fig, out_dir / "optimisation_history.png"))

    if importances:
        fig, ax = plt.subplots(figsize=(6, 1 + 0.5 * len(importances)))
        names = sorted(importances, key=importances.get)
        ax.barh(names, [importances[n] for n in names])
        ax.set(xlabel="importance (fANOVA)", title="parameter importances")
        written.append(_save(fig, out_dir / "param_importances.png"))
    plt.close("all")
    return written


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def render_markdown(
    study: str,
    objective: str,
    metrics: Mapping[str, Any],
    best_values: Mapping[str, Any],
    trials: pd.DataFrame,
    importances: Mapping[str, float],
    budget_note: str,
) -> str:
    lines = [
        "# Tuning",
        "",
        f"Study `{study}`, objective **{objective}** on the validation split (the test split is never used).",
        "",
        f"**Best: {metrics['best_value']:.4f}** in trial {metrics['best_trial']} with "
        + ", ".join(f"`{k}` = {_fmt(v)}" for k, v in best_values.items())
        + ".",
        "",
        f"- Trials: {metrics['trials']} ({metrics['trials_complete']} complete, "
        f"{metrics['trials_pruned']} pruned, {metrics['trials_failed']} failed)",
        f"- Epochs: {metrics['epochs_spent']} of {metrics['epochs_without_pruning']} without pruning "
        f"({100 * metrics['epochs_fraction']:.1f} %)",
        f"- {budget_note}",
    ]
    if importances:
        lines.append("- Importances (fANOVA): " + ", ".join(f"{k} {v:.2f}" for k, v in importances.items()))
    lines += ["", "| " + " | ".join(_columns(trials)) + " |", "|" + "---|" * len(_columns(trials))]
    for row in trials[_columns(trials)].itertuples(index=False):
        lines.append("| " + " | ".join(_fmt(v) for v in row) + " |")
    return "\n".join(lines) + "\n"


def _columns(trials: pd.DataFrame) -> list[str]:
    hidden = {"worker", "seconds", "counted"}
    return [c for c in trials.columns if c not in hidden]


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
