"""Trust bench: does the tune stage's short-trial objective rank configurations the way
full training does?

For ``--configs N`` configurations of the searched knobs (beta, lr, ... of
``tune.space``: the first N points of a seeded, scrambled Halton sequence over the space,
log-scaled where the space is, so more configs keep the first ones),
each is trained twice with the project's own functions on the prepared data:

- **trial**: exactly as a tune trial (``tune.epochs`` on at most ``tune.max_per_class``
  training images per class, the seeded cap of :func:`synermix.tuning.cap_train_rows`),
- **full**: as the train stage (``train.epochs`` on every usable training image),

both validated on the val split and scored with ``tune.objective`` on the kept epoch
(train.keep). It then reports the Spearman rank correlation between the two objectives
over the configurations, each row (values, trial objective, full objective, seconds)
and, with ``--seed-repeats K``, the trial objective of one fixed configuration under K
seeds (the seed param and the tune stage's re-run seeds): the noise a single trial has.

Every finished run is stored in the ``--out`` JSON at once (keyed by its settings), so a
killed bench continues where it stopped and a rerun with more configs reuses the old ones.
Run after ``dvc repro prepare validate``::

    python bench/tune_trust.py --configs 12 --seed-repeats 5
    python bench/tune_trust.py --set train.device=cuda --set tune.epochs=6

Smoke test on a tiny prepared project (``--root``), with the full runs shortened too::

    python bench/tune_trust.py --root /tmp/tiny --params /tmp/tiny/params.yaml --configs 8 \\
        --max-per-class-full 6 --set train.epochs=1 --set tune.epochs=1 --set train.image_size=32
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from synermix.cli import setup_logging
from synermix.config import Params, SearchSpace, TrainParams, load_params, parse_params
from synermix.errors import UserError, exit_on_user_error
from synermix.tuning import TRIAL_FIXED

log = logging.getLogger("tune_trust")

#: the knobs a config sets (the search space's float dimensions, then inter_method)
_FLOAT_DIMS = ("beta", "lr", "weight_decay", "mixup_alpha")


def apply_overrides(raw: dict[str, Any], items: list[str]) -> dict[str, Any]:
    """``--set train.lr=0.05`` style overrides (YAML values) of train.* and tune.* only."""
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.startswith(("train.", "tune.")):
            raise UserError(f"--set {item}: expected train.<key>=<value> or tune.<key>=<value>")
        *parents, leaf = key.split(".")
        node = raw
        for part in parents:
            if not isinstance(node.get(part), dict):
                raise UserError(f"--set {item}: {part} is not a section of the params")
            node = node[part]
        node[leaf] = yaml.safe_load(value)
    return raw


def configurations(space: SearchSpace, count: int, seed: int) -> list[dict[str, Any]]:
    """The first ``count`` points of a seeded scrambled Halton sequence over the space (a
    low-discrepancy design: evenly spread in every dimension, and a larger ``count`` keeps
    the first points, so their stored runs stay valid), log-scaled where the dimension is;
    inter_method cycles its list."""
    from scipy.stats import qmc

    dims = [(name, getattr(space, name)) for name in _FLOAT_DIMS if getattr(space, name) is not None]
    unit = qmc.Halton(d=len(dims), scramble=True, seed=np.random.default_rng(seed)).random(count)
    configs = []
    for i, row in enumerate(unit):
        values: dict[str, Any] = {}
        for (name, dim), u in zip(dims, row, strict=True):
            if dim.log:
                value = math.exp(math.log(dim.low) + u * (math.log(dim.high) - math.log(dim.low)))
            else:
                value = dim.low + u * (dim.high - dim.low)
            values[name] = float(f"{value:.4g}")
        if space.inter_method:
            values["inter_method"] = space.inter_method[i % len(space.inter_method)]
        configs.append(values)
    return configs


def fixed_configuration(space: SearchSpace, train: TrainParams) -> dict[str, Any]:
    """train.* of the searched knobs, clipped into the space: the seed-repeat config."""
    values: dict[str, Any] = {}
    for name in _FLOAT_DIMS:
        dim = getattr(space, name)
        if dim is not None:
            values[name] = float(min(max(getattr(train, name), dim.low), dim.high))
    if space.inter_method:
        values["inter_method"] = (
            train.inter_method if train.inter_method in space.inter_method else space.inter_method[0]
        )
    return values


class RunCache:
    """The ``--out`` JSON: finished runs by key, rewritten atomically after each run."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = {"runs": {}}
        if path.is_file():
            try:
                self.data = json.loads(path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise UserError(
                    f"{path}: not readable JSON ({exc}); move it away or pass another --out"
                ) from None
            self.data.setdefault("runs", {})
            log.info("%s: %d finished run(s) stored", path, len(self.data["runs"]))

    def get(self, key: str) -> dict[str, Any] | None:
        return self.data["runs"].get(key)

    def put(self, key: str, record: dict[str, Any]) -> None:
        self.data["runs"][key] = record
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(tmp, self.path)


def run_key(kind: str, params: TrainParams, seed: int, data_key: str) -> str:
    """A run's cache key: everything that decides its result."""
    # these do not change what a run computes; every bench run is one process (TRIAL_FIXED)
    ignored = ("num_workers", "cache_images", *TRIAL_FIXED)
    settings = {k: v for k, v in params.model_dump(mode="json").items() if k not in ignored}
    text = json.dumps({"kind": kind, "seed": seed, "data": data_key, "train": settings}, sort_keys=True)
    return f"{kind}-{hashlib.sha256(text.encode()).hexdigest()[:16]}"


def rows_key(manifest_sha: str, rows: Any) -> str:
    digest = hashlib.sha256(manifest_sha.encode())
    for path in sorted(rows["path"]):
        digest.update(f"{path}\n".encode())
    return digest.hexdigest()[:16]


def spearman(x: list[float], y: list[float]) -> dict[str, float | None]:
    from scipy.stats import spearmanr

    if len(x) < 3 or len(set(x)) < 2 or len(set(y)) < 2:
        return {"rho": None, "p": None}  # undefined for constant or too few values
    result = spearmanr(x, y)
    return {"rho": round(float(result.statistic), 6), "p": round(float(result.pvalue), 6)}


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


@exit_on_user_error
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--root", default=".", help="project root holding data/prepared (default: .)")
    parser.add_argument("--configs", type=int, default=8, help="configurations to compare (at least 3; 8+)")
    parser.add_argument(
        "--seed-repeats",
        type=int,
        default=0,
        help="also train one fixed config (train.* clipped into tune.space) this many times "
        "with trial settings, one seed each, for the trial objective's seed spread",
    )
    parser.add_argument(
        "--full-seed-repeats",
        type=int,
        default=0,
        help="also train the fixed config this many times with full settings, one seed each, "
        "for the full objective's seed spread (what a difference between configs must beat)",
    )
    parser.add_argument(
        "--max-per-class-full",
        type=int,
        default=None,
        help="cap the full runs' training images per class (a quick smoke test; default: all)",
    )
    parser.add_argument("--out", default="reports/bench/tune_trust.json")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="train.* or tune.* override in YAML, e.g. --set tune.epochs=6 (repeatable)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="per-epoch logs of every run")
    args = parser.parse_args()
    setup_logging()
    if not args.verbose:
        for name in ("synermix", "optuna", "mlflow"):
            logging.getLogger(name).setLevel(logging.WARNING)
    if args.configs < 3:
        raise UserError(
            f"--configs {args.configs}: give at least 3 (8 or more for a rank correlation to mean much)"
        )
    if (
        args.seed_repeats < 0
        or args.full_seed_repeats < 0
        or (args.max_per_class_full is not None and args.max_per_class_full < 1)
    ):
        raise UserError("--seed-repeats and --full-seed-repeats must be >= 0 and --max-per-class-full >= 1")
    if args.configs < 8:
        log.warning("--configs %d: fewer than 8 configurations give a rough rank correlation", args.configs)

    raw = load_params(args.params).model_dump(mode="json", by_alias=True)
    params: Params = parse_params(apply_overrides(raw, args.set), f"{args.params} with --set")
    root = Path(args.root)
    report = run_bench(
        params,
        root,
        args.configs,
        args.seed_repeats,
        args.max_per_class_full,
        Path(args.out),
        full_seed_repeats=args.full_seed_repeats,
    )
    _log_report(report)


def run_bench(
    params: Params,
    root: Path,
    n_configs: int,
    seed_repeats: int,
    max_per_class_full: int | None,
    out: Path,
    *,
    full_seed_repeats: int = 0,
) -> dict[str, Any]:
    """Train every config twice (trial and full settings), the fixed config with every
    seed; return (and store in ``out``) the rows, the rank correlation and the spread."""
    from tqdm import tqdm

    from synermix.paths import PREPARED_DIR, QUARANTINE_CSV
    from synermix.stages.common import train_val_rows
    from synermix.training import TrainingData, load_training_data, train_model
    from synermix.tuning import (
        cap_train_rows,
        objective_value,
        recipe_digest,
        rerun_seeds,
        trial_base,
        with_values,
    )

    for needed in (PREPARED_DIR, QUARANTINE_CSV):
        if not (root / needed).exists():
            raise UserError(f"{root / needed} is missing: run `dvc repro prepare validate` first")
    tune, seed = params.tune, params.tune_seed
    names, train_rows, val_rows, manifest_sha = train_val_rows(params, root)
    trial_rows = cap_train_rows(train_rows, tune.max_per_class, seed)
    full_rows = cap_train_rows(train_rows, max_per_class_full, seed) if max_per_class_full else train_rows
    base_trial = trial_base(params.train, tune)
    base_full = params.train
    image_root = root / PREPARED_DIR
    data_keys = {"trial": rows_key(manifest_sha, trial_rows), "full": rows_key(manifest_sha, full_rows)}
    bases = {"trial": base_trial, "full": base_full}
    rows_of = {"trial": trial_rows, "full": full_rows}
    loaded: dict[str, TrainingData] = {}

    configs = configurations(tune.space, n_configs, seed)
    fixed = fixed_configuration(tune.space, params.train)
    repeat_seeds = [seed, *rerun_seeds(seed, seed_repeats - 1)] if seed_repeats else []
    full_seeds = [seed, *rerun_seeds(seed, full_seed_repeats - 1)] if full_seed_repeats else []
    jobs: list[tuple[str, dict[str, Any], int]] = [
        (kind, c, seed) for c in configs for kind in ("trial", "full")
    ]
    jobs += [("trial", fixed, s) for s in repeat_seeds]
    jobs += [("full", fixed, s) for s in full_seeds]

    cache = RunCache(out)
    cache.data["settings"] = {
        "seed": seed,
        "objective": tune.objective,
        "tune_epochs": tune.epochs,
        "tune_max_per_class": tune.max_per_class,
        "train_epochs": params.train.epochs,
        "trial_images": len(trial_rows),
        "full_images": len(full_rows),
        "val_images": len(val_rows),
        "max_per_class_full": max_per_class_full,
        "manifest_sha256": manifest_sha,
        # what the tune stage compares before quoting these figures in reports/tune.md
        "trial_recipe": recipe_digest(base_trial, tune.space),
        "full_recipe": recipe_digest(base_full, tune.space),
    }
    log.info(
        "%d configs x (trial: %d epochs on %d images; full: %d epochs on %d images), val %d images, "
        "objective %s%s",
        len(configs),
        tune.epochs,
        len(trial_rows),
        params.train.epochs,
        len(full_rows),
        len(val_rows),
        tune.objective,
        f"; {len(repeat_seeds)} seed repeats of {fixed}" if repeat_seeds else "",
    )

    def run(kind: str, values: dict[str, Any], run_seed: int) -> dict[str, Any]:
        train_params = with_values(bases[kind], values)
        key = run_key(kind, train_params, run_seed, data_keys[kind])
        stored = cache.get(key)
        if stored is not None:
            return stored
        if kind not in loaded:
            loaded[kind] = load_training_data(rows_of[kind], val_rows, image_root, names, bases[kind])
        start = time.perf_counter()
        result = train_model(loaded[kind], names, train_params, run_seed)
        row = getattr(result, "selected", None) or result.final
        record = {
            "kind": kind,
            "values": values,
            "seed": run_seed,
            "objective": objective_value(result, tune.objective),
            "val_accuracy": float(row["val_accuracy"]),
            "val_macro_recall": float(row["val_macro_recall"]),
            "epoch": int(row["epoch"]),
            "seconds": round(time.perf_counter() - start, 2),
        }
        cache.put(key, record)
        return record

    results: list[dict[str, Any]] = []
    pending = sum(
        cache.get(run_key(k, with_values(bases[k], v), s, data_keys[k])) is None for k, v, s in jobs
    )
    log.info("%d run(s), %d stored in %s, %d to train", len(jobs), len(jobs) - pending, out, pending)
    for kind, values, run_seed in tqdm(jobs, desc="tune trust", unit="run", disable=None):
        results.append(run(kind, values, run_seed))

    by_config = []
    for i, values in enumerate(configs):
        trial = results[2 * i]
        full = results[2 * i + 1]
        by_config.append(
            {
                "config": i,
                **values,
                "trial_objective": trial["objective"],
                "full_objective": full["objective"],
                "trial_seconds": trial["seconds"],
                "full_seconds": full["seconds"],
            }
        )
    trial_values = [r["trial_objective"] for r in by_config]
    full_values = [r["full_objective"] for r in by_config]
    best_by_trial = max(range(len(by_config)), key=lambda i: (trial_values[i], -i))
    full_rank = 1 + sum(v > full_values[best_by_trial] for v in full_values)
    report: dict[str, Any] = {
        "settings": cache.data["settings"],
        "rows": by_config,
        "spearman": spearman(trial_values, full_values),
        "trial_best_config": best_by_trial,
        "trial_best_full_rank": full_rank,
        "trial_objective_std_across_configs": round(float(np.std(trial_values, ddof=1)), 6),
    }
    start = 2 * len(configs)
    for key, seeds in (("seed_repeats", repeat_seeds), ("full_seed_repeats", full_seeds)):
        if seeds:
            values = [r["objective"] for r in results[start : start + len(seeds)]]
            start += len(seeds)
            report[key] = {
                "values": fixed,
                "seeds": seeds,
                "objectives": values,
                "mean": round(float(np.mean(values)), 6),
                "std": round(float(np.std(values, ddof=1)), 6) if len(values) > 1 else None,
                "min": min(values),
                "max": max(values),
            }
    cache.data["report"] = report
    cache.save()
    return report


def _log_report(report: dict[str, Any]) -> None:
    settings, rows = report["settings"], report["rows"]
    names = [
        k for k in rows[0] if k not in ("config", "trial_objective", "full_objective") and "seconds" not in k
    ]
    emit = log.info
    emit(
        f"{settings['objective']}: trial = {settings['tune_epochs']} epochs on {settings['trial_images']} "
        f"images; full = {settings['train_epochs']} epochs on {settings['full_images']} images; "
        f"val {settings['val_images']} images"
    )
    header = ["config", *names, "trial objective", "full objective", "trial s", "full s"]
    emit("| " + " | ".join(header) + " |")
    emit("|" + "---|" * len(header))
    for r in rows:
        cells = [r["config"], *(r[n] for n in names), r["trial_objective"], r["full_objective"]]
        cells += [r["trial_seconds"], r["full_seconds"]]
        emit("| " + " | ".join(_fmt(c) for c in cells) + " |")
    rho = report["spearman"]
    emit(
        f"Spearman rank correlation (trial vs full objective, {len(rows)} configs): "
        f"rho = {_fmt(rho['rho'])}, p = {_fmt(rho['p'])}"
    )
    emit(
        f"The best config by trial objective (config {report['trial_best_config']}) ranks "
        f"{report['trial_best_full_rank']} of {len(rows)} by full objective; the trial objective's "
        f"std across configs is {_fmt(report['trial_objective_std_across_configs'])}"
    )
    for key, kind in (("seed_repeats", "trial"), ("full_seed_repeats", "full")):
        repeats = report.get(key)
        if repeats:
            emit(
                f"Seed spread at {repeats['values']}: {len(repeats['seeds'])} seeds, {kind} objective "
                f"mean {_fmt(repeats['mean'])} ± {_fmt(repeats['std'])} (min {_fmt(repeats['min'])}, "
                f"max {_fmt(repeats['max'])}): {', '.join(_fmt(v) for v in repeats['objectives'])}"
            )


if __name__ == "__main__":
    main()
