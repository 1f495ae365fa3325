"""Training-step benchmark: what SynerMix costs next to ERM and MixUp, measured side by side.

Prints, for one model and one batch: the step time and images/s of erm, mixup,
synermix_intra and synermix; the time of the vectorised per-class feature synthesis
against a naive Python loop, and its share of a SynerMix step; and the achieved GFLOP/s
of a SynerMix step against a large matmul on the same device.

Targets: the synthesis costs under 2 % of a SynerMix step; a SynerMix step costs at most
2.1x a MixUp step (the extra forward/backward pass is inherent to the method).

    python bench/train_step.py                       # resnet18, 64 px, batch 64, CPU or CUDA
    python bench/train_step.py --arch resnet50 --image-size 224 --batch 128 --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from synermix.engine import select_device
from synermix.mixup import (
    MixRandom,
    SynerMixLoss,
    draw_intra_weights,
    synthesize_class_features,
    synthesize_class_features_naive,
)
from synermix.models import build_model

METHODS = ("erm", "mixup", "synermix_intra", "synermix")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per method and round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; methods alternate within a round")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    args = parser.parse_args()

    torch.manual_seed(0)
    setup = select_device(args.device)
    device = setup.device
    model = build_model(args.arch, args.classes, args.channels).to(device)
    if setup.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, args.channels, args.image_size, args.image_size, generator=g)
    x_orig, x_aug = setup.to_device(x), setup.to_device(x.flip(-1))
    y = (torch.arange(args.batch) % args.classes).to(device)  # every class present, >= 2 each

    losses = {m: SynerMixLoss(m, args.classes, MixRandom(0), beta=0.5) for m in METHODS}

    def step(method: str) -> None:
        with setup.autocast():
            parts = losses[method](model, x_orig, x_aug, y)
        optimizer.zero_grad(set_to_none=True)
        parts.total.backward()
        optimizer.step()

    for method in METHODS:  # warm-up (allocator, kernels, caches)
        for _ in range(2):
            step(method)
    samples: dict[str, list[float]] = {m: [] for m in METHODS}
    for _ in range(args.rounds):
        for method in METHODS:
            samples[method] += timed(lambda m=method: step(m), device, args.steps)
    median = {m: statistics.median(v) for m, v in samples.items()}

    # Per-class synthesis, alone: vectorised vs naive loop, on features of the model's width.
    features = torch.randn(args.batch, model.feature_dim, device=device)
    gen = torch.Generator().manual_seed(1)

    def vectorised() -> None:
        w = draw_intra_weights(y, args.classes, gen)
        synthesize_class_features(features, y, w, args.classes)

    def naive() -> None:
        w = draw_intra_weights(y, args.classes, gen)
        synthesize_class_features_naive(features, y, w)

    for fn in (vectorised, naive):
        timed(fn, device, 20)
    synth_vec = statistics.median(timed(vectorised, device, 200))
    synth_naive = statistics.median(timed(naive, device, 200))

    # Achieved GFLOP/s of a SynerMix step against a large matmul.
    counter = FlopCounterMode(display=False)
    with counter:
        step("synermix")
    step_flops = counter.get_total_flops()
    n = 2048
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    timed(lambda: a @ b, device, 3)
    matmul = statistics.median(timed(lambda: a @ b, device, 10))
    matmul_gflops = 2 * n**3 / matmul / 1e9
    step_gflops = step_flops / median["synermix"] / 1e9

    print(
        f"device: {device} ({torch.get_num_threads()} threads)"
        if device.type == "cpu"
        else f"device: {device}"
    )
    print(
        f"model: {args.arch}, input {args.channels}x{args.image_size}x{args.image_size}, batch {args.batch}, "
        f"{args.classes} classes; median of {args.rounds * args.steps} steps per method"
    )
    print()
    print(f"{'method':<16}{'step ms':>10}{'images/s':>11}{'x mixup':>9}")
    for method in METHODS:
        print(
            f"{method:<16}{median[method] * 1e3:>10.1f}{args.batch / median[method]:>11.0f}"
            f"{median[method] / median['mixup']:>9.2f}"
        )
    print()
    share = synth_vec / median["synermix"]
    ratio = median["synermix"] / median["mixup"]
    print(
        f"synthesis, vectorised: {synth_vec * 1e6:.0f} us; naive loop: {synth_naive * 1e6:.0f} us "
        f"(naive / vectorised = {synth_naive / synth_vec:.2f}x)"
    )
    print(
        f"synthesis share of a synermix step: {share:.3%} (target < 2%): {'PASS' if share < 0.02 else 'FAIL'}"
    )
    print(f"synermix step / mixup step: {ratio:.2f}x (target <= 2.1x): {'PASS' if ratio <= 2.1 else 'FAIL'}")
    print(
        f"synermix step: {step_flops / 1e9:.1f} GFLOP, {step_gflops:.1f} GFLOP/s achieved; "
        f"{n}x{n} matmul: {matmul_gflops:.1f} GFLOP/s; step / matmul = {step_gflops / matmul_gflops:.1%}"
    )


if __name__ == "__main__":
    main()
