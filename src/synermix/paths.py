"""Every project-relative path, in one place.

The stages, the CLI, the tracking layer and the defaults in :mod:`synermix.config` take
their paths from here, relative to the project root (the folder holding dvc.yaml). A test
holds these against dvc.yaml: every output a stage declares is named here, and every
stage output named here is declared there.
"""

from __future__ import annotations

from pathlib import Path

# --------------------------------------------------------------------------- the project
PARAMS_FILE = Path("params.yaml")
DVC_YAML = Path("dvc.yaml")
DVC_LOCK = Path("dvc.lock")
MLFLOW_DB = Path("mlflow.db")  # the default SQLite tracking store (mlflow.tracking_uri)

# --------------------------------------------------------------------------- prepare
PREPARED_DIR = Path("data/prepared")
MANIFEST = PREPARED_DIR / "manifest.csv"
PREPARE_SUMMARY = Path("reports/prepare.json")

# --------------------------------------------------------------------------- validate
VALIDATION_JSON = Path("reports/validation.json")
VALIDATION_MD = Path("reports/validation.md")
QUARANTINE_CSV = Path("data/validated/quarantine.csv")
VALIDATION_SAMPLES = Path("reports/validation/samples.png")  # shown in validation.md

# --------------------------------------------------------------------------- tune
TUNE_STATE_DIR = Path("checkpoints/tune")
TUNE_DB = TUNE_STATE_DIR / "optuna.db"  # tune.storage: null
TUNE_TRIALS_DIR = TUNE_STATE_DIR / "trials"  # per-study trial checkpoints
BEST_PARAMS = Path("tuning/best_params.yaml")
TUNE_METRICS = Path("reports/tune.json")
TUNE_REPORT = Path("reports/tune.md")
#: bench/tune_trust.py's results: tune.md quotes its rank correlation when the settings match
TUNE_TRUST = Path("reports/bench/tune_trust.json")
TUNE_PLOTS_DIR = Path("reports/tune")
TUNE_TABLES = {
    "trials": TUNE_PLOTS_DIR / "trials.csv",
    "history": TUNE_PLOTS_DIR / "history.csv",
    "importances": TUNE_PLOTS_DIR / "importances.csv",
    "reruns": TUNE_PLOTS_DIR / "reruns.csv",
}
#: PNG copies of the tuning plots (the DVC plots page shows them with the network off)
TUNE_FIGURES = {
    "beta": TUNE_PLOTS_DIR / "beta_vs_objective.png",
    "history": TUNE_PLOTS_DIR / "optimisation_history.png",
    "importances": TUNE_PLOTS_DIR / "param_importances.png",
}

# --------------------------------------------------------------------------- train
MODEL_DIR = Path("models/model")
MODEL_JSON = MODEL_DIR / "model.json"  # the metadata: classes, preprocessing, init, hashes
MODEL_WEIGHTS = MODEL_DIR / "weights.pt"
TRAIN_CHECKPOINT_DIR = Path("checkpoints/train")
TRAIN_CHECKPOINT = TRAIN_CHECKPOINT_DIR / "last.pt"
TRAIN_HISTORY = Path("reports/train_history.csv")
TRAIN_METRICS = Path("reports/train.json")
#: the training curves as PNGs: losses and val scores apart (their scales differ)
TRAIN_FIGURES = {
    "loss": Path("reports/train/loss.png"),
    "scores": Path("reports/train/scores.png"),
}

# --------------------------------------------------------------------------- evaluate
EVAL_METRICS = Path("reports/evaluation.json")
#: the pipeline's 15 headline numbers: dvc.yaml's only `metrics:` file (`dvc metrics show`)
HEADLINE_METRICS = Path("reports/metrics.json")
EVAL_REPORT = Path("reports/evaluation.md")
EVAL_DIR = Path("reports/evaluation")
EVAL_DETAILS = EVAL_DIR / "details.json"
#: the line's decision fitted by evaluate: operating point, unknown-part threshold, novelty fit
DECISION_DIR = Path("models/decision")
DECISION_JSON = DECISION_DIR / "decision.json"
NOVELTY_NPZ = DECISION_DIR / "novelty.npz"
EVAL_TABLES = {
    "predictions": EVAL_DIR / "predictions.csv",
    "per_class": EVAL_DIR / "per_class.csv",
    "calibration": EVAL_DIR / "calibration.csv",
    "contact_sheet": EVAL_DIR / "contact_sheet.csv",  # the images of the two figures below
    "slices": EVAL_DIR / "slices.csv",  # the test split per value of each sliced manifest column
}
EVAL_FIGURES = {
    "confusion": EVAL_DIR / "confusion.png",
    "per_class": EVAL_DIR / "per_class.png",
    "calibration": EVAL_DIR / "calibration.png",
    "features_2d": EVAL_DIR / "features_2d.png",
    "contact_sheet": EVAL_DIR / "contact_sheet.png",
    "gradcam": EVAL_DIR / "gradcam.png",
}

# --------------------------------------------------------------------------- export
EXPORT_DIR = Path("models/onnx")
ONNX_MODEL = EXPORT_DIR / "model.onnx"
EXPORT_METRICS = Path("reports/export.json")

# --------------------------------------------------------------------------- register
REGISTER_REPORT = Path("reports/register.json")

# --------------------------------------------------------------------------- serve
SHADOW_LOG = Path("reports/shadow.jsonl")  # serve.shadow_log: not a pipeline output
#: serve.records: one JSON line per served image (drift monitoring), rotated; not a pipeline output
SERVE_RECORDS = Path("logs/serve/records.jsonl")

# --------------------------------------------------------------------------- monitor
#: `synermix monitor`'s report folder (monitor.out); not a pipeline output
MONITOR_DIR = Path("reports/monitor")

#: what each stage declares in dvc.yaml (outs, metrics and plots), held against it by a test
STAGE_OUTPUTS: dict[str, tuple[Path, ...]] = {
    "prepare": (PREPARED_DIR, PREPARE_SUMMARY),
    "validate": (QUARANTINE_CSV, VALIDATION_MD, VALIDATION_JSON, VALIDATION_SAMPLES),
    "tune": (
        BEST_PARAMS,
        TUNE_STATE_DIR,
        TUNE_REPORT,
        *TUNE_TABLES.values(),
        *TUNE_FIGURES.values(),
        TUNE_METRICS,
    ),
    "train": (MODEL_DIR, TRAIN_CHECKPOINT_DIR, TRAIN_HISTORY, *TRAIN_FIGURES.values(), TRAIN_METRICS),
    "evaluate": (
        DECISION_DIR,
        EVAL_REPORT,
        EVAL_DETAILS,
        EVAL_METRICS,
        HEADLINE_METRICS,
        *EVAL_TABLES.values(),
        *EVAL_FIGURES.values(),
    ),
    "export": (EXPORT_DIR, EXPORT_METRICS),
    "register": (REGISTER_REPORT,),
}
#: paths here that no stage declares: the project's own files, what the service writes and
#: what bench/ scripts write
NOT_STAGE_OUTPUTS = (
    PARAMS_FILE,
    DVC_YAML,
    DVC_LOCK,
    MLFLOW_DB,
    SHADOW_LOG,
    SERVE_RECORDS,
    MONITOR_DIR,
    TUNE_TRUST,
)


def variant_model(name: str) -> Path:
    """The FP16 / INT8 variant of the exported model (``model.<name>.onnx``)."""
    return EXPORT_DIR / f"model.{name}.onnx"
