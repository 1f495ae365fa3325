"""``synermix``: the commands a person runs by hand.

``synermix params`` checks params.yaml and prints the resolved values; ``synermix
prepare`` / ``validate`` / ``tune`` / ``train`` / ``evaluate`` / ``export`` run one stage
outside DVC (DVC runs the same code through ``pipeline/``); ``synermix tune --worker``
adds a worker to a running study; ``synermix predict`` classifies images with an exported
ONNX model.
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
    for noisy in ("great_expectations", "matplotlib", "PIL", "onnxscript", "onnx_ir"):
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
    sub.add_parser("export", help="run the export stage (ONNX + parity check against PyTorch)")
    predict = sub.add_parser(
        "predict",
        help="classify image files or folders with an exported ONNX model (CSV or JSON out)",
        description="Classify images with an exported ONNX model. Each image gets a row: path, "
        "status (ok | abstain | error), class, confidence, every class score, and the error "
        "for files that could not be scored (the batch goes on).",
    )
    predict.add_argument("paths", nargs="+", help="image files and/or folders (searched recursively)")
    predict.add_argument("--model", default="models/onnx/model.onnx", help="ONNX file (default: %(default)s)")
    predict.add_argument("--out", help="write here (.csv or .json); default: CSV on stdout")
    predict.add_argument("--format", choices=("csv", "json"), help="default: from --out's suffix, else csv")
    predict.add_argument(
        "--abstain",
        type=float,
        default=0.0,
        metavar="P",
        help="mark images whose top class probability is below P as 'abstain' (manual inspection)",
    )
    predict.add_argument("--batch-size", type=int, default=32)
    predict.add_argument("--provider", choices=("auto", "cpu", "cuda", "tensorrt"), default="auto")
    predict.add_argument(
        "--max-pixels", type=int, default=40_000_000, help="decompression-bomb guard (default: %(default)s)"
    )
    return parser


def _predict(args: argparse.Namespace) -> int:
    """``synermix predict``: one row per image; unreadable images are rows with an error."""
    import json

    import pandas as pd

    from synermix.data.images import IMAGE_EXTENSIONS
    from synermix.errors import UserError
    from synermix.inference import Classifier, image_files, read_files

    if not 0.0 <= args.abstain <= 1.0:
        raise UserError(f"--abstain {args.abstain:g}: give a probability between 0 and 1")
    if args.batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    missing = [p for p in args.paths if not Path(p).exists()]
    if missing:
        raise UserError(f"no such file or folder: {', '.join(missing)}")
    model = Path(args.model)
    if not model.is_file():
        raise UserError(f"{model}: no ONNX model there; run the export stage (dvc repro) or pass --model")
    try:
        classifier = Classifier(model, provider=args.provider, max_pixels=args.max_pixels)
    except Exception as exc:  # onnxruntime raises plain Exception subclasses for a non-ONNX file
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"{model}: not a model this command can run ({reason}); give an exported .onnx"
        ) from None
    files = image_files(args.paths)
    if not files:
        raise UserError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {', '.join(args.paths)}")
    results = classifier.predict(read_files(files), batch_size=args.batch_size, abstain_below=args.abstain)
    rows = [r.to_row(classifier.class_names) for r in results]
    fmt = args.format or ("json" if args.out and args.out.lower().endswith(".json") else "csv")
    if fmt == "json":
        text = json.dumps(
            {"model": str(model), "provider": classifier.provider, "predictions": rows}, indent=2
        )
    else:
        text = pd.DataFrame(rows).to_csv(index=False, lineterminator="\n")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text if text.endswith("\n") else text + "\n")
    else:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
    counts = {s: sum(r.status == s for r in results) for s in ("ok", "abstain", "error")}
    logging.getLogger("synermix.predict").info(
        "%d image(s): %d classified, %d abstained, %d could not be scored (provider %s)",
        len(results),
        counts["ok"],
        counts["abstain"],
        counts["error"],
        classifier.provider,
    )
    for r in results:
        if r.status == "error":
            logging.getLogger("synermix.predict").warning("%s: %s", r.path, r.error)
    return 0


@exit_on_user_error
def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    setup_logging(args.verbose)
    if args.command == "predict":  # needs the model file only, not params.yaml
        return _predict(args)
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
    elif args.command == "export":
        from synermix.stages import run_export

        run_export(params)
    return 0


if __name__ == "__main__":
    sys.exit(main())
