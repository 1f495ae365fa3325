"""One SynerMix training run, from manifest rows to a trained model (no MLflow/DVC here).

:func:`train_model` wires the data (two views, the class-pair batch sampler), the model,
the loss, the optimiser and schedule, and runs the epochs with a checkpoint after each
one. When a checkpoint from the same configuration and data exists it resumes from it;
a checkpoint from anything else is ignored. Trained weights are saved as a plain
``state_dict`` (loadable with ``weights_only=True``) beside ``model.json``, which holds
the architecture, class names and preprocessing.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from synermix.config import TrainParams
from synermix.data.datasets import InspectionImages, channel_stats, infer_channels
from synermix.data.samplers import ClassPairBatchSampler, RankBatchSampler
from synermix.data.transforms import Preprocessing, build_augmentation
from synermix.distributed import SINGLE, Dist, RankLoss, all_sum, gather, refuse_other_world_size
from synermix.engine import (
    build_optimizer,
    build_scheduler,
    evaluate,
    load_checkpoint,
    save_checkpoint,
    select_device,
    train_one_epoch,
)
from synermix.errors import UserError, first_line
from synermix.mixup import MixRandom, SynerMixLoss
from synermix.models import SplitNet, build_model

log = logging.getLogger(__name__)

WEIGHTS_NAME = "weights.pt"
META_NAME = "model.json"


@dataclass
class TrainingResult:
    model: SplitNet  # holds the kept epoch's weights (train.keep), EMA ones with train.ema_decay
    class_names: list[str]
    preprocessing: Preprocessing
    history: list[dict[str, Any]]
    resumed_from_epoch: int
    selected_epoch: int = 0  # 1-based epoch whose weights ``model`` holds; 0: the last
    init: dict[str, Any] | None = None  # InitWeights.record() of the starting weights

    @property
    def final(self) -> dict[str, Any]:
        return self.history[-1]

    @property
    def selected(self) -> dict[str, Any]:
        """The history row of the epoch whose weights were kept."""
        return self.history[self.selected_epoch - 1] if self.selected_epoch else self.history[-1]


#: The modules whose code decides what a training run computes.
TRAINING_CODE = (
    "training.py",
    "init_weights.py",
    "engine.py",
    "mixup.py",
    "models.py",
    "choices.py",
    "data/datasets.py",
    "data/samplers.py",
    "data/transforms.py",
    "data/images.py",  # fit_square: the pixels the model sees
    "distributed.py",
)


def run_fingerprint(
    params: TrainParams, seed: int, class_names: Sequence[str], *datasets: InspectionImages
) -> str:
    """Hash of everything that determines a run: params, seed, classes, the training code
    and every image and label used. A checkpoint resumes only on a match."""
    digest = hashlib.sha256()
    # how many processes is checked apart: a checkpoint of another world size is refused,
    # not silently replaced
    settings = params.model_dump(mode="json", exclude={"launcher", "nproc_per_node"})
    digest.update(json.dumps([settings, seed, list(class_names)], sort_keys=True).encode())
    package = Path(__file__).parent
    for name in TRAINING_CODE:
        digest.update((package / name).read_bytes())
    for dataset in datasets:
        dataset.update_digest(digest)
    return digest.hexdigest()


def class_weight_vector(params: TrainParams, class_names: Sequence[str], labels: Sequence[int]):
    """``train.class_weights`` as a tensor in label order, or None.

    ``balanced``: ``w_c = n_c**-balance_power``, scaled so the weights average 1 over the
    training images (the loss keeps its scale). A mapping names classes; the ones it
    leaves out weigh 1. A name that is no class is a :class:`UserError`."""
    spec = params.class_weights
    if spec is None:
        return None
    if spec == "balanced":
        counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(class_names)).astype(float)
        raw = np.where(counts > 0, np.maximum(counts, 1.0) ** -params.balance_power, 0.0)
        raw = raw / (float((raw * counts).sum()) / max(float(counts.sum()), 1.0))
        return torch.tensor(raw, dtype=torch.float32)
    unknown = sorted(set(spec) - set(class_names))
    if unknown:
        raise UserError(
            f"train.class_weights names {', '.join(repr(u) for u in unknown)}, not a class of this data; "
            f"the classes are {', '.join(class_names)}"
        )
    return torch.tensor([float(spec.get(name, 1.0)) for name in class_names], dtype=torch.float32)


def check_input_size(params: TrainParams, channels: int, num_classes: int) -> None:
    """A :class:`UserError` when the backbone cannot take ``train.image_size`` inputs, or
    ``train.freeze_stages`` would leave it no stage to train."""
    model = build_model(params.arch, num_classes, channels, params.small_input_stem, params.width).eval()
    if params.freeze_stages >= len(model.stages):
        raise UserError(
            f"train.freeze_stages {params.freeze_stages}: {params.arch} has {len(model.stages)} stages, "
            f"so at most {len(model.stages) - 1} can be frozen; lower train.freeze_stages"
        )
    try:
        with torch.no_grad():
            model(torch.zeros(1, channels, params.image_size, params.image_size))
    except RuntimeError as exc:
        reason = first_line(exc)
        raise UserError(
            f"train.image_size {params.image_size} is too small for {params.arch}"
            f"{'' if params.small_input_stem else ' (stride-32 stem)'}: {reason}; raise train.image_size"
            f"{'' if params.small_input_stem else ' or set train.small_input_stem: true'}"
        ) from None


def check_training_inputs(
    params: TrainParams,
    class_names: Sequence[str],
    channels: int,
    tracking_uri: str | None = None,
):
    """Everything a user can get wrong about a run, checked before anything is written:
    class weights, the input size, and the starting weights (resolved and returned)."""
    from synermix.init_weights import resolve_init

    class_weight_vector(params, class_names, list(range(len(class_names))))
    check_input_size(params, channels, len(class_names))
    return resolve_init(
        params.init,
        arch=params.arch,
        width=params.width,
        in_channels=channels,
        num_classes=len(class_names),
        small_input_stem=params.small_input_stem,
        tracking_uri=tracking_uri,
        class_names=list(class_names),
    )


def seeds_for(seed: int, rank: int = 0) -> dict[str, int]:
    """Independent seeds for each random source, all derived from the one ``seed`` param.

    Under torchrun every rank shares the torch, sampler and loader seeds (the same initial
    weights and the same global batches) and draws its own mixing (``mix``: per seed and
    rank); rank 0's seeds are the single-process ones."""
    names = ("torch", "sampler", "loader", "mix")
    children = np.random.SeedSequence(seed).spawn(len(names))
    seeds = {name: int(child.generate_state(1)[0]) for name, child in zip(names, children, strict=True)}
    if rank:
        seeds["mix"] = int(np.random.SeedSequence([seeds["mix"], rank]).generate_state(1)[0])
    return seeds


def _rng_state(sampler, loader_generator, mix_rng) -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "sampler": sampler.state_dict(),
        "loader": loader_generator.get_state(),
        "mix": mix_rng.state_dict(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore_rng(state, sampler, loader_generator, mix_rng) -> None:
    torch.set_rng_state(state["torch"])
    sampler.load_state_dict(state["sampler"])
    loader_generator.set_state(state["loader"])
    mix_rng.load_state_dict(state["mix"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class TrainingData:
    """The train (two views) and val datasets with the preprocessing fitted on train.

    Built once by :func:`load_training_data`; the tune stage shares one across trials,
    which differ only in knobs that do not touch the images."""

    train_set: InspectionImages
    val_set: InspectionImages
    preprocessing: Preprocessing


def load_training_data(
    train_rows: pd.DataFrame,
    val_rows: pd.DataFrame,
    image_root: Path,
    class_names: Sequence[str],
    params: TrainParams,
) -> TrainingData:
    channels = infer_channels(train_rows) if params.channels == "auto" else int(params.channels)
    augmentation = build_augmentation(params.image_size, params.augment)
    common = {"image_size": params.image_size, "channels": channels, "cache": params.cache_images}
    train_set = InspectionImages(
        train_rows,
        image_root,
        class_names,
        None,
        augmentation=augmentation,
        two_views=True,
        desc="load train",
        **common,
    )
    val_set = InspectionImages(val_rows, image_root, class_names, None, desc="load val", **common)
    stats_images = train_set.cache or [train_set.raw(i) for i in range(min(len(train_set), 2000))]
    mean, std = channel_stats(stats_images)
    pre = Preprocessing(image_size=params.image_size, channels=channels, mean=mean, std=std)
    train_set.pre = val_set.pre = pre
    return TrainingData(train_set, val_set, pre)


def train_model(
    data: TrainingData,
    class_names: Sequence[str],
    params: TrainParams,
    seed: int,
    *,
    checkpoint_path: Path | None = None,
    on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
    on_resume: Callable[[int], None] | None = None,
    init=None,
    dist: Dist = SINGLE,
) -> TrainingResult:
    """Train with ``params`` on ``data`` (from :func:`load_training_data`, built with the
    same params: the tune stage builds it once for every trial), validating on its val
    set after every epoch.

    ``on_epoch_end`` gets each
    epoch's row, replayed ones included on resume; an exception it raises (e.g. a pruned
    trial) stops training after the checkpoint of that epoch is written. ``on_resume``
    gets the epoch a checkpoint resumes from. ``init`` (an
    :class:`~synermix.init_weights.InitWeights` from :func:`check_training_inputs`) gives
    the starting weights; None resolves ``params.init`` here.

    After every epoch the model (its EMA with ``train.ema_decay``) is scored on val; with
    ``train.keep: best`` the weights of the epoch with the highest ``train.select_metric``
    (the earliest on a tie) are the ones returned, else the last epoch's.

    ``dist`` (under torchrun, :mod:`synermix.distributed`): this rank trains on its share of
    each batch in DistributedDataParallel; only rank 0 writes the checkpoint, and rank 0's
    result is the run's (the others' BatchNorm running statistics may differ by their last
    step's batch). The caller joins the process group first."""
    seeds = seeds_for(seed, dist.rank)
    train_set, val_set, pre = data.train_set, data.val_set, data.preprocessing
    channels = pre.channels
    if init is None:
        # before seeding: the check builds a model (drawing from torch's generator), and the
        # train stage runs it before calling here, so both give the same weights
        init = check_training_inputs(params, class_names, channels)
    torch.manual_seed(seeds["torch"])
    setup = select_device(params.device, params.amp, params.channels_last)
    balance = params.balance_power if params.sampling == "balanced" else None
    if dist.active:
        sampler = RankBatchSampler(
            train_set.labels, params.batch_size, seeds["sampler"], dist.rank, dist.world_size, balance
        )
    else:
        sampler = ClassPairBatchSampler(train_set.labels, params.batch_size, seeds["sampler"], balance)
    loader_generator = torch.Generator().manual_seed(seeds["loader"])
    pin = setup.device.type == "cuda"
    train_loader = DataLoader(
        train_set,
        batch_sampler=sampler,
        num_workers=params.num_workers,
        generator=loader_generator,
        pin_memory=pin,
    )
    val_loader = DataLoader(
        val_set, batch_size=max(64, params.batch_size), num_workers=params.num_workers, pin_memory=pin
    )

    num_classes = len(class_names)
    model = build_model(params.arch, num_classes, channels, params.small_input_stem, params.width)
    init.apply(model)
    model.freeze_stages(params.freeze_stages)
    if dist.active and params.sync_batchnorm:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(setup.device)
    if setup.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(
        model, params.optimizer, params.lr, params.momentum, params.weight_decay, params.backbone_lr_scale
    )
    scheduler = build_scheduler(
        optimizer,
        len(train_loader),
        params.epochs,
        params.schedule,
        params.warmup_epochs,
        params.step_size,
        params.gamma,
    )
    scaler = torch.amp.GradScaler("cuda") if setup.amp_dtype == torch.float16 else None
    mix_rng = MixRandom(seeds["mix"])
    criterion = SynerMixLoss(
        params.method,
        num_classes,
        mix_rng,
        params.beta,
        params.mixup_alpha,
        params.inter_method,
        class_weight_vector(params, class_names, train_set.labels),
        params.label_smoothing,
    )
    ema = None
    if params.ema_decay is not None:
        # buffers too: BatchNorm statistics of the averaged weights, not the live ones
        ema = torch.optim.swa_utils.AveragedModel(
            model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(params.ema_decay), use_buffers=True
        )
    scored = ema.module if ema is not None else model
    step_criterion = criterion
    if dist.active:
        from torch.nn.parallel import DistributedDataParallel

        wrapped = DistributedDataParallel(
            RankLoss(model, criterion, dist.world_size, num_classes),
            device_ids=[dist.local_rank] if setup.device.type == "cuda" else None,
        )
        wrapped.train()

        def step_criterion(_model, x_orig, x_aug, y):
            return wrapped(x_orig, x_aug, y)

    if params.compile:
        # One graph per (start, stop) of the stage chain: whole network, and the two
        # halves around each manifold-mixup point. state_dict keys stay unchanged.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
        model.run_stages = torch.compile(model.run_stages)

    fingerprint = run_fingerprint(params, seed, class_names, train_set, val_set)
    fingerprint = hashlib.sha256(f"{fingerprint}:{init.sha256}".encode()).hexdigest()
    history: list[dict[str, Any]] = []
    start = 0
    best: dict[str, Any] = {"epoch": 0, "metric": float("-inf"), "state": None}
    checkpoint = load_checkpoint(checkpoint_path) if checkpoint_path else None
    if checkpoint is not None and int(checkpoint.get("epoch", 0)) >= params.epochs:
        log.info("checkpoint %s is of a finished run; training afresh", checkpoint_path)
    elif checkpoint is not None and checkpoint.get("fingerprint") == fingerprint:
        if int(checkpoint.get("world_size", 1)) != dist.world_size:
            refuse_other_world_size(checkpoint_path, int(checkpoint.get("world_size", 1)), dist.world_size)
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        if scaler is not None and checkpoint.get("scaler"):
            scaler.load_state_dict(checkpoint["scaler"])
        if ema is not None:
            ema.load_state_dict(checkpoint["ema"])
        best = checkpoint["best"]
        rng = checkpoint["rank_rngs"][dist.rank] if dist.active else checkpoint["rng"]
        _restore_rng(rng, sampler, loader_generator, mix_rng)
        start, history = int(checkpoint["epoch"]), list(checkpoint["history"])
        log.info("resuming from %s after epoch %d of %d", checkpoint_path, start, params.epochs)
        if on_resume:
            on_resume(start)
        for row in history:
            if on_epoch_end:
                on_epoch_end(row)
    elif checkpoint is not None:
        log.info("checkpoint %s is from another configuration or data; starting afresh", checkpoint_path)

    log.info(
        "training %s (%s, beta=%g) on %d images, validating on %d; %d classes, %d px, %d channel(s)",
        params.arch,
        params.method,
        criterion.beta,
        len(train_set),
        len(val_set),
        num_classes,
        params.image_size,
        channels,
    )
    for epoch in range(start, params.epochs):
        stats = train_one_epoch(
            model, step_criterion, optimizer, scheduler, train_loader, setup, epoch, scaler, ema=ema
        )
        if dist.active:  # the global batch's figures: the mean loss over ranks, images/s summed
            loss, intra, speed = all_sum(
                [stats["train_loss"], stats["train_intra_loss"], stats["images_per_s"]], setup.device
            )
            stats.update(
                train_loss=loss / dist.world_size,
                train_intra_loss=intra / dist.world_size,
                images_per_s=speed,
            )
        val = evaluate(scored, val_loader, setup, num_classes)
        row = {
            "epoch": epoch + 1,
            **stats,
            "val_loss": val["loss"],
            "val_accuracy": val["accuracy"],
            "val_macro_recall": val["macro_recall"],
            **{f"val_recall_{name}": r for name, r in zip(class_names, val["per_class_recall"], strict=True)},
        }
        history.append(row)
        if params.keep == "best" and row[params.select_metric] > best["metric"]:
            state = {k: v.detach().to("cpu", copy=True) for k, v in scored.state_dict().items()}
            best = {"epoch": epoch + 1, "metric": float(row[params.select_metric]), "state": state}
        log.info(
            "epoch %d/%d: train loss %.4f, val loss %.4f, val accuracy %.4f, macro recall %.4f, %.0f img/s",
            epoch + 1,
            params.epochs,
            row["train_loss"],
            row["val_loss"],
            row["val_accuracy"],
            row["val_macro_recall"],
            row["images_per_s"],
        )
        rngs = gather(_rng_state(sampler, loader_generator, mix_rng)) if dist.active else None
        if checkpoint_path and dist.is_main:
            save_checkpoint(
                checkpoint_path,
                {
                    "fingerprint": fingerprint,
                    "epoch": epoch + 1,
                    "history": history,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict() if scaler is not None else None,
                    "ema": ema.state_dict() if ema is not None else None,
                    "best": best,
                    "rng": _rng_state(sampler, loader_generator, mix_rng),
                    **({"world_size": dist.world_size, "rank_rngs": rngs} if dist.active else {}),
                },
            )
        if on_epoch_end:
            on_epoch_end(row)
    selected = len(history)
    if params.keep == "best" and best["state"] is not None:
        model.load_state_dict(best["state"])
        selected = best["epoch"]
    elif ema is not None:
        model.load_state_dict(ema.module.state_dict())
    if selected != len(history):
        log.info(
            "keeping the weights of epoch %d of %d (best %s %.4f on val; last epoch %.4f)",
            selected,
            len(history),
            params.select_metric,
            history[selected - 1][params.select_metric],
            history[-1][params.select_metric],
        )
    return TrainingResult(model, list(class_names), pre, history, start, selected, init.record())


def save_trained_model(
    result: TrainingResult, params: TrainParams, out_dir: Path, extra: dict[str, Any]
) -> dict:
    """Write ``weights.pt`` (a CPU state_dict) and ``model.json``; return the metadata."""
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in result.model.state_dict().items()}
    torch.save(state, out_dir / WEIGHTS_NAME)
    meta = {
        "arch": params.arch,
        "num_classes": len(result.class_names),
        "class_names": result.class_names,
        "in_channels": result.preprocessing.channels,
        "small_input_stem": params.small_input_stem,
        "preprocessing": result.preprocessing.to_dict(),
        "width": params.width,
        "method": params.method,
        "beta": params.beta if params.method in ("synermix", "synermix_intra") else 0.0,
        "lr": params.lr,
        "inter_method": params.inter_method,
        "epochs": params.epochs,
        "selected_epoch": result.selected_epoch or len(result.history),
        "selected_by": params.select_metric if params.keep == "best" else "last epoch",
        "init": result.init,
        "weights_sha256": hashlib.sha256((out_dir / WEIGHTS_NAME).read_bytes()).hexdigest(),
        "torch_version": torch.__version__,
        **extra,
    }
    (out_dir / META_NAME).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def load_trained_model(model_dir: Path) -> tuple[SplitNet, dict[str, Any]]:
    """Rebuild a model saved by :func:`save_trained_model` (weights loaded with ``weights_only=True``)."""
    meta = json.loads((model_dir / META_NAME).read_text())
    model = build_model(
        meta["arch"], meta["num_classes"], meta["in_channels"], meta["small_input_stem"], meta.get("width")
    )
    model.load_state_dict(torch.load(model_dir / WEIGHTS_NAME, map_location="cpu", weights_only=True))
    return model.eval(), meta
