"""Pruning benchmark: the same tuning budget with and without pruning, side by side.

Runs the real tune stage (``synermix.stages.tune.run_tune``) once per pruner and seed, each in
a scratch folder with its own study and MLflow store, on the project's prepared data (run
``dvc repro validate`` first) or on a Fashion-MNIST subset, and prints for each: trials
complete/pruned, epochs spent, the share of the epochs of the same search without pruning,
the best validation value and its distance from the search without pruning, and the wall
time; with several seeds, also the means.

Target: pruning spends at most 60 % of the epochs and finds a value within 0.5 points
(0.005) of the search without pruning.

    python bench/tune_pruning.py                       # params.yaml's settings on the project's data
    python bench/tune_pruning.py --data fashion-mnist --seeds 1,2,3 --set train.image_size=28
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path

import yaml

from synermix.cli import setup_logging
from synermix.config import load_params, parse_params
from synermix.paths import PREPARED_DIR, QUARANTINE_CSV
from synermix.stages.prepare import run_prepare
from synermix.stages.tune import run_tune
from synermix.stages.validate import run_validate


def _override(raw: dict, dotted: str, value: str) -> None:
    *parents, leaf = dotted.split(".")
    node = raw
    for part in parents:
        node = node[part]
    node[leaf] = yaml.safe_load(value)


def _prepare_fashion_mnist(raw: dict, per_class: int, root: Path) -> None:
    """A Fashion-MNIST subset prepared and validated in ``root`` (the real stages)."""
    raw = {**raw, "data": {**raw["data"], "source": "fashion-mnist", "max_per_class": per_class}}
    params = parse_params(raw, "bench")
    run_prepare(params, root)
    run_validate(params, root)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--pruners", default="none,median,successive_halving")
    parser.add_argument("--trials", type=int, default=None, help="tune.n_trials (default: params.yaml)")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds, a search each (default: seed)")
    parser.add_argument(
        "--data",
        choices=("project", "fashion-mnist"),
        default="project",
        help="project: data/prepared of this project (dvc repro validate first); "
        "fashion-mnist: a Fashion-MNIST subset prepared in a scratch folder",
    )
    parser.add_argument("--per-class", type=int, default=300, help="fashion-mnist: images per class")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any params override in YAML, e.g. --set tune.pruner.min_epochs=2 (repeatable)",
    )
    args = parser.parse_args()
    setup_logging()
    for name in ("synermix", "optuna", "mlflow"):
        logging.getLogger(name).setLevel(logging.WARNING)

    raw = load_params(args.params).model_dump(mode="json", by_alias=True)
    if args.trials:
        raw["tune"]["n_trials"] = args.trials
    for item in args.set:
        key, _, value = item.partition("=")
        _override(raw, key, value)
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else [raw["seed"]]
    pruners = args.pruners.split(",")

    with tempfile.TemporaryDirectory(prefix="tune-bench-") as scratch:
        data_root = Path.cwd()
        if args.data == "fashion-mnist":
            data_root = Path(scratch) / "data-root"
            os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{Path(scratch) / 'prepare-mlflow.db'}"
            _prepare_fashion_mnist(raw, args.per_class, data_root)
        for needed in (PREPARED_DIR, QUARANTINE_CSV):
            if not (data_root / needed).exists():
                raise SystemExit(f"{needed} is missing: run `dvc repro validate` first")
        results: dict[tuple[int, str], dict] = {}
        for seed in seeds:
            for kind in pruners:
                raw["seed"] = seed
                raw["tune"]["pruner"]["kind"] = kind
                params = parse_params(raw, "bench")
                root = Path(scratch) / f"{seed}-{kind}"
                for linked in (PREPARED_DIR, QUARANTINE_CSV):
                    (root / linked).parent.mkdir(parents=True, exist_ok=True)
                    (root / linked).symlink_to(data_root / linked)
                os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
                start = time.perf_counter()
                metrics = run_tune(params, root)
                metrics["seconds"] = time.perf_counter() - start
                results[(seed, kind)] = metrics
                print(f"seed {seed}, {kind}: {metrics}", flush=True)

    tune = params.tune
    print(
        f"\n{args.data}: {tune.n_trials} trials of {tune.epochs} epochs, at most {tune.max_per_class} "
        f"images per class, objective {tune.objective}, seeds {', '.join(map(str, seeds))}\n"
    )
    print("| seed | pruner | complete | pruned | epochs | share of unpruned | best | vs none (points) | s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for (seed, kind), m in results.items():
        reference = results.get((seed, "none"))
        share = m["epochs_spent"] / reference["epochs_spent"] if reference else m["epochs_fraction"]
        diff = f"{100 * (m['best_value'] - reference['best_value']):+.2f}" if reference else "n/a"
        print(
            f"| {seed} | {kind} | {m['trials_complete']} | {m['trials_pruned']} | {m['epochs_spent']} | "
            f"{100 * share:.1f} % | {m['best_value']:.4f} | {diff} | {m['seconds']:.0f} |"
        )
    if len(seeds) > 1 and "none" in pruners:
        print("\nmean over seeds:\n\n| pruner | share of unpruned epochs | best | vs none (points) |")
        print("|---|---:|---:|---:|")
        for kind in pruners:
            rows = [(results[(s, kind)], results[(s, "none")]) for s in seeds]
            share = sum(m["epochs_spent"] for m, _ in rows) / sum(r["epochs_spent"] for _, r in rows)
            best = sum(m["best_value"] for m, _ in rows) / len(rows)
            diff = sum(m["best_value"] - r["best_value"] for m, r in rows) / len(rows)
            print(f"| {kind} | {100 * share:.1f} % | {best:.4f} | {100 * diff:+.2f} |")


if __name__ == "__main__":
    main()
