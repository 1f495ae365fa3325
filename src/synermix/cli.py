"""``synermix``: the commands a person runs by hand.

``synermix params`` checks params.yaml and prints the resolved values; ``synermix
prepare`` / ``validate`` / ``tune`` / ``train`` / ``evaluate`` / ``export`` / ``register``
run one stage outside DVC (DVC runs the same code through ``pipeline/``); ``synermix tune
--worker`` adds a worker to a running study; ``synermix predict`` classifies images with
an exported ONNX model, a bundle or a registered version. The staged rollout: ``status``,
``promote``, ``pilot-eval``, ``rollback`` and ``bundle`` (see :mod:`synermix.rollout`).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import yaml

from synermix.choices import MAX_PIXELS, PROVIDERS
from synermix.config import load_params
from synermix.errors import UserError, exit_on_user_error
from synermix.paths import ONNX_MODEL, PARAMS_FILE


def setup_logging(verbose: bool = False) -> None:
    level = logging.DEBUG if verbose or os.environ.get("SYNERMIX_DEBUG") else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("great_expectations", "matplotlib", "PIL", "onnxscript", "onnx_ir"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


#: the packages a bug report needs the versions of (distribution names)
REPORTED_PACKAGES = (
    "torch",
    "torchvision",
    "onnxruntime-gpu",
    "onnx",
    "mlflow",
    "dvc",
    "optuna",
    "great-expectations",
)


def version_text() -> str:
    """``synermix X (package versions; Python)``, read from the installed metadata (fast: no
    package is imported)."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    from synermix import __version__

    parts = []
    for name in REPORTED_PACKAGES:
        try:
            parts.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            parts.append(f"{name} not installed")
    return f"synermix {__version__} ({', '.join(parts)}; Python {platform.python_version()})"


class _Version(argparse.Action):
    def __init__(self, option_strings, dest, **kwargs) -> None:
        super().__init__(option_strings, dest, nargs=0, help="print the version and those of its packages")

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        print(version_text())
        parser.exit()


def _params_in_force(params, root: Path) -> str:
    """params.yaml as the stages will use it: train.* with the tune stage's values overlaid,
    each marked with a comment naming the trial and the value params.yaml holds."""
    from synermix.paths import BEST_PARAMS
    from synermix.stages.train import apply_tuned, kept_baseline

    dumped = params.model_dump(mode="json", by_alias=True)
    head = []
    tuned: dict = {}
    if params.tune.enabled:
        merged, tuned = apply_tuned(params.train, root / BEST_PARAMS)
        if kept_baseline(tuned):
            tuned = {}  # the values are params.yaml's own: nothing to mark
            head.append(
                f"# the tune stage kept params.yaml's values of the searched keys ({BEST_PARAMS}: no "
                "trial beat them by more than the seed spread); every value below is params.yaml's"
            )
        elif tuned:
            dumped["train"] = merged.model_dump(mode="json")
            head.append(
                f"# train.{', train.'.join(tuned['params'])} come from {BEST_PARAMS} (the tune stage: "
                f"study {tuned['study']}, trial {tuned['best_trial']}); the rest from params.yaml"
            )
        else:
            head.append(
                f"# tune.enabled: train will use the tuned values in place of train.* once the tune "
                f"stage has written {BEST_PARAMS} (not yet: the values below are params.yaml's)"
            )
    lines = yaml.safe_dump(dumped, sort_keys=False).splitlines()
    section = ""
    for i, text in enumerate(lines):
        if not text.startswith(" "):
            section = text.split(":", 1)[0]
            continue
        key = text.strip().split(":", 1)[0]
        if (
            section == "train"
            and text.startswith("  ")
            and not text.startswith("   ")
            and key in tuned.get("params", {})
        ):
            lines[i] = f"{text}  # tuned; params.yaml: {getattr(params.train, key)}"
    return "\n".join([*head, *lines]) + "\n"


#: each stage command: (one-line help, what it reads); what it writes comes from
#: paths.STAGE_OUTPUTS, the list dvc.yaml is held against
STAGE_TEXT = {
    "prepare": (
        "run the prepare stage (images + manifest + splits)",
        "data.source (the ELPV package, a <class>/<image> folder such as data/raw, or "
        "Fashion-MNIST); params seed, data.*",
    ),
    "validate": (
        "run the validate stage (Great Expectations on the manifest)",
        "data/prepared/manifest.csv; params data.classes, validate.*",
    ),
    "tune": (
        "run the tune stage (Optuna search of beta), or join it as a worker",
        "data/prepared, data/validated/quarantine.csv, reports/bench/tune_trust.json (quoted when "
        "measured with these settings); params seed, data.classes, tune.*, train.* (train.epochs "
        "excepted: trials run tune.epochs); the study database (tune.storage)",
    ),
    "train": (
        "run the train stage (SynerMix training, logged to MLflow)",
        "data/prepared, data/validated/quarantine.csv, tuning/best_params.yaml (the tuned values "
        "replace train.*); params seed, data.classes, data.image_size, train.*; train.init's weights",
    ),
    "evaluate": (
        "run the evaluate stage (test metrics, gates, champion comparison); exit 1 when a gate fails",
        "models/model, data/prepared (val, test and, for the unknown-part distance, train), "
        "data/validated/quarantine.csv; params data.source, data.classes (the classes' display "
        "order, ELPV's defect classes), evaluate.*, gates.*, decision.*, registry.model_name; the "
        "model holding gates.champion.alias in the registry",
    ),
    "export": (
        "run the export stage (ONNX + parity check against PyTorch)",
        "models/model, models/decision, reports/evaluation.json (verdict, temperature), "
        "data/prepared (parity and test images), data/validated/quarantine.csv; params seed, "
        "data.classes, export.*",
    ),
    "register": (
        "run the register stage (a version of registry.model_name with the candidate alias)",
        "models/model, models/onnx, reports/evaluation.json, reports/export.json; params "
        "registry.model_name, registry.auto_pilot; writes the MLflow registry",
    ),
}


def _stage_parser(sub, name: str):
    from synermix.paths import STAGE_OUTPUTS

    short, reads = STAGE_TEXT[name]
    writes = ", ".join(str(p) for p in STAGE_OUTPUTS[name])
    description = (
        f"The {name} stage outside DVC (dvc repro runs it with the same code). Reads: {reads}. "
        f"Writes: {writes}; and an MLflow run (mlflow.tracking_uri). Bad input is one line on stderr "
        "and exit 2."
    )
    return sub.add_parser(name, help=short, description=description)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="synermix", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action=_Version)
    parser.add_argument("--params", default=str(PARAMS_FILE), help="params file (default: params.yaml)")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser(
        "params",
        help="check params.yaml and print the values in force (tuned train.* values overlaid and marked)",
    )
    stage = {name: _stage_parser(sub, name) for name in STAGE_TEXT}
    tune = stage["tune"]
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
    _rollout_parsers(sub)
    _serve_parser(sub)
    _monitor_parser(sub)
    predict = sub.add_parser(
        "predict",
        help="classify image files or folders with an exported ONNX model (CSV or JSON out)",
        description="Classify images with an exported ONNX model. Each image gets a row: path, "
        "status (ok | abstain | error), decision (accept | reject | review | unknown, from the "
        "operating point stored in the model; empty when it has none), class, confidence, the "
        "feature distance to the nearest class, every calibrated class probability, and the error "
        "for files that could not be scored (the batch goes on).",
    )
    predict.add_argument("paths", nargs="+", help="image files and/or folders (searched recursively)")
    predict.add_argument(
        "--model",
        default=str(ONNX_MODEL),
        help="an ONNX file, a bundle folder (checksums verified first) or a registered version "
        "models:/<name>@<alias> | models:/<name>/<version> (default: %(default)s)",
    )
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
    predict.add_argument("--provider", choices=PROVIDERS, default="auto")
    predict.add_argument(
        "--max-pixels", type=int, default=MAX_PIXELS, help="decompression-bomb guard (default: %(default)s)"
    )
    return parser


def _rollout_parsers(sub) -> None:
    """promote, pilot-eval, rollback, status and bundle: the staged rollout by hand."""
    by_help = "who moves the alias (recorded; default: login@host)"
    promote = sub.add_parser(
        "promote",
        help="move @pilot or @production to a version, after its checks (recorded with who/when/why)",
        description="pilot: the version must have passed its release gates (default: the candidate). "
        "production: the version must have held pilot and have pilot-line evidence meeting "
        "registry.production_gates (default: the pilot version).",
    )
    promote.add_argument("alias", choices=("pilot", "production"))
    promote.add_argument(
        "--version", help="version number (default: candidate for pilot, pilot for production)"
    )
    promote.add_argument("--reason", required=True, help="why: recorded on the version and in the history")
    promote.add_argument("--by", help=by_help)
    pilot = sub.add_parser(
        "pilot-eval",
        help="score the @pilot version on labelled pilot-line images (<class>/<image>) and record it",
    )
    pilot.add_argument("--images", required=True, type=Path, help="folder of <class>/<image> photos")
    pilot.add_argument("--version", help="version to evaluate (default: the one holding @pilot)")
    pilot.add_argument("--by", help="who collected/ran it (default: login@host)")
    pilot.add_argument("--batch-size", type=int, default=32)
    pilot.add_argument("--provider", choices=PROVIDERS, default="auto")
    pilot.add_argument("--json", action="store_true", help="print the result as JSON")
    rollback = sub.add_parser("rollback", help="put back the version that held the alias before")
    rollback.add_argument("alias", choices=("production", "pilot"))
    rollback.add_argument("--reason", default="rollback", help="why (recorded)")
    rollback.add_argument("--by", help=by_help)
    status = sub.add_parser("status", help="versions, aliases, gates, pilot results and recent alias moves")
    status.add_argument("--json", action="store_true")
    status.add_argument("--history", type=int, default=10, help="alias moves to list (default 10)")
    bundle = sub.add_parser(
        "bundle",
        help="write a deploy bundle (model.onnx, labels, preprocessing, SHA256SUMS, model card)",
    )
    which = bundle.add_mutually_exclusive_group()
    which.add_argument(
        "--alias", default="production", help="bundle the version holding it (default production)"
    )
    which.add_argument("--version", help="bundle this version number instead")
    bundle.add_argument("--out", required=True, type=Path, help="new folder (refused when it has files)")
    verify = sub.add_parser(
        "verify-bundle", help="check a bundle's checksums and labels (non-zero exit when damaged)"
    )
    verify.add_argument("folder", type=Path)
    check = sub.add_parser(
        "check-data",
        help="what validate would say about a <class>/<image> folder, in seconds, before a run",
        description="Read every image of a <class>/<image> folder (nothing is written), split it as "
        "prepare would with params.yaml's seed and data.split, and run validate's rules on it: "
        "counts per class and split, sizes, modes, and each rule's result with the fix. Exit 0 when "
        "validate would pass, 1 when a rule would fail it, 2 when the folder cannot be read.",
    )
    check.add_argument("folder", type=Path, help="the photos: one sub-folder per class")


def _check_data(args, params) -> int:
    """``synermix check-data <folder>``: validate's verdict on a folder without a pipeline run."""
    from synermix.config import SourceSpec
    from synermix.data.prepare import manifest_in_memory
    from synermix.data.validation import validate_manifest

    if not args.folder.is_dir():
        raise UserError(f"{args.folder}: no such folder; give a folder of <class>/<image> sub-folders")
    data = params.data
    manifest, skipped = manifest_in_memory(
        SourceSpec("folder", args.folder),
        seed=params.seed,
        split=data.split.as_dict(),
        max_per_class=data.max_per_class,
        max_pixels=data.max_pixels,
    )
    report = validate_manifest(manifest, params.validate_params, data.classes)
    decoded = manifest[manifest["decodable"]]
    lines = [
        f"{args.folder}: {len(manifest)} image(s) in {manifest['label'].nunique()} class(es), "
        f"{len(manifest) - len(decoded)} undecodable, {skipped} other file(s) skipped",
    ]
    if len(decoded):
        modes = ", ".join(f"{m} {n}" for m, n in decoded["mode"].value_counts().sort_index().items())
        lines.append(
            f"sizes {int(decoded['width'].min())}-{int(decoded['width'].max())} x "
            f"{int(decoded['height'].min())}-{int(decoded['height'].max())} px; modes: {modes}"
        )
    lines += ["", "class counts (split as prepare would, seed and data.split of params.yaml):"]
    lines += ["  " + row for row in report.class_counts.to_string(index=False).splitlines()]
    defects = params.decision.defect_classes or []  # null means none for a folder source
    missing = [c for c in defects if c not in set(manifest["label"])]
    if missing:
        lines.append(
            f"decision.defect_classes names {', '.join(missing)}, not a class folder here: "
            "fix it before a run"
        )
    lines += ["", "rules:"]
    for r in report.results:
        if r.status == "off":
            continue
        text = f"  {r.rule}: {r.status.upper() if r.blocking else r.status} ({r.observed})"
        if r.status != "passed" and r.fix:
            text += f"; {r.fix}"
        lines.append(text)
        for o in r.offending[:5]:
            lines.append(f"    {o.get('file', '')}" + (f": {o['reason']}" if o.get("reason") else ""))
        if r.unexpected_count > 5 and r.offending:
            lines.append(f"    (+{r.unexpected_count - 5} more)")
    verdict = "validate would pass" if report.passed and not missing else "validate would FAIL"
    lines += ["", f"{verdict}: {report.usable_images} of {report.images} image(s) usable"]
    _say("\n".join(lines))
    return 0 if report.passed and not missing else 1


def _serve_parser(sub) -> None:
    serve = sub.add_parser(
        "serve",
        help="the inspection-line HTTP service (defaults: serve: in params.yaml)",
        description="Serve a model over HTTP: POST /v1/predict (image bytes), /v1/predict/batch "
        "(multipart), GET /v1/model, /healthz, /readyz, /metrics. Each flag overrides serve.* in "
        "params.yaml (used when the file exists).",
    )
    serve.add_argument("--model", help="bundle folder, .onnx file or models:/<name>@<alias> (followed)")
    serve.add_argument("--shadow", help="a second model scored on the same requests, for pilots")
    serve.add_argument("--shadow-log", help="JSON-lines file of shadow comparisons")
    serve.add_argument("--host", help="bind address (default 127.0.0.1: loopback only)")
    serve.add_argument("--port", type=int)
    serve.add_argument(
        "--token-file", type=Path, help="require 'Authorization: Bearer <token>' (or SYNERMIX_SERVE_TOKEN)"
    )
    serve.add_argument("--abstain", type=float, metavar="P", help="abstain below this top probability")
    serve.add_argument("--max-request-mb", type=float)
    serve.add_argument("--max-files", type=int, help="files per batch request")
    serve.add_argument("--poll-seconds", type=float, help="how often to look for a new model (0: never)")
    serve.add_argument("--max-batch", type=int, help="most images per onnxruntime run")
    serve.add_argument("--provider", choices=PROVIDERS)
    serve.add_argument("--threads", type=int, help="onnxruntime intra-op threads (default: all cores)")
    serve.add_argument("--max-pixels", type=int, help="decompression-bomb guard (default: 40000000)")
    serve.add_argument("--decode-memory-mb", type=float, help="memory all decodes in flight may take")
    serve.add_argument("--header-timeout-s", type=float, help="request headers must arrive within this")
    serve.add_argument("--body-timeout-s", type=float, help="a request body must arrive within this")
    serve.add_argument("--idle-timeout-s", type=float, help="idle keep-alive connections close after this")
    serve.add_argument("--max-connections", type=int, help="open connections at most (more: 503)")
    serve.add_argument(
        "--allowed-host",
        dest="allowed_hosts",
        action="append",
        metavar="NAME",
        help="a Host header name to serve (repeatable; '*': any)",
    )


def _monitor_parser(sub) -> None:
    monitor = sub.add_parser(
        "monitor",
        help="drift check: is the line still seeing what the model was trained on? (monitor: in params.yaml)",
        description="Compare the newest served images (the service's serve.records log) or folders of "
        "images with the reference profile stored in the model: image statistics (KS), prediction mix "
        "(chi-square), features (MMD permutation test), per-class centroid shift and cohesion, for all "
        "records and per camera / line. Writes verdict.json, report.md, report.html and plots to "
        "monitor.out and an MLflow run; exit 1 with --fail-on-drift when an alarm is raised.",
    )
    monitor.add_argument(
        "--model", help="bundle folder, .onnx file or models:/<name>@<alias> (default: serve.model)"
    )
    monitor.add_argument(
        "--records",
        type=Path,
        action="append",
        metavar="PATH",
        help="record file or folder (default: serve.records)",
    )
    monitor.add_argument(
        "--images",
        type=Path,
        action="append",
        metavar="PATH",
        help="image files or folders run through the model instead",
    )
    monitor.add_argument("--window", type=int, help="newest records checked (default: monitor.window)")
    monitor.add_argument("--out", type=Path, help="report folder (default: monitor.out)")
    monitor.add_argument("--no-mlflow", action="store_true", help="do not log an MLflow run")
    monitor.add_argument("--fail-on-drift", action="store_true", help="exit 1 when the window drifted")


def _monitor(args: argparse.Namespace, params) -> int:
    from synermix.errors import UserError
    from synermix.monitor import run_monitor

    if args.records and args.images:
        raise UserError("give --records or --images, not both")
    if args.window is not None and args.window < params.monitor.min_records:
        raise UserError(
            f"--window {args.window}: give at least monitor.min_records ({params.monitor.min_records})"
        )
    records = args.records or ([] if args.images else [Path(params.serve.records or "")])
    if not args.images and not params.serve.records and not args.records:
        raise UserError("serve.records is null: give --records <file> or --images <folder>")
    out = args.out or Path(params.monitor.out)
    verdict = run_monitor(
        params,
        args.model or params.serve.model,
        records,
        args.images or [],
        out,
        args.window,
        _store_uri(params),
        not args.no_mlflow,
    )
    head = "DRIFT: " + "; ".join(verdict["alarms"]) if verdict["drift"] else "no drift detected"
    tested = f"{verdict['records']} records, {verdict['tests']} tests at p < {verdict['threshold']:.3g}"
    _say(f"{head} ({tested}); report: {out / 'report.md'}")
    return 1 if verdict["drift"] and args.fail_on_drift else 0


def _serve(args: argparse.Namespace) -> int:
    """``synermix serve``: params.yaml's serve section (when present), overridden by flags."""
    from synermix.config import ServeParams
    from synermix.errors import UserError
    from synermix.serve import ServeSettings, run

    path = Path(args.params)
    params = load_params(path) if path.is_file() else None
    base = params.serve if params else ServeParams()
    chosen = {k: getattr(args, k) for k in ServeParams.model_fields if getattr(args, k, None) is not None}
    try:
        values = ServeParams.model_validate({**base.model_dump(), **chosen})
    except Exception as exc:
        raise UserError(f"serve flags: {exc}") from None
    token = os.environ.get("SYNERMIX_SERVE_TOKEN") or None
    if args.token_file:
        if not args.token_file.is_file():
            raise UserError(f"--token-file {args.token_file}: no such file")
        token = args.token_file.read_text().strip()
        if not token:
            raise UserError(f"--token-file {args.token_file} is empty")
    store = _store_uri(params)
    if any(spec and spec.startswith("models:/") for spec in (values.model, values.shadow)):
        from synermix.tracking import require_store

        require_store(store or os.environ.get("MLFLOW_TRACKING_URI") or "")
    monitor = params.monitor if params else None
    seed = params.seed if params else 0
    run(ServeSettings.from_params(values, token=token, tracking_uri=store, monitor=monitor, seed=seed))
    return 0


def _rollout(args: argparse.Namespace, params) -> int:
    from mlflow.exceptions import MlflowException

    from synermix.errors import UserError
    from synermix.tracking import redact_uri, require_store, store_errors, tracking_uri

    uri = tracking_uri(params.mlflow)
    require_store(uri)  # these commands read a registry: an absent SQLite file is a wrong folder
    try:
        with store_errors(uri):
            return _rollout_command(args, params)
    except MlflowException as exc:
        raise UserError(
            f"MLflow at {redact_uri(uri)} refused: {exc.message}; check "
            "MLFLOW_TRACKING_URI / mlflow.tracking_uri and registry.model_name"
        ) from None


def _rollout_command(args: argparse.Namespace, params) -> int:
    import json

    from synermix import pilot, rollout
    from synermix.bundle import bundle_version

    if args.command == "promote":
        result = rollout.promote(params, args.alias, args.version, args.reason, args.by)
        _say(
            f"{params.registry.model_name}@{args.alias} = version {result['version']}"
            + ("" if result["moved"] else " (already)")
        )
    elif args.command == "rollback":
        result = rollout.rollback(params, args.alias, args.reason, args.by)
        _say(f"{params.registry.model_name}@{args.alias}: version {result['from']} -> {result['to']}")
    elif args.command == "pilot-eval":
        result = pilot.pilot_eval(params, args.images, args.version, args.by, args.batch_size, args.provider)
        _say(json.dumps(result, indent=2, default=str) if args.json else pilot.format_pilot(result))
    elif args.command == "status":
        report = rollout.status(params, args.history)
        _say(json.dumps(report, indent=2) if args.json else rollout.format_status(report))
    elif args.command == "bundle":
        version = args.version
        bundle_version(params, args.out, None if version else args.alias, version)
        _say(f"bundle written to {args.out}")
    return 0


def _say(text: str) -> None:
    sys.stdout.write(text + ("" if text.endswith("\n") else "\n"))


def _store_uri(params) -> str | None:
    """The MLflow store for a models:/ spec: None (MLflow reads MLFLOW_TRACKING_URI, else its
    default) when the variable is set or there is no params file, else the params' store."""
    if params is None or os.environ.get("MLFLOW_TRACKING_URI"):
        return None
    from synermix.tracking import tracking_uri

    return tracking_uri(params.mlflow)


def _predict(args: argparse.Namespace) -> int:
    """``synermix predict``: one row per image; unreadable images are rows with an error."""
    from synermix.errors import UserError

    if not 0.0 <= args.abstain <= 1.0:
        raise UserError(f"--abstain {args.abstain:g}: give a probability between 0 and 1")
    if args.batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    missing = [p for p in args.paths if not Path(p).exists()]
    if missing:
        raise UserError(f"no such file or folder: {', '.join(missing)}")
    with tempfile.TemporaryDirectory() as tmp:
        from synermix.model_source import is_registry, model_file

        uri = None
        if is_registry(args.model):  # only a registry lookup needs the params file
            path = Path(args.params)
            uri = _store_uri(load_params(path) if path.is_file() else None)
        return _predict_with(args, model_file(args.model, Path(tmp), uri))


def _predict_with(args: argparse.Namespace, model: Path) -> int:
    import json

    import pandas as pd

    from synermix.data.images import IMAGE_EXTENSIONS
    from synermix.errors import UserError
    from synermix.inference import Classifier, image_files, read_files

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
            {"model": args.model, "provider": classifier.provider, "predictions": rows}, indent=2
        )
    else:
        text = pd.DataFrame(rows).to_csv(index=False, lineterminator="\n")
    if args.out:  # written beside, then renamed: a full disk or a kill leaves the old file whole
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text(text if text.endswith("\n") else text + "\n")
            os.replace(tmp, out)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise UserError(f"--out {out}: cannot write the results ({exc.strerror or exc})") from None
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
    decided = {d: sum(r.decision == d for r in results) for d in ("accept", "reject", "review", "unknown")}
    if any(decided.values()):
        logging.getLogger("synermix.predict").info(
            "decisions: %s", ", ".join(f"{n} {d}" for d, n in decided.items())
        )
    for r in results:
        if r.status == "error":
            logging.getLogger("synermix.predict").warning("%s: %s", r.path, r.error)
    return 0


def _run_stage(args: argparse.Namespace, params) -> None:
    """One stage outside DVC, the same code the pipeline/ script runs."""
    if args.command == "prepare":
        from synermix.stages.prepare import run_prepare

        run_prepare(params)
    elif args.command == "validate":
        from synermix.stages.validate import run_validate

        run_validate(params)
    elif args.command == "tune" and args.worker:
        from synermix.stages.tune import run_tune_worker

        run_tune_worker(params, wait_seconds=args.wait)
    elif args.command == "tune":
        from synermix.stages.tune import run_tune

        run_tune(params)
    elif args.command == "train":
        from synermix.stages.train import run_train

        run_train(params, params_file=Path(args.params))
    elif args.command == "evaluate":
        from synermix.stages.evaluate import run_evaluate

        run_evaluate(params)
    elif args.command == "export":
        from synermix.stages.export import run_export

        run_export(params)
    elif args.command == "register":
        from synermix.stages.register import run_register

        run_register(params)


@exit_on_user_error
def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    setup_logging(args.verbose)
    if args.command == "predict":  # needs the model file only, not params.yaml
        return _predict(args)
    if args.command == "serve":  # params.yaml is optional on a line machine
        return _serve(args)
    if args.command == "verify-bundle":
        from synermix.bundle import verify_bundle

        verify_bundle(args.folder)
        _say(f"{args.folder}: every checksum matches")
        return 0
    if args.command == "check-data" and not Path(args.params).is_file():
        from synermix.config import parse_params

        _say(f"(no {args.params}: the default validate rules, seed and split)")
        return _check_data(args, parse_params({}))
    params = load_params(Path(args.params))
    if args.command in ("promote", "rollback", "pilot-eval", "status", "bundle"):
        return _rollout(args, params)
    if args.command == "monitor":
        return _monitor(args, params)
    if args.command == "params":
        print(_params_in_force(params, Path(".")), end="")
    elif args.command == "check-data":
        return _check_data(args, params)
    elif args.command in STAGE_TEXT:
        from synermix.progress import stage_clock

        with stage_clock(args.command):
            _run_stage(args, params)
    return 0


if __name__ == "__main__":
    sys.exit(main())
