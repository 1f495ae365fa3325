"""Fine-tuning step speed: frozen stages and channels_last, side by side in one run.

For one architecture, input size and batch, times a SynerMix training step (intra pass on
one view, MixUp on the other, backward, SGD step: what ``train.*`` runs) for every pair of
``train.freeze_stages`` in ``--freeze`` and ``train.channels_last`` off/on. Variants
alternate within each round, so a slower or busier host shifts them all alike; the table
gives the median images/s over the rounds and the ratio against the first variant
(everything trained, contiguous memory). Weights are random (the speed does not depend on
them), the images random noise::

    python bench/finetune_speed.py                                   # mobilenet_v2, 128 px
    python bench/finetune_speed.py --arch mobilenet_v2 --image-size 160 --freeze 0,1,2
    python bench/finetune_speed.py --arch resnet18 --width 16 --freeze 0

Compare ratios across hosts, never images/s (machines of one kind differ up to 3x).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from synermix.mixup import MixRandom, SynerMixLoss
from synermix.models import build_model


def images_per_second(
    arch: str, width: int | None, size: int, batch: int, freeze: int, channels_last: bool, steps: int
) -> float:
    torch.manual_seed(0)
    model = build_model(arch, 4, 1, False, width)
    model.freeze_stages(freeze)
    model.train()
    x = torch.randn(batch, 1, size, size)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.arange(batch) % 4
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    criterion = SynerMixLoss("synermix", 4, MixRandom(0), 0.3, 0.2, "mixup", None, 0.0)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        criterion(model, x, x, y).total.backward()
        optimizer.step()

    step()  # warm-up: allocator, kernel selection
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return batch * steps / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="mobilenet_v2")
    parser.add_argument("--width", type=int, default=None, help="ResNets only")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--freeze", default="0,1,2", help="comma-separated freeze_stages values")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant and round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    variants = [(int(f), cl) for f in args.freeze.split(",") for cl in (False, True)]
    speeds: dict[tuple[int, bool], list[float]] = {v: [] for v in variants}
    for _ in range(args.rounds):
        for freeze, channels_last in variants:
            speeds[(freeze, channels_last)].append(
                images_per_second(
                    args.arch, args.width, args.image_size, args.batch, freeze, channels_last, args.steps
                )
            )
    base = statistics.median(speeds[variants[0]])
    print(
        f"{args.arch}{'' if args.width is None else f' width {args.width}'}, {args.image_size} px, "
        f"batch {args.batch}, SynerMix step, {torch.get_num_threads()} threads, "
        f"median of {args.rounds} rounds x {args.steps} steps"
    )
    print("| freeze_stages | channels_last | images/s | ratio |")
    print("|---:|---|---:|---:|")
    for variant in variants:
        median = statistics.median(speeds[variant])
        print(f"| {variant[0]} | {'on' if variant[1] else 'off'} | {median:.1f} | {median / base:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
