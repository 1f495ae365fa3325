"""Stage entry points shared by ``pipeline/*.py`` (run by DVC) and the ``synermix`` CLI.

Each ``run_*`` reads its own params section, calls the pure work function and writes
exactly the outputs that dvc.yaml declares. Paths are relative to the project root.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import pandas as pd
from pydantic import ValidationError

from synermix.config import Params, TrainParams
from synermix.data.manifest import MANIFEST_NAME, class_names, read_manifest, read_quarantine, usable_rows
from synermix.data.prepare import prepare_dataset, write_summary
from synermix.errors import CheckFailed, UserError

log = logging.getLogger(__name__)

PREPARED_DIR = Path("data/prepared")
PREPARE_SUMMARY = Path("reports/prepare.json")
VALIDATION_JSON = Path("reports/validation.json")
VALIDATION_MD = Path("reports/validation.md")
QUARANTINE_CSV = Path("data/validated/quarantine.csv")
MODEL_DIR = Path("models/model")
TRAIN_CHECKPOINT = Path("checkpoints/train/last.pt")
TRAIN_HISTORY = Path("reports/train_history.csv")
TRAIN_METRICS = Path("reports/train.json")
TUNE_STATE_DIR = Path("checkpoints/tune")
BEST_PARAMS = Path("tuning/best_params.yaml")
TUNE_METRICS = Path("reports/tune.json")
TUNE_REPORT = Path("reports/tune.md")
TUNE_PLOTS_DIR = Path("reports/tune")


def run_prepare(params: Params, root: Path = Path(".")) -> dict:
    data = params.data
    result = prepare_dataset(
        data.source_spec,
        root / PREPARED_DIR,
        seed=params.seed,
        split=data.split.as_dict(),
        image_size=data.image_size,
        max_per_class=data.max_per_class,
        max_pixels=data.max_pixels,
    )
    write_summary(result.summary, root / PREPARE_SUMMARY)
    s = result.summary
    _log_prepare(params, root, s)
    log.info(
        "prepared %d images (%d undecodable) in %d classes: train %d, val %d, test %d",
        s["images"],
        s["undecodable"],
        s["classes"],
        *(s["per_split"][k] for k in ("train", "val", "test")),
    )
    return s


def _log_prepare(params: Params, root: Path, summary: dict) -> None:
    """The prepare run: data params, image counts, the summary and the manifest itself."""
    import mlflow

    from synermix.tracking import flatten, mlflow_run

    with mlflow_run(params, "prepare", root):
        mlflow.log_params(flatten({"seed": params.seed, "data": params.data.model_dump(mode="json")}))
        counts = {"images": summary["images"], "undecodable": summary["undecodable"]}
        counts |= {f"images_{k}": v for k, v in summary["per_split"].items()}
        mlflow.log_metrics({k: float(v) for k, v in counts.items()})
        mlflow.log_artifact(str(root / PREPARE_SUMMARY))
        mlflow.log_artifact(str(root / PREPARED_DIR / MANIFEST_NAME))


def run_validate(params: Params, root: Path = Path(".")):
    from synermix.data.validation import render_markdown, validate_manifest

    manifest = read_manifest(root / PREPARED_DIR / MANIFEST_NAME)
    report = validate_manifest(manifest, params.validate_params, params.data.classes)
    for path in (VALIDATION_JSON, VALIDATION_MD, QUARANTINE_CSV):
        (root / path).parent.mkdir(parents=True, exist_ok=True)
    (root / VALIDATION_JSON).write_text(json.dumps(report.to_dict(), indent=2, default=str) + "\n")
    (root / VALIDATION_MD).write_text(render_markdown(report))
    report.quarantine.to_csv(root / QUARANTINE_CSV, index=False, lineterminator="\n")
    _log_validation(params, root, report)
    for r in report.results:
        if r.status in ("warning", "quarantined"):
            log.warning("validation rule '%s' %s: %s", r.rule, r.status, r.observed)
    if not report.passed:
        raise CheckFailed(report.failure_message() + f"\nfull report: {root / VALIDATION_MD}")
    log.info(
        "validation passed: %d of %d images usable, %d quarantined; report in %s",
        report.usable_images,
        report.images,
        len(report.quarantine),
        VALIDATION_MD,
    )
    return report


def _log_validation(params: Params, root: Path, report) -> None:
    """The validate run: rule settings, the verdict and counts, and the three reports."""
    import mlflow

    from synermix.tracking import flatten, mlflow_run

    with mlflow_run(params, "validate", root, {"validation_passed": str(report.passed).lower()}):
        mlflow.log_params(flatten({"validate": params.validate_params.model_dump(mode="json")}))
        counts = {"images": report.images, "usable_images": report.usable_images}
        counts["quarantined"] = len(report.quarantine)
        counts["validation_passed"] = int(report.passed)
        mlflow.log_metrics({k: float(v) for k, v in counts.items()})
        for path in (VALIDATION_MD, VALIDATION_JSON, QUARANTINE_CSV):
            mlflow.log_artifact(str(root / path), artifact_path="validation")


def train_val_rows(params: Params, root: Path) -> tuple[list[str], pd.DataFrame, pd.DataFrame, str]:
    """Class names, the usable train and val rows, and the manifest's sha256."""
    manifest_path = root / PREPARED_DIR / MANIFEST_NAME
    manifest = read_manifest(manifest_path)
    usable = usable_rows(manifest, read_quarantine(root / QUARANTINE_CSV))
    names = class_names(usable, params.data.classes)
    undeclared = usable[~usable["label"].isin(names)]
    if len(undeclared):
        # only reachable with validate.rules.declared_labels at warning/off: the declared
        # list then acts as a filter, and says so
        log.warning(
            "leaving out %d image(s) of class(es) not in data.classes: %s",
            len(undeclared),
            ", ".join(sorted(set(undeclared["label"]))),
        )
        usable = usable[usable["label"].isin(names)]
    train_rows = usable[usable["split"] == "train"]
    val_rows = usable[usable["split"] == "val"]
    if train_rows.empty or val_rows.empty:
        raise CheckFailed("the train or val split is empty; run prepare and validate first (dvc repro)")
    missing = sorted(set(names) - set(train_rows["label"]))
    if missing:
        raise CheckFailed(
            f"no training images for class(es) {', '.join(missing)}; add images or fix data.classes"
        )
    return names, train_rows, val_rows, hashlib.sha256(manifest_path.read_bytes()).hexdigest()


#: the train.* keys that tuning may set (the search space's dimensions)
TUNABLE = ("beta", "lr", "weight_decay", "mixup_alpha", "inter_method")


def apply_tuned(train: TrainParams, best_params: Path) -> tuple[TrainParams, dict]:
    """train.* with the values the tune stage chose, and what it chose ({} when none).

    Without the file (``synermix train`` run by hand before any tuning) or with
    ``tuned: false`` (tune.enabled: false), params.yaml's values are used as they are.
    """
    import yaml

    if not best_params.is_file():
        log.info("no %s: training with train.* from params.yaml as it is", best_params)
        return train, {}
    try:
        tuned = yaml.safe_load(best_params.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise UserError(f"{best_params}: not readable YAML ({exc}); rerun the tune stage") from None
    if not isinstance(tuned, dict) or not isinstance(tuned.get("params", {}), dict):
        raise UserError(f"{best_params}: expected a mapping with 'params'; rerun the tune stage (dvc repro)")
    if not tuned.get("tuned"):
        return train, {}
    values = tuned.get("params") or {}
    unknown = sorted(set(values) - set(TUNABLE))
    if unknown:
        raise UserError(
            f"{best_params}: cannot set train.{', train.'.join(unknown)}; tuning sets only "
            f"{', '.join(TUNABLE)}. Rerun the tune stage (dvc repro)"
        )
    try:
        merged = TrainParams.model_validate({**train.model_dump(), **values})
    except ValidationError as exc:
        problem = exc.errors(include_url=False)[0]
        raise UserError(
            f"{best_params}: {'.'.join(map(str, problem['loc']))} = {problem.get('input')!r}: "
            f"{problem['msg']}; rerun the tune stage (dvc repro)"
        ) from None
    log.info(
        "using tuned %s from %s (study %s, trial %s)",
        ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items()),
        best_params,
        tuned.get("study"),
        tuned.get("best_trial"),
    )
    origin = {"study": str(tuned.get("study")), "best_trial": str(tuned.get("best_trial"))}
    return merged, {"params": values, **origin}


def run_train(params: Params, root: Path = Path(".")) -> dict:
    """Train on the usable train split, validate on val, log to MLflow, write the model."""
    import mlflow

    from synermix.data.datasets import infer_channels
    from synermix.tracking import flatten, mlflow_run, tracking_uri
    from synermix.training import check_training_inputs, save_trained_model, train_model

    names, train_rows, val_rows, manifest_sha = train_val_rows(params, root)
    train_params, tuned = apply_tuned(params.train, root / BEST_PARAMS)
    channels = infer_channels(train_rows) if train_params.channels == "auto" else int(train_params.channels)
    # bad class weights, an input size the backbone cannot take, or starting weights that
    # do not load stop here, before a run, a checkpoint or a model file is written
    init = check_training_inputs(train_params, names, channels, tracking_uri(params.mlflow))

    with mlflow_run(params, "train", root, {"manifest_sha256": manifest_sha}) as run:
        mlflow.log_params(flatten({"seed": params.seed, "train": train_params.model_dump(mode="json")}))
        init_record = init.record()
        mlflow.log_params({"init.kind": init_record["kind"], "init.source": init_record["source"]})
        mlflow.set_tag("init_spec", init_record["spec"])
        if init_record["sha256"]:
            mlflow.set_tag("init_sha256", init_record["sha256"])
        if init_record.get("notes"):
            mlflow.set_tag("init_notes", "; ".join(init_record["notes"]))
        if tuned:
            mlflow.log_params({f"tuned.{k}": v for k, v in tuned["params"].items()})
            mlflow.set_tags({"tuned_by_study": tuned["study"], "tuned_best_trial": tuned["best_trial"]})
        mlflow.log_params(
            {
                "data.source": params.data.source,
                "data.train_images": len(train_rows),
                "data.val_images": len(val_rows),
                "data.classes": ",".join(names),
            }
        )

        def log_epoch(row: dict) -> None:
            mlflow.log_metrics({k: float(v) for k, v in row.items() if k != "epoch"}, step=int(row["epoch"]))

        result = train_model(
            train_rows,
            val_rows,
            root / PREPARED_DIR,
            names,
            train_params,
            params.seed,
            checkpoint_path=root / TRAIN_CHECKPOINT,
            on_epoch_end=log_epoch,
            init=init,
        )
        meta = save_trained_model(
            result,
            train_params,
            root / MODEL_DIR,
            {
                "mlflow_run_id": run.info.run_id,
                "manifest_sha256": manifest_sha,
                "seed": params.seed,
                # prepare may already have resized (data.image_size) before the model's own
                # resize; inference from raw photos must repeat both steps to match training
                "prepare_image_size": params.data.image_size,
                "tuned": tuned or None,
            },
        )
        history = pd.DataFrame(result.history)
        (root / TRAIN_HISTORY).parent.mkdir(parents=True, exist_ok=True)
        history.to_csv(root / TRAIN_HISTORY, index=False, lineterminator="\n", float_format="%.6g")
        final = result.selected  # the kept epoch (train.keep), not necessarily the last
        majority = float(val_rows["label"].value_counts(normalize=True).max())
        metrics = {
            "val_accuracy": round(final["val_accuracy"], 6),
            "val_macro_recall": round(final["val_macro_recall"], 6),
            "val_loss": round(final["val_loss"], 6),
            "val_majority_rate": round(majority, 6),
            "epochs": len(result.history),
            "selected_epoch": meta["selected_epoch"],
            "last_val_macro_recall": round(result.final["val_macro_recall"], 6),
            "resumed_from_epoch": result.resumed_from_epoch,
        }
        (root / TRAIN_METRICS).write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
        mlflow.log_metrics(
            {
                "final_val_accuracy": result.final["val_accuracy"],
                "selected_val_accuracy": final["val_accuracy"],
                "selected_val_macro_recall": final["val_macro_recall"],
                "selected_epoch": meta["selected_epoch"],
                "val_majority_rate": majority,
            }
        )
        mlflow.log_artifacts(str(root / MODEL_DIR), artifact_path="model")
        mlflow.log_artifact(str(root / TRAIN_HISTORY))
        mlflow.set_tags({"weights_sha256": meta["weights_sha256"], "arch": meta["arch"]})
    log.info(
        "trained %s: val accuracy %.4f (majority class %.4f), macro recall %.4f; model in %s",
        meta["arch"],
        final["val_accuracy"],
        majority,
        final["val_macro_recall"],
        MODEL_DIR,
    )
    return metrics


def _write_untuned(params: Params, root: Path) -> dict:
    """tune.enabled: false: record that train uses params.yaml's train.* unchanged."""
    import yaml

    note = "tune.enabled is false: train uses train.* from params.yaml"
    content = {"tuned": False, "reason": note, "params": {}}
    (root / BEST_PARAMS).parent.mkdir(parents=True, exist_ok=True)
    (root / BEST_PARAMS).write_text(_BEST_HEADER + yaml.safe_dump(content, sort_keys=False))
    metrics = {"trials": 0}
    (root / TUNE_METRICS).write_text(json.dumps(metrics, indent=2) + "\n")
    (root / TUNE_REPORT).write_text(f"# Tuning\n\nNo search: {note}.\n")
    import mlflow

    from synermix.tracking import mlflow_run
    from synermix.tune_report import write_tables

    empty = pd.DataFrame(columns=["trial", "state", "value", "last_reported", "beta", "worker", "seconds"])
    write_tables(root / TUNE_PLOTS_DIR, empty, pd.DataFrame(columns=["trial", "value", "best_so_far"]), {})
    # the stage ran, so the repro's record holds it, saying why there was no search
    with mlflow_run(params, "tune", root, {"tuned": "false", "mlflow.note.content": f"No search: {note}."}):
        mlflow.log_artifact(str(root / BEST_PARAMS), artifact_path="tune")
    log.info(note)
    return metrics


_BEST_HEADER = (
    "# Written by the tune stage. train uses these values in place of the same keys of\n"
    "# train.* in params.yaml (see reports/tune.md for the search behind them).\n"
)


def _tune_mlflow(params: Params, study: str, manifest_sha: str, root: Path, worker: bool) -> tuple:
    """The MLflow client, experiment id, the study's run (found or created) and, for the
    main tune stage, its place in this dvc repro (a worker belongs to no repro)."""
    from mlflow.tracking import MlflowClient

    from synermix.tracking import PipelineLineage, experiment_id, tracking_uri, tune_parent_run

    experiment = experiment_id(params.mlflow)
    client = MlflowClient(tracking_uri(params.mlflow))
    place = None if worker else PipelineLineage(client, experiment, params, "tune", root)
    tags = {"manifest_sha256": manifest_sha, **(place.tags() if place else {})}
    run_id = tune_parent_run(client, experiment, study, tags)
    if place:
        place.attach(run_id)
    return client, experiment, run_id, place


def run_tune(params: Params, root: Path = Path("."), worker: bool = False, wait_seconds: float = 120) -> dict:
    """Search beta (and the knobs in tune.space) with Optuna; write the best values for train.

    ``worker=True`` joins a study another ``run_tune`` created (same data and params,
    shared ``tune.storage``), runs trials until the budget is used up and writes nothing.
    """
    from mlflow.entities import Param

    from synermix import tuning
    from synermix.data.datasets import infer_channels
    from synermix.tracking import MlflowTrialLogger, flatten, stage_outcome, tracking_uri
    from synermix.training import TrainingData, check_training_inputs, load_training_data

    tune = params.tune
    if not tune.enabled:
        if worker:
            raise UserError("tune.enabled is false: there is no study to work on")
        return _write_untuned(params, root)
    names, train_rows, val_rows, manifest_sha = train_val_rows(params, root)
    trial_rows = tuning.cap_train_rows(train_rows, tune.max_per_class, params.seed)
    base = tuning.trial_base(params.train, tune)
    # bad class weights, input size or starting weights stop before the study is opened, and
    # the starting weights are read once for every trial and re-run, not once per trial
    channels = infer_channels(trial_rows) if base.channels == "auto" else int(base.channels)
    init = check_training_inputs(base, names, channels, tracking_uri(params.mlflow))
    image_root = root / PREPARED_DIR
    name = tuning.study_name(image_root, trial_rows, val_rows, names, params.seed, base, tune)
    state_dir = root / TUNE_STATE_DIR
    state_dir.mkdir(parents=True, exist_ok=True)
    url = tuning.storage_url(tune, state_dir / "optuna.db")
    storage = tuning.open_storage(url, tune)
    place = parent = None
    if not worker:
        client, experiment, parent, place = _tune_mlflow(params, name, manifest_sha, root, worker)
        _drop_other_studies_checkpoints(state_dir / "trials", keep=name)
    elif not url.startswith("sqlite") and tracking_uri(params.mlflow).startswith("sqlite"):
        log.warning(
            "this worker shares a database study but logs to a local MLflow store (%s): its trials "
            "join the tuning run only if MLFLOW_TRACKING_URI points at the same server everywhere",
            tracking_uri(params.mlflow),
        )
    with stage_outcome(place, parent if place else None):
        study = _open_study(storage, name, params, url, create=not worker, wait_seconds=wait_seconds)
        budget_note = (
            f"Short trials: {tune.epochs} epochs on "
            + (f"at most {tune.max_per_class} training images per class " if tune.max_per_class else "all ")
            + f"({len(trial_rows)} of {len(train_rows)} images); train then uses train.epochs on all "
            f"{len(train_rows)}."
        )
        if not worker and "description" not in study.user_attrs:
            study.set_user_attr("description", budget_note)
            study.set_user_attr("objective", tune.objective)
            study.set_user_attr("manifest_sha256", manifest_sha)
        log.info(
            "study %s in %s: %d trial(s) wanted, objective %s; %s",
            name,
            tuning.redact(url),
            tune.n_trials,
            tune.objective,
            budget_note,
        )
        # a complete study (a rerun for a param that changes nothing here) needs no images
        done = tuning.BudgetState.of(study.get_trials(deepcopy=False))
        complete = done.counted >= tune.n_trials and not done.running

        def load_data() -> TrainingData:  # trials or re-runs still to train
            return load_training_data(trial_rows, val_rows, image_root, names, base)

        data = None if complete else load_data()
        tuner = tuning.Tuner(
            study,
            tune,
            base,
            params.seed,
            names,
            data,
            state_dir / "trials" / name,
            load_data=load_data,
            init=init,
        )

        if worker:  # the main stage created the MLflow store and the parent run before the study
            client, experiment, parent, _ = _tune_mlflow(params, name, manifest_sha, root, worker)
        trial_logger = MlflowTrialLogger(client, experiment, parent, tuner.histories, tune.objective)
        if not worker:
            # params are write-once in MLflow: log the settings a resumed study has not seen yet;
            # the budget (it may grow) and the storage URL (it may hold a password) become tags
            existing = client.get_run(parent).data.params
            settings = flatten({"seed": params.seed, "tune": tune.model_dump(mode="json")})
            budget = (
                "tune.n_trials",
                "tune.timeout_minutes",
                "tune.storage",
                "tune.rerun_top_k",
                "tune.rerun_seeds",
            )
            fresh = [Param(k, str(v)) for k, v in settings.items() if k not in existing and k not in budget]
            client.log_batch(parent, params=fresh)
            client.set_tag(parent, "n_trials", str(tune.n_trials))
            client.set_tag(parent, "storage", tuning.redact(url))
            client.set_tag(parent, "rerun_top_k", str(tune.rerun_top_k))
            client.set_tag(parent, "rerun_seeds", str(tune.rerun_seeds))

        state = done if complete else tuner.run([trial_logger], wait_for_others=not worker)
        if worker:  # re-runs are the main process's: it alone writes the outputs
            log.info("worker done: %d of %d trials counted in study %s", state.counted, tune.n_trials, name)
            return {"trials": state.counted}
        _log_missing_trial_runs(study, client, experiment, parent, trial_logger)
        counted = tuning.counted_trials(study.get_trials(deepcopy=False), tune.n_trials)
        candidates = tuning.rerun_top(study, counted, tune, params.seed, tuner.rerun)
        if not state.waiting and not state.running:  # no retry left to resume from a checkpoint
            shutil.rmtree(state_dir / "trials" / name, ignore_errors=True)
        return _write_tune_outputs(
            params, root, study, client, parent, budget_note, len(trial_rows), candidates
        )


def _open_study(storage, name: str, params: Params, url: str, create: bool, wait_seconds: float):
    """Create (or load) the study; a worker (``create=False``) waits for it to appear."""
    import time

    from synermix import tuning

    deadline = time.monotonic() + wait_seconds
    while True:
        try:
            return tuning.open_study(storage, name, params.seed, params.tune, create=create)
        except KeyError:
            if time.monotonic() > deadline:
                raise UserError(
                    f"no study {name} in {tuning.redact(url)} after {wait_seconds:g} s: start the main "
                    "tune (dvc repro or synermix tune) first, with the same data and params here "
                    "(the study name hashes both)"
                ) from None
            time.sleep(0.5)


def _drop_other_studies_checkpoints(trials_dir: Path, keep: str) -> None:
    """Trial checkpoints of other studies can never resume (their study is not this one)."""
    if trials_dir.is_dir():
        for folder in trials_dir.iterdir():
            if folder.is_dir() and folder.name != keep:
                shutil.rmtree(folder, ignore_errors=True)


def _log_missing_trial_runs(study, client, experiment: str, parent: str, trial_logger) -> None:
    """Child runs for finished trials that got none: a dead worker's trial (failed later by
    the heartbeat check) or a crashed one (Optuna runs callbacks only for trials it ends)."""
    from optuna.trial import TrialState

    runs = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parent}'", max_results=50_000)
    logged = {r.data.tags.get("optuna_trial") for r in runs}
    for trial in study.get_trials(deepcopy=False):
        if str(trial.number) not in logged and trial.state not in (TrialState.RUNNING, TrialState.WAITING):
            trial_logger(study, trial)


def _write_tune_outputs(
    params: Params,
    root: Path,
    study,
    client,
    parent: str,
    budget_note: str,
    trial_images: int,
    candidates=(),
) -> dict:
    """best_params.yaml, the tables, tune.md and tune.json; the same and the plots to MLflow.

    With ``candidates`` (the re-run top trials) the values are those of the best mean over
    seeds; without, those of the single best trial."""
    import tempfile

    import yaml

    from synermix import tune_report, tuning

    tune = params.tune
    name = study.study_name
    all_trials = study.get_trials(deepcopy=False)
    counted = tuning.counted_trials(all_trials, tune.n_trials)
    last = counted[-1].number if counted else max((t.number for t in all_trials), default=-1)
    table = tune_report.trials_table([t for t in all_trials if t.number <= last], tune.space)
    history = tune_report.history_table(counted)
    best = tuning.best_trial(counted)
    if best is None:
        tune_report.write_tables(root / TUNE_PLOTS_DIR, table, history, {})
        states = table["state"].value_counts().to_dict()
        raise CheckFailed(
            f"no trial of study {name} completed ({states}): widen tune.space, relax tune.pruner "
            f"or raise tune.n_trials; the trials are in {TUNE_PLOTS_DIR / 'trials.csv'}"
        )
    importances = tune_report.param_importances(counted, params.seed)
    metrics = tune_report.summary_metrics(counted, best, tune.epochs)
    reruns = tune_report.rerun_table(candidates, tune.space.searched())
    paths = tune_report.write_tables(root / TUNE_PLOTS_DIR, table, history, importances, reruns)
    # only what train needs: a larger budget that finds no better trial leaves the file, and
    # so the trained model, unchanged (counts and values are in reports/tune.json)
    chosen = best
    best_content = {"tuned": True, "study": name, "best_trial": best.number, "params": dict(best.params)}
    metrics["trial_images"] = trial_images
    if candidates:
        pick = tuning.choose(candidates)
        chosen = pick.trial
        failed = f" ({pick.failed} diverged)" if pick.failed else ""
        best_content = {
            "tuned": True,
            "study": name,
            "best_trial": pick.number,
            "params": dict(pick.trial.params),
            "chosen_on": f"mean of {len(pick.values)} seeds{failed}",
            "mean": round(pick.mean, 6),
            "spread": None if pick.std is None else round(pick.std, 6),
            "seeds": [run.seed for run in pick.runs],
            "values": [None if run.value is None else round(run.value, 6) for run in pick.runs],
        }
        metrics.update(tune_report.rerun_metrics(candidates, pick))
    (root / BEST_PARAMS).parent.mkdir(parents=True, exist_ok=True)
    (root / BEST_PARAMS).write_text(_BEST_HEADER + yaml.safe_dump(best_content, sort_keys=False))
    (root / TUNE_METRICS).write_text(json.dumps(metrics, indent=2) + "\n")
    report = tune_report.render_markdown(
        name, tune.objective, metrics, best.params, table, importances, budget_note, candidates
    )
    (root / TUNE_REPORT).write_text(report)

    with tempfile.TemporaryDirectory() as tmp:
        figures = tune_report.write_figures(Path(tmp), table, history, importances, tune.objective, reruns)
        for figure in figures:
            client.log_artifact(parent, str(figure), artifact_path="plots")
    for path in (*paths.values(), root / BEST_PARAMS, root / TUNE_REPORT):
        client.log_artifact(parent, str(path), artifact_path="tune")
    for key, value in metrics.items():
        if value is not None:
            client.log_metric(parent, key, float(value))
    for c in candidates:  # per re-run candidate, stepped by trial number
        client.log_metric(parent, "rerun_mean", c.mean, step=c.number)
        if c.std is not None:
            client.log_metric(parent, "rerun_std", c.std, step=c.number)
    for key, value in chosen.params.items():
        client.set_tag(parent, f"best.{key}", str(value))
    if candidates:
        client.set_tag(parent, "chosen_on", best_content["chosen_on"])
        client.set_tag(parent, "rerun_seed_values", ",".join(str(s) for s in best_content["seeds"]))
    client.set_terminated(parent, "FINISHED")
    described = ", ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in chosen.params.items()
    )
    if candidates:
        log.info(
            "chosen: trial %d (%s), mean %s %.4f over %d seeds (single best: trial %d, %.4f); "
            "seed spread %s; %d of %d epochs run in trials (%s); values in %s",
            metrics["chosen_trial"],
            described,
            tune.objective,
            metrics["chosen_mean"],
            metrics["seeds_per_candidate"],
            best.number,
            best.value,
            "n/a" if metrics["seed_spread"] is None else f"{metrics['seed_spread']:.4f}",
            metrics["epochs_spent"],
            metrics["epochs_without_pruning"],
            "pruner " + tune.pruner.kind,
            BEST_PARAMS,
        )
        return metrics
    log.info(
        "best %s %.4f in trial %d: %s; %d of %d epochs run (%s); best values in %s",
        tune.objective,
        best.value,
        best.number,
        described,
        metrics["epochs_spent"],
        metrics["epochs_without_pruning"],
        "pruner " + tune.pruner.kind,
        BEST_PARAMS,
    )
    return metrics


# --------------------------------------------------------------------------- evaluate
EVAL_METRICS = Path("reports/evaluation.json")
EVAL_REPORT = Path("reports/evaluation.md")
EVAL_DIR = Path("reports/evaluation")
EVAL_DETAILS = EVAL_DIR / "details.json"


def evaluation_rows(
    root: Path, class_names: list[str], trained_on: str | None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The usable val and test rows of the classes the model knows.

    Refuses a model trained on another manifest: its test images may have been in its
    training split, and any score would flatter it.
    """
    manifest_path = root / PREPARED_DIR / MANIFEST_NAME
    manifest = read_manifest(manifest_path)
    current = hashlib.sha256(manifest_path.read_bytes()).hexdigest()
    if trained_on and trained_on != current:
        raise UserError(
            f"{MODEL_DIR} was trained on another manifest (sha256 {trained_on[:12]}, now {current[:12]}): "
            "its scores on this test split would not be held-out; retrain first (dvc repro)"
        )
    usable = usable_rows(manifest, read_quarantine(root / QUARANTINE_CSV))
    unknown = usable[~usable["label"].isin(class_names) & usable["split"].isin(["val", "test"])]
    if len(unknown):
        log.warning(
            "leaving out %d val/test image(s) of class(es) the model does not know: %s",
            len(unknown),
            ", ".join(sorted(set(unknown["label"]))),
        )
    known = usable[usable["label"].isin(class_names)]
    val_rows, test_rows = known[known["split"] == "val"], known[known["split"] == "test"]
    if test_rows.empty:
        raise CheckFailed(
            "the test split has no usable image; check data.split and rerun prepare (dvc repro)"
        )
    return val_rows, test_rows


def _champion_report(params: Params, root: Path, test_rows: pd.DataFrame, challenger) -> dict:
    """The champion (the version holding gates.champion.alias) scored on the same test images."""
    import tempfile

    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from synermix import registry
    from synermix.data.transforms import Preprocessing
    from synermix.evaluation import score_model, split_report
    from synermix.metrics import mcnemar_exact
    from synermix.tracking import quiet_mlflow_logs, tracking_uri
    from synermix.training import load_trained_model

    spec = params.gates.champion
    name = params.registry.model_name
    if not spec.enabled:
        return {"note": "Champion comparison is off (gates.champion.enabled: false).", "skip": "off"}
    quiet_mlflow_logs()
    uri = tracking_uri(params.mlflow)
    client = MlflowClient(uri)
    try:
        found = registry.find_alias(client, name, spec.alias)
    except MlflowException as exc:
        raise UserError(
            f"cannot look up the champion {name}@{spec.alias} in MLflow ({uri}): {exc.message}; "
            "fix mlflow.tracking_uri / MLFLOW_TRACKING_URI, or set gates.champion.enabled: false"
        ) from None
    if found is None:
        note = (
            f"No champion: no version of registered model '{name}' holds the alias @{spec.alias} yet "
            "(a first model), so the champion gates are skipped."
        )
        log.info(note)
        return {"note": note, "skip": f"no version holds @{spec.alias}"}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            folder = registry.download_version(client, found.name, found.version, Path(tmp))
        except MlflowException as exc:
            note = (
                f"{found.label}: its files could not be downloaded ({exc.message}); champion gates skipped."
            )
            log.warning(note)
            return {"note": note, "skip": f"{found.label} cannot be downloaded"}
        files = registry.pytorch_files(folder)
        if files is None:
            note = f"{found.label} has no model.json + weights.pt to score; champion gates skipped."
            log.warning(note)
            return {"note": note, "skip": f"{found.label} cannot be scored"}
        try:
            model, meta = load_trained_model(files)
        except (KeyError, ValueError, RuntimeError, OSError) as exc:
            note = f"{found.label}: its model files do not load here ({exc}); champion gates skipped."
            log.warning(note)
            return {"note": note, "skip": f"{found.label} does not load"}
    if meta.get("manifest_sha256") != challenger["manifest_sha256"]:
        # another manifest means another split: today's test images may be its training images
        note = (
            f"{found.label} was trained on another manifest (sha256 {str(meta.get('manifest_sha256'))[:12]}, "
            f"now {challenger['manifest_sha256'][:12]}): some of today's test images may have been its "
            "training images, so its score would be inflated; champion gates skipped."
        )
        log.warning(note)
        return {"note": note, "skip": f"{found.label} trained on another split"}
    if set(meta["class_names"]) != set(challenger["class_names"]):
        note = (
            f"{found.label} knows classes {', '.join(meta['class_names'])}, this model "
            f"{', '.join(challenger['class_names'])}: not comparable, champion gates skipped."
        )
        log.warning(note)
        return {"note": note, "skip": "champion has other classes"}
    log.info("scoring the champion %s on the same %d test images", found.label, len(test_rows))
    ev = params.evaluate
    scores = score_model(
        model,
        Preprocessing.from_dict(meta["preprocessing"]),
        test_rows,
        root / PREPARED_DIR,
        meta["class_names"],
        ev.batch_size,
        ev.device,
        desc="score champion",
    )
    report = split_report(scores, meta["class_names"], ev.calibration_bins)
    paired = mcnemar_exact(challenger["correct"], scores.correct)
    return {
        "label": found.label,
        "version": found.version,
        "alias": spec.alias,
        "run_id": found.run_id,
        "weights_sha256": meta.get("weights_sha256", ""),
        "metrics": {k: report[k] for k in ("accuracy", "macro_recall", "macro_f1", "recall_min")},
        "paired": {
            "only_challenger_right": paired.only_a_right,
            "only_champion_right": paired.only_b_right,
            "p_value": paired.p_value,
        },
    }


def run_evaluate(params: Params, root: Path = Path(".")) -> dict:
    """Score models/model on the test split (and val), check the gates, write the reports.

    Every report and the MLflow run are written before a failed gate stops the stage
    (exit 1); with ``gates.enforce: false`` failures are reported, not raised.
    """
    from synermix import eval_report
    from synermix.data.transforms import Preprocessing
    from synermix.evaluation import json_safe, predictions_table, scalars_only, score_model, split_report
    from synermix.gates import champion_gates, format_table, threshold_gates, verdict
    from synermix.training import load_trained_model

    if not (root / MODEL_DIR / "model.json").is_file():
        raise UserError(f"no trained model in {MODEL_DIR}; run the train stage first (dvc repro)")
    model, meta = load_trained_model(root / MODEL_DIR)
    names = list(meta["class_names"])
    val_rows, test_rows = evaluation_rows(root, names, meta.get("manifest_sha256"))
    ev = params.evaluate
    pre = Preprocessing.from_dict(meta["preprocessing"])
    image_root = root / PREPARED_DIR

    def score(rows: pd.DataFrame, split: str):
        return score_model(
            model, pre, rows, image_root, names, ev.batch_size, ev.device, desc=f"score {split}"
        )

    test_scores = score(test_rows, "test")
    test = split_report(test_scores, names, ev.calibration_bins)
    unmeasured = [n for n, row in test["per_class"].items() if not row["support"]]
    if unmeasured:
        log.warning(
            "no test image of class(es) %s: their recall is not measured and no gate covers them",
            ", ".join(unmeasured),
        )
    val = split_report(score(val_rows, "val"), names, ev.calibration_bins) if len(val_rows) else None
    champion = _champion_report(
        params,
        root,
        test_rows,
        {
            "class_names": names,
            "correct": test_scores.correct,
            "manifest_sha256": meta.get("manifest_sha256", ""),
        },
    )
    gates = threshold_gates(test, params.gates, names) + champion_gates(
        test, champion.get("metrics"), params.gates, champion.get("label", ""), champion.get("skip", "")
    )
    passed = verdict(gates)
    enforced = params.gates.enforce

    predictions = predictions_table(test_scores, names)
    out_dir = root / EVAL_DIR
    tables = eval_report.write_tables(out_dir, test, predictions)
    figures = eval_report.write_figures(
        out_dir, test, names, test_scores.features, test_scores.labels, test_scores.correct
    )
    summary = {
        "passed": passed,
        "enforced": enforced,
        "test": scalars_only(test),
        "val": scalars_only(val) if val else {},
        "gates": {g.gate: json_safe({k: v for k, v in g.to_dict().items() if k != "gate"}) for g in gates},
        "champion": json_safe(
            {k: champion[k] for k in ("version", "alias", "metrics", "paired") if k in champion}
        ),
    }
    (root / EVAL_METRICS).parent.mkdir(parents=True, exist_ok=True)
    (root / EVAL_METRICS).write_text(json.dumps(summary, indent=2) + "\n")
    details = {
        split: {k: report[k] for k in ("confusion", "calibration", "centroid_distances")}
        for split, report in (("test", test), ("val", val))
        if report
    }
    (root / EVAL_DETAILS).write_text(
        json.dumps(json_safe({"class_names": names, **details}), indent=2) + "\n"
    )
    markdown = eval_report.render_markdown(
        passed=passed,
        enforced=enforced,
        gates=gates,
        test=test,
        val=val,
        class_names=names,
        model=meta,
        champion=champion,
        errors=predictions[~predictions["correct"]],
        max_listed_errors=ev.max_listed_errors,
        calibration_bins=ev.calibration_bins,
    )
    (root / EVAL_REPORT).write_text(markdown)
    table = format_table(gates)
    failure = None
    if not passed and enforced:
        failure = CheckFailed(
            f"evaluation gates failed on {test['images']} test images:\n{table}\n"
            f"full report: {root / EVAL_REPORT}. Improve the model, or change the thresholds in "
            "gates: (gates.enforce: false reports without failing)"
        )
    files = [*tables, *figures, root / EVAL_DETAILS]
    _log_evaluation(params, root, meta, summary, test, val, names, files, failure)
    if passed:
        log.info("evaluation passed on %d test images:\n%s\nreport: %s", test["images"], table, EVAL_REPORT)
    else:
        log.warning(
            "gates FAILED (gates.enforce is false, so the stage passes):\n%s\nreport: %s", table, EVAL_REPORT
        )
    return summary


def _metric_key(name: str) -> str:
    """An MLflow-safe metric name part (class names are folder names and may hold anything)."""
    import re

    return re.sub(r"[^A-Za-z0-9_\-. /]", "_", name)


def _log_evaluation(
    params: Params,
    root: Path,
    meta: dict,
    summary: dict,
    test: dict,
    val: dict | None,
    names: list[str],
    files: list[Path],
    failure: CheckFailed | None,
) -> None:
    """One MLflow run: gate settings, every metric, the reports and figures; links to training.

    ``failure`` (failed gates) is raised inside the run, so it and this repro's pipeline run
    end FAILED."""
    import math

    import mlflow

    from synermix.evaluation import scalars_only
    from synermix.tracking import flatten, mlflow_run

    tags = {
        "model_run_id": str(meta.get("mlflow_run_id", "")),
        "weights_sha256": meta["weights_sha256"],
        "gates_passed": str(summary["passed"]).lower(),
        "champion_version": str(summary["champion"].get("version", "")),
    }
    with mlflow_run(params, "evaluate", root, tags) as run:
        mlflow.log_params(
            flatten(
                {
                    "evaluate": params.evaluate.model_dump(mode="json"),
                    "gates": params.gates.model_dump(mode="json"),
                }
            )
        )
        values: dict[str, float] = {}
        for split, report in (("test", test), ("val", val)):
            if not report:
                continue
            for key, value in scalars_only(report).items():
                if isinstance(value, int | float) and not isinstance(value, bool) and value is not None:
                    values[f"{split}_{key}"] = float(value)
            for name, row in report["per_class"].items():
                for key in ("precision", "recall", "f1", "cohesion"):
                    value = row[key]
                    if value is not None and not math.isnan(value):
                        values[f"{split}_{key}.{_metric_key(name)}"] = float(value)
        for gate, result in summary["gates"].items():
            if result["margin"] is not None:
                values[f"gate_margin.{gate}"] = float(result["margin"])
        values["gates_passed"] = float(summary["passed"])
        mlflow.log_metrics(values)
        mlflow.log_artifact(str(root / EVAL_REPORT))
        mlflow.log_artifact(str(root / EVAL_METRICS))
        for path in files:
            mlflow.log_artifact(str(path), artifact_path="evaluation")
        tags = {"evaluation_run_id": run.info.run_id, "gates_passed": str(summary["passed"]).lower()}
        _tag_training_run(meta, tags)
        if failure is not None:
            raise failure


# --------------------------------------------------------------------------- export
EXPORT_DIR = Path("models/onnx")
ONNX_MODEL = EXPORT_DIR / "model.onnx"
EXPORT_METRICS = Path("reports/export.json")


def _evaluation_verdict(root: Path) -> bool | None:
    """Whether the evaluate stage passed this model's gates (None: not evaluated)."""
    path = root / EVAL_METRICS
    if not path.is_file():
        log.warning("no %s: exporting a model that was not evaluated", EVAL_METRICS)
        return None
    try:
        summary = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not readable JSON ({exc}); rerun the evaluate stage (dvc repro)") from None
    if not summary.get("passed") and summary.get("enforced"):
        raise CheckFailed(f"{EVAL_METRICS} says the model failed its gates; fix that before exporting")
    return bool(summary.get("passed"))


def run_export(params: Params, root: Path = Path(".")) -> dict:
    """models/model -> models/onnx/model.onnx, checked against PyTorch on real val images.

    Optional FP16 / INT8 variants are scored on the test split against the FP32 ONNX
    model and refused (stage fails, file removed) past ``export.max_accuracy_drop``.
    """

    from synermix import onnx_export as ox
    from synermix.data.transforms import Preprocessing, load_resized, normalize
    from synermix.inference import Classifier
    from synermix.training import load_trained_model

    ex = params.export
    if not (root / MODEL_DIR / "model.json").is_file():
        raise UserError(f"no trained model in {MODEL_DIR}; run the train stage first (dvc repro)")
    model, meta = load_trained_model(root / MODEL_DIR)
    gates_passed = _evaluation_verdict(root)
    names = list(meta["class_names"])
    val_rows, test_rows = evaluation_rows(root, names, meta.get("manifest_sha256"))
    if val_rows.empty:
        raise CheckFailed("the val split has no usable image to check parity on; rerun prepare (dvc repro)")
    pre = Preprocessing.from_dict(meta["preprocessing"])
    image_root = root / PREPARED_DIR
    out_dir = root / EXPORT_DIR
    if out_dir.is_dir():  # this stage's own output: stale variants must not linger
        shutil.rmtree(out_dir)
    metadata = ox.model_metadata(meta, ex.exporter, ex.opset, gates_passed=gates_passed)
    ox.export_onnx(model, pre.channels, pre.image_size, root / ONNX_MODEL, ex.exporter, ex.opset, metadata)
    classifier = Classifier(root / ONNX_MODEL, provider="cpu")

    checked = val_rows.sort_values("path").head(ex.parity_images)
    files = [image_root / p for p in checked["path"]]
    training_view = [normalize(load_resized(f, pre.image_size, pre.channels), pre) for f in files]
    parity = ox.check_parity(model, classifier, files, training_view)
    parity_ok = parity.passed(ex.parity_max_abs_diff)

    test_inputs, labels = production_inputs(test_rows, image_root, classifier.preprocess, names)
    fp32_accuracy = ox.accuracy(classifier, test_inputs, labels)
    onnx_bytes = (root / ONNX_MODEL).read_bytes()
    summary: dict = {
        "exporter": ex.exporter,
        "opset": ex.opset,
        "onnx_sha256": hashlib.sha256(onnx_bytes).hexdigest(),
        "onnx_bytes": len(onnx_bytes),
        "provider": classifier.provider,
        "parity": {**parity.to_dict(), "tolerance": ex.parity_max_abs_diff, "passed": parity_ok},
        "test_images": len(test_rows),
        "test_accuracy": {"fp32": fp32_accuracy},
        "variants": {},
    }
    refused = []
    if parity_ok:
        refused = _export_variants(
            params, root, summary, test_inputs, labels, fp32_accuracy, classifier.preprocess, names
        )
    (root / EXPORT_METRICS).parent.mkdir(parents=True, exist_ok=True)
    (root / EXPORT_METRICS).write_text(json.dumps(summary, indent=2) + "\n")
    failure = None
    if not parity_ok:
        failure = CheckFailed(
            f"ONNX parity failed on {parity.images} val images: max |logit difference| "
            f"{parity.max_abs_diff:.3g} (allowed {ex.parity_max_abs_diff:g}), top-1 agreement "
            f"{parity.top1_agreement:.2%}, production vs training input "
            f"{parity.preprocessing_max_abs_diff:.3g}; "
            "try export.exporter: torchscript or another export.opset"
        )
    elif refused:
        failure = CheckFailed(
            "; ".join(refused) + f" (export.max_accuracy_drop {ex.max_accuracy_drop:g}); see {EXPORT_METRICS}"
        )
    _log_export(params, root, meta, summary, failure)
    log.info(
        "exported %s: parity on %d val images max |diff| %.2e, top-1 agreement %.0f%%; test accuracy %.4f",
        ONNX_MODEL,
        parity.images,
        parity.max_abs_diff,
        100 * parity.top1_agreement,
        fp32_accuracy,
    )
    return summary


def production_inputs(rows: pd.DataFrame, image_root: Path, preprocess, names: list[str]) -> tuple:
    """The model inputs of ``rows`` from their file bytes (``preprocess``: a
    :class:`synermix.inference.Preprocessor`), stacked, and their class indices."""
    import numpy as np

    inputs = np.stack([preprocess((image_root / p).read_bytes()) for p in rows["path"]])
    return inputs, np.asarray([names.index(c) for c in rows["label"]], dtype=np.int64)


def calibration_rows(params: Params, root: Path, names: list[str]) -> pd.DataFrame:
    """The seeded sample of training images that INT8 quantisation calibrates on."""
    _, train_rows, _, _ = train_val_rows(params, root)
    train_rows = train_rows[train_rows["label"].isin(names)]
    return train_rows.sample(
        n=min(params.export.calibration_images, len(train_rows)), random_state=params.seed
    )


def _export_variants(
    params, root, summary, test_inputs, labels, fp32_accuracy, preprocess, names
) -> list[str]:
    """FP16 / INT8 files when asked for, each scored on the test split; returns refusals."""
    from synermix import onnx_export as ox
    from synermix.inference import Classifier

    ex = params.export
    refused = []
    wanted = [name for name, on in (("fp16", ex.fp16), ("int8", ex.int8)) if on]
    for name in wanted:
        path = root / EXPORT_DIR / f"model.{name}.onnx"
        if name == "fp16":
            ox.convert_fp16(root / ONNX_MODEL, path)
        else:
            rows = calibration_rows(params, root, names)
            calibration, _ = production_inputs(rows, root / PREPARED_DIR, preprocess, names)
            ox.quantize_int8(root / ONNX_MODEL, path, calibration)
        variant_accuracy = ox.accuracy(Classifier(path, provider="cpu"), test_inputs, labels)
        drop = fp32_accuracy - variant_accuracy
        accepted = drop <= ex.max_accuracy_drop + 1e-12
        summary["test_accuracy"][name] = variant_accuracy
        summary["variants"][name] = {
            "file": str(EXPORT_DIR / path.name),
            "bytes": path.stat().st_size,
            "accuracy_drop": drop,
            "accepted": accepted,
        }
        log.info(
            "%s variant: test accuracy %.4f (FP32 %.4f, drop %+.4f)",
            name,
            variant_accuracy,
            fp32_accuracy,
            drop,
        )
        if not accepted:
            path.unlink()
            refused.append(f"{name} variant refused: test accuracy drops {drop:.4f} below FP32 ONNX")
    return refused


def _log_export(params: Params, root: Path, meta: dict, summary: dict, failure: CheckFailed | None) -> None:
    """The export run (parity, accuracies, the ONNX files); ``failure`` is raised inside it."""
    import mlflow

    from synermix.tracking import flatten, mlflow_run

    tags = {
        "model_run_id": str(meta.get("mlflow_run_id", "")),
        "weights_sha256": meta["weights_sha256"],
        "onnx_sha256": summary["onnx_sha256"],
        "onnx_provider": summary["provider"],
    }
    with mlflow_run(params, "export", root, tags) as run:
        mlflow.log_params(flatten({"export": params.export.model_dump(mode="json")}))
        values = {f"parity_{k}": float(v) for k, v in summary["parity"].items() if k != "tolerance"}
        values |= {f"test_accuracy_{k}": float(v) for k, v in summary["test_accuracy"].items()}
        values["onnx_bytes"] = float(summary["onnx_bytes"])
        mlflow.log_metrics(values)
        mlflow.log_artifact(str(root / EXPORT_METRICS))
        for path in sorted((root / EXPORT_DIR).glob("*.onnx")):
            mlflow.log_artifact(str(path), artifact_path="onnx")
        _tag_training_run(meta, {"export_run_id": run.info.run_id, "onnx_sha256": summary["onnx_sha256"]})
        if failure is not None:
            raise failure


def _tag_training_run(meta: dict, tags: dict[str, str]) -> None:
    """Point the training run at a later stage's run (the registry follows these links)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    train_run = meta.get("mlflow_run_id")
    if not train_run:
        return
    try:
        client = mlflow.MlflowClient()
        for key, value in tags.items():
            client.set_tag(train_run, key, value)
    except MlflowException as exc:
        log.warning(
            "could not tag training run %s (%s): is MLflow the store it was trained in?", train_run, exc
        )


# --------------------------------------------------------------------------- register
REGISTER_REPORT = Path("reports/register.json")


def _read_json(path: Path, stage: str) -> dict:
    if not path.is_file():
        raise UserError(f"no {path}: run the {stage} stage first (dvc repro)")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not readable JSON ({exc}); rerun the {stage} stage (dvc repro)") from None


def run_register(params: Params, root: Path = Path(".")) -> dict:
    """Register models/onnx/model.onnx as a version of ``registry.model_name`` when its
    gates passed; it gets ``candidate`` (and ``pilot`` with ``registry.auto_pilot``).

    The same ONNX file (by sha256) is never registered twice: a rerun finds its version.
    """
    import mlflow

    from synermix import rollout
    from synermix.tracking import mlflow_run

    evaluation = _read_json(root / EVAL_METRICS, "evaluate")
    export = _read_json(root / EXPORT_METRICS, "export")
    onnx_path = root / ONNX_MODEL
    if not onnx_path.is_file() or not (root / MODEL_DIR / "model.json").is_file():
        raise UserError(f"no {ONNX_MODEL} or {MODEL_DIR}: run the train and export stages first (dvc repro)")
    meta = json.loads((root / MODEL_DIR / "model.json").read_text())
    onnx_sha = hashlib.sha256(onnx_path.read_bytes()).hexdigest()
    if export.get("onnx_sha256") != onnx_sha:
        raise UserError(f"{ONNX_MODEL} is not the file {EXPORT_METRICS} describes; rerun export (dvc repro)")
    if not export.get("parity", {}).get("passed"):
        raise CheckFailed(f"{EXPORT_METRICS} says the ONNX model failed its parity check; not registered")
    name = params.registry.model_name
    with mlflow_run(params, "register", root, {"model_name": name}) as run:
        mlflow.log_params({"registry.model_name": name, "registry.auto_pilot": params.registry.auto_pilot})
        if not evaluation.get("passed"):
            # only reachable with gates.enforce: false (an enforced failure stops evaluate)
            note = "gates failed (gates.enforce is false): not registered"
            summary = {"registered": False, "reason": note, "model_name": name, "onnx_sha256": onnx_sha}
            mlflow.set_tag("registered", "false")
            log.warning("%s; see %s", note, EVAL_REPORT)
        else:
            summary = rollout.register_version(
                rollout.client_for(params), params, root, run, onnx_path, meta, evaluation, export
            )
            mlflow.set_tags({"registered": "true", "model_version": summary["version"]})
        (root / REGISTER_REPORT).parent.mkdir(parents=True, exist_ok=True)
        (root / REGISTER_REPORT).write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
        mlflow.log_artifact(str(root / REGISTER_REPORT))
    return summary
