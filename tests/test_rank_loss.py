"""DistributedDataParallel's averaged gradient of the rescaled per-rank loss is the gradient
of the whole global batch's loss: checked with two real gloo processes against the same
per-rank computations summed in one process."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from synermix.data.samplers import share_batch
from synermix.distributed import RankLoss
from synermix.mixup import MixRandom, SynerMixLoss
from synermix.models import build_model

pytestmark = pytest.mark.integration

CLASSES = 3
#: a global batch: 7 of class 0, 5 of class 1, 2 of class 2 (shares of unequal size)
LABELS = torch.tensor([0] * 7 + [1] * 5 + [2] * 2)
WORLD = 2


def inputs():
    generator = torch.Generator().manual_seed(0)
    x_orig = torch.randn(len(LABELS), 1, 32, 32, generator=generator)
    x_aug = torch.randn(len(LABELS), 1, 32, 32, generator=generator)
    return x_orig, x_aug


def model_and_loss(rank: int, method: str):
    torch.manual_seed(0)
    model = build_model("resnet18", CLASSES, 1, True, 8)
    return model, SynerMixLoss(method, CLASSES, MixRandom(100 + rank), beta=0.3, alpha=0.4)


def _rank(rank: int, init_file: str, out: str, method: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        share = share_batch(range(len(LABELS)), LABELS.tolist(), WORLD)[rank]
        x_orig, x_aug = inputs()
        model, criterion = model_and_loss(rank, method)
        wrapped = torch.nn.parallel.DistributedDataParallel(RankLoss(model, criterion, WORLD, CLASSES))
        wrapped(x_orig[share], x_aug[share], LABELS[share]).total.backward()
        if rank == 0:
            torch.save({k: p.grad for k, p in model.named_parameters() if p.grad is not None}, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("method", ["erm", "synermix"])
def test_averaged_rank_gradients_are_the_global_batch_gradient(tmp_path, method):
    out = tmp_path / "grads.pt"
    mp.spawn(_rank, args=(str(tmp_path / "init"), str(out), method), nprocs=WORLD, join=True)
    ranked = torch.load(out, weights_only=True)

    # the same per-rank computations in one process (each rank's own mixing draws), weighted
    # as one global batch: inter over its images, intra over every rank's class features
    shares = share_batch(range(len(LABELS)), LABELS.tolist(), WORLD)
    x_orig, x_aug = inputs()
    model, _ = model_and_loss(0, method)
    inter, intra, images, classes = [], [], [], []
    for rank, share in enumerate(shares):
        _, criterion = model_and_loss(rank, method)
        parts = criterion(model, x_orig[share], x_aug[share], LABELS[share])
        inter.append(parts.inter * len(share))
        images.append(len(share))
        if parts.intra is not None:
            present = len(set(LABELS[share].tolist()))
            intra.append(parts.intra * present)
            classes.append(present)
    total = sum(inter) / sum(images)
    if intra:
        total = 0.3 * sum(intra) / sum(classes) + 0.7 * total
    total.backward()
    reference = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
    assert ranked.keys() == reference.keys()
    for name, grad in reference.items():
        torch.testing.assert_close(ranked[name], grad, rtol=1e-4, atol=1e-6, msg=name)
