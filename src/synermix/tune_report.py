"""The tune stage's reports: trial tables and plots as files, and a readable summary.

Pure rendering from the study's trials and re-runs (no MLflow, DVC or Optuna storage
here): CSV files that ``dvc plots`` draws, PNG figures for MLflow, ``reports/tune.md`` and
the numbers behind ``reports/tune.json``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
from optuna.trial import FrozenTrial, TrialState

from synermix.config import SearchSpace
from synermix.paths import TUNE_FIGURES, TUNE_TABLES
from synermix.tuning import (
    ATTR_EPOCHS,
    ATTR_FAIL_REASON,
    ATTR_RESUMED,
    ATTR_SURPLUS,
    ATTR_WORKER,
    BASELINE,
    Candidate,
    choose,
    is_counted,
    margin_over_baseline,
    seed_spread,
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


def rerun_table(candidates: Sequence[Candidate], names: Sequence[str]) -> pd.DataFrame:
    """One row per (candidate, seed): the trial's own run (``rerun`` 0) and its re-runs,
    with the candidate's mean and sample std over its seeds (``chosen`` marks the pick)."""

    chosen = choose(candidates).number if candidates else None
    rows = []
    for c in candidates:
        for run in c.runs:
            rows.append(
                {
                    "trial": c.number,
                    "rerun": run.rerun,
                    "seed": run.seed,
                    "value": run.value,
                    "state": "complete" if run.value is not None else "fail",
                    **{name: c.trial.params.get(name) for name in names},
                    "mean": c.mean,
                    "std": c.std,
                    "chosen": c.number == chosen,
                }
            )
    columns = ["trial", "rerun", "seed", "value", "state", *names, "mean", "std", "chosen"]
    return pd.DataFrame(rows, columns=columns)


def rerun_metrics(candidates: Sequence[Candidate], chosen: Candidate) -> dict[str, Any]:
    """tune.json's numbers on the re-runs: the choice and the seed-to-seed spread."""
    spread = seed_spread(candidates)
    margin = margin_over_baseline(candidates)
    return {
        "chosen_trial": chosen.number,
        "chosen_mean": round(chosen.mean, 6),
        "chosen_std": None if chosen.std is None else round(chosen.std, 6),
        "seed_spread": None if spread is None else round(spread, 6),
        "rerun_candidates": sum(c.number != BASELINE for c in candidates),
        "baseline_kept": None if margin is None else chosen.number == BASELINE,
        "margin_over_baseline": None if margin is None else round(margin[0], 6),
        "seeds_per_candidate": len(chosen.runs),
        "reruns_failed": sum(c.failed for c in candidates),
    }


def write_tables(
    out_dir: Path,
    trials: pd.DataFrame,
    history: pd.DataFrame,
    importances: Mapping[str, float],
    reruns: pd.DataFrame | None = None,
) -> dict[str, Path]:
    """``trials.csv``, ``history.csv``, ``importances.csv`` (the DVC plots) and
    ``reruns.csv`` (only its header without re-runs)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {name: out_dir / path.name for name, path in TUNE_TABLES.items()}
    shown = trials.drop(columns=["worker", "seconds"])  # host names and timings stay in MLflow
    shown.to_csv(paths["trials"], index=False, lineterminator="\n", float_format="%.6g")
    history.to_csv(paths["history"], index=False, lineterminator="\n", float_format="%.6g")
    frame = pd.DataFrame(sorted(importances.items(), key=lambda kv: -kv[1]), columns=["param", "importance"])
    frame.to_csv(paths["importances"], index=False, lineterminator="\n", float_format="%.6g")
    if reruns is None:
        reruns = rerun_table([], [c for c in ("beta", "lr") if c in trials.columns])
    reruns.to_csv(paths["reruns"], index=False, lineterminator="\n", float_format="%.6g")
    return paths


def write_figures(
    out_dir: Path,
    trials: pd.DataFrame,
    history: pd.DataFrame,
    importances: Mapping[str, float],
    objective: str,
    reruns: pd.DataFrame | None = None,
) -> list[Path]:
    """PNG figures: beta against the objective (with the re-run candidates' mean ± std
    over their seeds), optimisation history, importances."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    colours = {"complete": "tab:blue", "pruned": "tab:orange", "fail": "tab:red"}

    fig, ax = plt.subplots(figsize=(6, 4))
    for state, group in trials.groupby("state"):
        ax.scatter(group["beta"], group["last_reported"], label=state, c=colours.get(state, "grey"), s=28)
    if reruns is not None and not reruns.empty:
        means = reruns.groupby("trial").first()
        ax.errorbar(
            means["beta"],
            means["mean"],
            yerr=means["std"].fillna(0),
            fmt="D",
            c="black",
            ms=4,
            capsize=3,
            label="mean ± std over seeds",
        )
    ax.set(xlabel="beta", ylabel=f"{objective} (last epoch run)", title="beta against the objective")
    if ax.get_legend_handles_labels()[0]:  # none without trials (no search)
        ax.legend()
    written.append(_save(fig, out_dir / TUNE_FIGURES["beta"].name))

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter(history["trial"], history["value"], label="complete trial", s=28)
    ax.step(history["trial"], history["best_so_far"], where="post", label="best so far", c="tab:green")
    ax.set(xlabel="trial", ylabel=objective, title="optimisation history")
    if ax.get_legend_handles_labels()[0]:  # none without trials (no search)
        ax.legend()
    written.append(_save(fig, out_dir / TUNE_FIGURES["history"].name))

    fig, ax = plt.subplots(figsize=(6, 1 + 0.5 * max(len(importances), 2)))
    if importances:
        names = sorted(importances, key=importances.get)
        ax.barh(names, [importances[n] for n in names])
    else:  # one knob, too few complete trials, or no search: the file is still a DVC output
        ax.text(0.5, 0.5, "no importances: too few complete trials or knobs", ha="center", va="center")
        ax.set_yticks([])
    ax.set(xlabel="importance (fANOVA)", title="parameter importances")
    written.append(_save(fig, out_dir / TUNE_FIGURES["importances"].name))
    plt.close("all")
    return written


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"Software": None})  # same bytes for the same figure
    return path


def trust_figures(path: Path, expected: Mapping[str, Any]) -> dict[str, Any] | None:
    """``bench/tune_trust.py``'s rank correlation between the trial objective and full
    training's (``path``: its JSON), when it was measured with every setting in ``expected``
    (trial and full-training recipes, epochs, images, objective, data); else None."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    report = data.get("report") if isinstance(data, dict) else None
    if not isinstance(report, dict) or not isinstance(report.get("settings"), dict):
        return None
    if any(report["settings"].get(key) != value for key, value in expected.items()):
        return None
    spearman = report.get("spearman") or {}
    return {
        "rho": spearman.get("rho"),
        "p": spearman.get("p"),
        "configs": len(report.get("rows") or []),
        "trial_best_full_rank": report.get("trial_best_full_rank"),
    }


def _trust_section(trust: Mapping[str, Any] | None, expected: Mapping[str, Any] | None) -> list[str]:
    title = ["## Do the short trials rank full trainings?", ""]
    if trust is None or trust.get("rho") is None:
        settings = (
            f"trials of {expected['tune_epochs']} epochs on {expected['trial_images']} images, full "
            f"training of {expected['train_epochs']} epochs"
            if expected
            else "this recipe"
        )
        text = (
            f"Not measured for these settings ({settings}): `python bench/tune_trust.py --configs 8` "
            "trains 8 configurations both ways and writes the Spearman rank correlation, which this "
            "report then quotes. Until then, read the trials' ranking as unproven."
        )
        return [*title, text]
    verdict = (
        "At 0.7 or more, the trials rank configurations as full training does."
        if trust["rho"] >= 0.7
        else "Under 0.7, the trials do not rank configurations as full training does: a trial's "
        "win is not evidence that its full training is better."
    )
    text = (
        f"Measured by `bench/tune_trust.py` for these settings: Spearman rho **{trust['rho']:+.3f}** "
        f"(p {trust['p']:.3g}) between the trial objective and the full-training objective over "
        f"{trust['configs']} configurations; the trials' favourite ranked {trust['trial_best_full_rank']} "
        f"of {trust['configs']} in full training. {verdict}"
    )
    return [*title, text]


def render_markdown(
    study: str,
    objective: str,
    metrics: Mapping[str, Any],
    best_values: Mapping[str, Any],
    trials: pd.DataFrame,
    importances: Mapping[str, float],
    budget_note: str,
    candidates: Sequence[Candidate] = (),
    trust: Mapping[str, Any] | None = None,
    trust_settings: Mapping[str, Any] | None = None,
) -> str:
    """tune.md. With ``candidates`` (re-runs), the headline is the chosen candidate and
    its mean over seeds, followed by a section on the seed spread; then whether short trials
    were shown to rank full trainings (``trust``, from :func:`trust_figures`)."""
    margin = margin_over_baseline(candidates) if candidates else None
    chosen = choose(candidates) if candidates else None
    if chosen is not None and chosen.number == BASELINE:
        gap, spread = margin
        headline = [
            "**Kept params.yaml's values** "
            + ", ".join(f"`{k}` = {_fmt(v)}" for k, v in chosen.trial.params.items())
            + f": mean **{chosen.mean:.4f}**"
            + (f" ± {chosen.std:.4f}" if chosen.std is not None else "")
            + f" over {len(chosen.values)} seeds. The best of the top {len(candidates) - 1} trials "
            f"(re-run on the same seeds) is {gap:+.4f} against them, not more than one seed spread "
            f"({spread:.4f}): at this trial budget the search cannot tell it from them, so train "
            "keeps them (`tune.keep_baseline`). The single best trial was "
            f"trial {metrics['best_trial']} ({metrics['best_value']:.4f}).",
        ]
    elif chosen is not None:
        beaten = (
            f" It beats params.yaml's values (re-run on the same seeds) by {margin[0]:+.4f}, more "
            f"than one seed spread ({margin[1]:.4f})."
            if margin is not None
            else ""
        )
        headline = [
            f"**Chosen: trial {chosen.number}** with "
            + ", ".join(f"`{k}` = {_fmt(v)}" for k, v in chosen.trial.params.items())
            + f": mean **{chosen.mean:.4f}**"
            + (f" ± {chosen.std:.4f}" if chosen.std is not None else "")
            + f" over {len(chosen.values)} seeds (the best mean of the top {len(candidates)} trials, "
            f"each re-run with {len(chosen.runs) - 1} more seed(s)). The single best trial was "
            f"trial {metrics['best_trial']} ({metrics['best_value']:.4f}).{beaten}",
        ]
    else:
        headline = [
            f"**Best: {metrics['best_value']:.4f}** in trial {metrics['best_trial']} with "
            + ", ".join(f"`{k}` = {_fmt(v)}" for k, v in best_values.items())
            + ".",
        ]
    lines = [
        "# Tuning",
        "",
        f"Study `{study}`, objective **{objective}** on the validation split (the test split is never used).",
        "",
        *headline,
        "",
        f"- Trials: {metrics['trials']} ({metrics['trials_complete']} complete, "
        f"{metrics['trials_pruned']} pruned, {metrics['trials_failed']} failed)",
        f"- Epochs: {metrics['epochs_spent']} of {metrics['epochs_without_pruning']} without pruning "
        f"({100 * metrics['epochs_fraction']:.1f} %)",
        f"- {budget_note}",
    ]
    if importances:
        lines.append("- Importances (fANOVA): " + ", ".join(f"{k} {v:.2f}" for k, v in importances.items()))
    if candidates:
        lines += ["", *_seed_section(candidates, objective)]
    lines += ["", *_trust_section(trust, trust_settings), "", "## Trials"]
    lines += ["", "| " + " | ".join(_columns(trials)) + " |", "|" + "---|" * len(_columns(trials))]
    for row in trials[_columns(trials)].itertuples(index=False):
        lines.append("| " + " | ".join(_fmt(v) for v in row) + " |")
    return "\n".join(lines) + "\n"


def _seed_section(candidates: Sequence[Candidate], objective: str) -> list[str]:

    chosen = choose(candidates).number
    spread = seed_spread(candidates)
    seeds = [run.seed for run in candidates[0].runs]
    names = list(candidates[0].trial.params)
    spread_text = (
        f"**{spread:.4f}**: the pooled standard deviation of {objective} over seeds at a fixed "
        "configuration. Trials whose values differ by less than about twice that are not told "
        "apart by one short trial each."
        if spread is not None
        else "not measured (no candidate has two values)."
    )
    header = ["trial", *names, *(f"seed {s}" + (" (trial)" if i == 0 else "") for i, s in enumerate(seeds))]
    header += ["mean", "std", "min", "max"]
    lines = [
        "## Seed spread",
        "",
        f"The top {sum(c.number != BASELINE for c in candidates)} complete trials, each trained again "
        f"with the same settings and {len(seeds) - 1} more seed(s)"
        + (
            ", and params.yaml's own values on the same seeds; the best mean wins only when it beats "
            "params.yaml's by more than one seed spread."
            if any(c.number == BASELINE for c in candidates)
            else "; the choice is the best mean."
        )
        + f" Seed spread {spread_text}",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for c in candidates:
        by_seed = {run.seed: run for run in c.runs}
        label = "params.yaml" if c.number == BASELINE else str(c.number)
        cells = [f"**{label}** (chosen)" if c.number == chosen else label]
        cells += [_fmt(c.trial.params.get(name)) for name in names]
        cells += [_fmt(by_seed[s].value) if by_seed[s].value is not None else "diverged" for s in seeds]
        cells += [_fmt(c.mean), _fmt(c.std), _fmt(c.min), _fmt(c.max)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _columns(trials: pd.DataFrame) -> list[str]:
    hidden = {"worker", "seconds", "counted"}
    return [c for c in trials.columns if c not in hidden]


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
