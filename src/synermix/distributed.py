"""Training under ``torchrun``: one process per GPU (or CPU process), DistributedDataParallel.

``train.launcher: torchrun`` makes the train stage start ``torchrun --nproc_per_node
train.nproc_per_node`` on itself (:func:`launch`); each rank then runs the same training
with its share of every batch (:class:`~synermix.data.samplers.RankBatchSampler`), gloo on
CPU and NCCL on CUDA. Only rank 0 writes checkpoints, model files, reports and MLflow runs.

The loss each rank back-propagates is rescaled so that DDP's gradient average is the
gradient of the whole global batch's loss: the image-level (inter) term by
``world_size * n_rank / n_global`` (a mean over the global batch's images), the
SynerMix-Intra term by ``world_size * k_rank / k_total`` (a mean over every rank's
synthetic class features). The intra-class synthesis is per rank, over the rank's own
images of each class (at least two, by the sampler): gathering features across ranks
would need an all-gather with autograd on every step for the same kind of convex
combination, and each rank's share already has the whole batch's class mix.
"""

from __future__ import annotations

import datetime
import logging
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as torch_dist
from torch import nn

from synermix.errors import UserError
from synermix.mixup import LossParts

log = logging.getLogger(__name__)

#: set in the ranks' environment by :func:`launch` (a rank never launches again)
CHILD_ENV = "SYNERMIX_TORCHRUN_CHILD"


@dataclass(frozen=True)
class Dist:
    """Where this process stands: rank ``rank`` of ``world_size`` (1: no distribution)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = Dist()


def from_env() -> Dist:
    """The rank torchrun gave this process (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``)."""
    try:
        return Dist(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"]))
    except (KeyError, ValueError):
        return SINGLE


def under_torchrun() -> bool:
    """Whether this process is a rank of the train stage (started by :func:`launch`, or by
    ``torchrun -m synermix.stages.train`` by hand, e.g. on several nodes)."""
    return os.environ.get(CHILD_ENV) == "1" and "RANK" in os.environ


def setup(dist: Dist, device_type: str, timeout_s: float = 600.0) -> None:
    """Join the process group (NCCL on CUDA, gloo on CPU); CUDA ranks take their own GPU.

    A SIGTERM (torchrun stops the others when one rank dies) becomes a SystemExit, so a
    rank's open MLflow run and temporary files are closed as on any other error."""
    if not dist.active or torch_dist.is_initialized():
        return
    if device_type == "cuda":
        torch.cuda.set_device(dist.local_rank)
    backend = "nccl" if device_type == "cuda" else "gloo"
    torch_dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    log.info("rank %d of %d joined (%s)", dist.rank, dist.world_size, backend)


def _exit_on_sigterm(signum, frame) -> None:  # pragma: no cover - exercised by the kill test
    raise SystemExit(f"rank stopped by signal {signum}")


def teardown() -> None:
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def all_sum(values: list[float], device: torch.device) -> list[float]:
    """The element-wise sum of ``values`` over the ranks (``values`` itself in one process)."""
    if not torch_dist.is_initialized():
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    torch_dist.all_reduce(tensor)
    return tensor.tolist()


def gather(obj: Any) -> list[Any]:
    """``obj`` of every rank, in rank order (``[obj]`` in one process)."""
    if not torch_dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * torch_dist.get_world_size()
    torch_dist.all_gather_object(out, obj)
    return out


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not torch_dist.is_initialized():
        return obj
    box = [obj]
    torch_dist.broadcast_object_list(box, src=0)
    return box[0]


class RankLoss(nn.Module):
    """The criterion as a module, so DistributedDataParallel wraps the whole step (its
    gradient hooks need the forward call to go through the wrapper), with the loss rescaled
    as the module docstring says. Returns :class:`LossParts` whose ``total`` is what this
    rank back-propagates; ``intra`` and ``inter`` are the rank's own, unscaled."""

    def __init__(self, model: nn.Module, criterion, world_size: int, num_classes: int) -> None:
        super().__init__()
        self.model = model
        self.criterion = criterion
        self.world_size = world_size
        self.num_classes = num_classes

    def forward(self, x_orig: torch.Tensor, x_aug: torch.Tensor, y: torch.Tensor) -> LossParts:
        parts = self.criterion(self.model, x_orig, x_aug, y)
        classes = torch.bincount(y, minlength=self.num_classes).gt(0).sum()
        counts = torch.stack([torch.tensor(float(y.shape[0]), device=y.device), classes.to(torch.float32)])
        local = counts.clone()
        torch_dist.all_reduce(counts)
        inter_scale = self.world_size * local[0] / counts[0]
        if parts.intra is None:
            return LossParts(parts.inter * inter_scale, None, parts.inter)
        intra_scale = self.world_size * local[1] / counts[1]
        beta = self.criterion.beta
        total = beta * parts.intra * intra_scale + (1.0 - beta) * parts.inter * inter_scale
        return LossParts(total, parts.intra, parts.inter)


def launch(nproc: int, module: str, args: list[str], what: str) -> None:
    """Run ``python -m module args`` under ``torchrun --standalone --nproc_per_node nproc``
    and wait. A failed rank (torchrun stops the others) is one :class:`UserError` line."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        module,
        *args,
    ]
    env = {**os.environ, CHILD_ENV: "1"}
    # one process per rank on a CPU: split the cores so the ranks do not oversubscribe them
    if "OMP_NUM_THREADS" not in os.environ and not torch.cuda.is_available():
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    log.info("%s: torchrun with %d processes: %s", what, nproc, " ".join(command[1:]))
    done = subprocess.run(command, env=env, check=False)
    if done.returncode != 0:
        raise UserError(
            f"{what} under torchrun failed: a rank exited with code {done.returncode} and torchrun stopped "
            f"the others (their messages are above); nothing was written but the checkpoint, so a rerun "
            f"resumes from it (train.nproc_per_node must stay {nproc})"
        )


def refuse_other_world_size(checkpoint_path: Path, written: int, now: int) -> None:
    raise UserError(
        f"checkpoint {checkpoint_path} was written by {written} process(es), this run has {now}: "
        f"set train.nproc_per_node: {written} to resume it, or delete it to start afresh"
    )
