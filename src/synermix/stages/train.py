"""The train stage: the usable train split (and tune's values) -> models/model + history."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pandas as pd
import torch
import yaml
from pydantic import ValidationError

from synermix.config import BASELINE_TRIAL, TUNABLE_TRAIN_KEYS, Params, TrainParams
from synermix.curves import write_training_curves
from synermix.data.datasets import infer_channels
from synermix.distributed import CHILD_ENV, SINGLE, Dist, from_env, launch, setup, teardown, under_torchrun
from synermix.errors import UserError
from synermix.init_weights import InitWeights
from synermix.paths import (
    BEST_PARAMS,
    MANIFEST,
    MODEL_DIR,
    PARAMS_FILE,
    PREPARED_DIR,
    TRAIN_CHECKPOINT,
    TRAIN_FIGURES,
    TRAIN_HISTORY,
    TRAIN_METRICS,
)
from synermix.stages.common import train_val_rows
from synermix.tracking import (
    client_for,
    flatten,
    log_effective_train_params,
    log_manifest_input,
    mlflow_run,
    tracking_uri,
)
from synermix.training import (
    TrainingResult,
    check_training_inputs,
    load_training_data,
    save_trained_model,
    train_model,
)

log = logging.getLogger(__name__)


def apply_tuned(train: TrainParams, best_params: Path) -> tuple[TrainParams, dict]:
    """train.* with the values the tune stage chose, and what it chose ({} when none).

    Without the file (``synermix train`` run by hand before any tuning) or with
    ``tuned: false`` (tune.enabled: false), params.yaml's values are used as they are.
    """
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
    unknown = sorted(set(values) - set(TUNABLE_TRAIN_KEYS))
    if unknown:
        raise UserError(
            f"{best_params}: cannot set train.{', train.'.join(unknown)}; tuning sets only "
            f"{', '.join(TUNABLE_TRAIN_KEYS)}. Rerun the tune stage (dvc repro)"
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


def kept_baseline(tuned: dict) -> bool:
    """Whether the tune stage kept params.yaml's own values (``tuned`` from :func:`apply_tuned`)."""
    return bool(tuned) and str(tuned["best_trial"]) == str(BASELINE_TRIAL)


def _origin(tuned: dict) -> str:
    """Where train's values of the tunable keys came from, for the pipeline run."""
    if not tuned:
        return "params.yaml"
    if kept_baseline(tuned):
        return f"params.yaml (kept by tune study {tuned['study']}: no trial beat it beyond the seed spread)"
    return f"tune study {tuned['study']}, trial {tuned['best_trial']}"


def run_train(params: Params, root: Path = Path("."), params_file: Path | None = None) -> dict:
    """Train on the usable train split, validate on val, log to MLflow, write the model.

    With ``train.launcher: torchrun`` this process starts ``torchrun`` on
    :func:`main` with ``train.nproc_per_node`` ranks (reading ``params_file``, by default
    ``root``'s params.yaml) and returns what rank 0 wrote."""
    cuda = params.train.device != "cpu" and torch.cuda.is_available()
    if params.train.launcher == "torchrun" and params.train.sync_batchnorm and not cuda:
        raise UserError(
            "train.sync_batchnorm needs CUDA (PyTorch's SyncBatchNorm runs on GPUs only) and this run "
            "trains on the CPU; set train.sync_batchnorm: false"
        )
    if params.train.launcher == "torchrun" and not under_torchrun():
        source = params_file or root / PARAMS_FILE
        if not source.is_file():
            raise UserError(f"{source} is missing: train.launcher torchrun reads its params from a file")
        launch(
            params.train.nproc_per_node,
            "synermix.stages.train",
            ["--root", str(root), "--params", str(source)],
            "train",
        )
        return json.loads((root / TRAIN_METRICS).read_text())
    dist = from_env() if under_torchrun() else SINGLE
    names, train_rows, val_rows, manifest_sha = train_val_rows(params, root)
    train_params, tuned = apply_tuned(params.train, root / BEST_PARAMS)
    channels = infer_channels(train_rows) if train_params.channels == "auto" else int(train_params.channels)
    # bad class weights, an input size the backbone cannot take, or starting weights that
    # do not load stop here, before a run, a checkpoint or a model file is written
    init = check_training_inputs(train_params, names, channels, tracking_uri(params.mlflow))
    job = _Job(params, root, names, train_rows, val_rows, manifest_sha, train_params, tuned, init, dist)
    if not dist.active:
        return _train_and_write(job)
    setup(dist, "cuda" if cuda else "cpu")
    try:
        if dist.is_main:  # rank 0 logs and writes everything
            return _train_and_write(job)
        job.train()  # the other ranks train their share of every batch
        return {}
    finally:
        teardown()


@dataclass(frozen=True)
class _Job:
    """One training of the train stage: its inputs, the same on every rank."""

    params: Params
    root: Path
    names: list[str]
    train_rows: pd.DataFrame
    val_rows: pd.DataFrame
    manifest_sha: str
    train_params: TrainParams
    tuned: dict
    init: InitWeights
    dist: Dist

    def train(self, on_epoch_end: Callable[[dict], None] | None = None) -> TrainingResult:
        data = load_training_data(
            self.train_rows, self.val_rows, self.root / PREPARED_DIR, self.names, self.train_params
        )
        return train_model(
            data,
            self.names,
            self.train_params,
            self.params.seed,
            checkpoint_path=self.root / TRAIN_CHECKPOINT,
            on_epoch_end=on_epoch_end,
            init=self.init,
            dist=self.dist,
        )


def _train_and_write(job: _Job) -> dict:
    params, root, names, train_params, tuned = job.params, job.root, job.names, job.train_params, job.tuned
    train_rows, val_rows, manifest_sha = job.train_rows, job.val_rows, job.manifest_sha
    with mlflow_run(params, "train", root, {"manifest_sha256": manifest_sha}) as run:
        mlflow.log_params(flatten({"seed": params.seed, "train": train_params.model_dump(mode="json")}))
        init_record = job.init.record()
        mlflow.log_params({"init.kind": init_record["kind"], "init.source": init_record["source"]})
        mlflow.set_tag("init_spec", init_record["spec"])
        if init_record["sha256"]:
            mlflow.set_tag("init_sha256", init_record["sha256"])
        if init_record.get("notes"):
            mlflow.set_tag("init_notes", "; ".join(init_record["notes"]))
        if tuned:
            mlflow.log_params({f"tuned.{k}": v for k, v in tuned["params"].items()})
            mlflow.set_tags({"tuned_by_study": tuned["study"], "tuned_best_trial": tuned["best_trial"]})
        origin = _origin(tuned)
        used = {k: getattr(train_params, k) for k in TUNABLE_TRAIN_KEYS}
        log_effective_train_params(client_for(params), run.info.run_id, used, origin)
        log_manifest_input(train_rows, root / MANIFEST, "train")
        log_manifest_input(val_rows, root / MANIFEST, "val")
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

        result = job.train(on_epoch_end=log_epoch)
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
                "processes": job.dist.world_size,
            },
        )
        history = pd.DataFrame(result.history)
        (root / TRAIN_HISTORY).parent.mkdir(parents=True, exist_ok=True)
        history.to_csv(root / TRAIN_HISTORY, index=False, lineterminator="\n", float_format="%.6g")
        figures = write_training_curves(root / TRAIN_FIGURES["loss"].parent, history, meta["selected_epoch"])
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
        for figure in figures:
            mlflow.log_artifact(str(figure), artifact_path="plots")
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


def main(argv: list[str] | None = None) -> None:
    """One torchrun rank of the train stage (started by :func:`run_train`)."""
    import argparse
    import logging as logging_

    from synermix.cli import setup_logging
    from synermix.config import load_params
    from synermix.errors import exit_on_user_error

    parser = argparse.ArgumentParser(prog="python -m synermix.stages.train")
    parser.add_argument("--root", type=Path, default=Path("."))
    parser.add_argument("--params", type=Path, required=True)
    args = parser.parse_args(argv)
    if "RANK" in os.environ:  # this module is the rank entry point, however torchrun was started
        os.environ[CHILD_ENV] = "1"
    setup_logging()
    if from_env().rank:  # rank 0 speaks for the job
        logging_.getLogger().setLevel(logging_.WARNING)
    exit_on_user_error(lambda: run_train(load_params(args.params), args.root, args.params))()


if __name__ == "__main__":
    main()
