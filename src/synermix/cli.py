"""``synermix``: the commands a person runs by hand.

``synermix params`` checks params.yaml and prints the resolved values;
``synermix prepare`` / ``validate`` / ``tune`` / ``train`` / ``evaluate`` run one stage outside DVC (DVC
runs the same code through ``pipeline/``); ``synermix tune --worker`` adds a worker to a
running study.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml

from synermix.config import load_params
from synermix.errors import exit_on_user_error


def setup_logging(verbose: bool = False) -> None:
    level = logging.DEBUG if verbose or os.environ.get("SYNERMIX_DEBUG") else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("great_expectations", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="synermix", description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("params", help="check params.yaml and print the values in force")
    sub.add_parser("prepare", help="run the prepare stage (images + manifest + splits)")
    sub.add_parser("validate", help="run the validate stage (Great Expectations on the manifest)")
    tune = sub.add_parser("tune", help="run the tune stage (Optuna search of beta), or join it as a worker")
    tune.add_argument(
        "--worker",
        action="store_true",
        help="join the study of a running tune stage (same data and params, shared tune.storage) "
        "and run trials until its budget is used; writes no outputs",
    )
    tune.add_argument(
        "--wait",
        type=float,
        default=120.0,
        metavar="SECONDS",
        help="with --worker: how long to wait for the study to appear (default 120)",
    )
    sub.add_parser("train", help="run the train stage (SynerMix training, logged to MLflow)")
    sub.add_parser(
        "evaluate",
        help="run the evaluate stage (test metrics, gates, champion comparison); exit 1 when a gate fails",
    )
    return parser


@exit_on_user_error
def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    setup_logging(args.verbose)
    params = load_params(Path(args.params))
    if args.command == "params":
        dumped = params.model_dump(mode="json", by_alias=True)
        print(yaml.safe_dump(dumped, sort_keys=False), end="")
    elif args.command == "prepare":
        from synermix.stages import run_prepare

        run_prepare(params)
    elif args.command == "validate":
        from synermix.stages import run_validate

        run_validate(params)
    elif args.command == "tune":
        from synermix.stages import run_tune

        run_tune(params, worker=args.worker, wait_seconds=args.wait)
    elif args.command == "train":
        from synermix.stages import run_train

        run_train(params)
    elif args.command == "evaluate":
        from synermix.stages import run_evaluate

        run_evaluate(params)
    return 0


if __name__ == "__main__":
    sys.exit(main())
