"""Inference benchmark: onnxruntime against PyTorch eager, and INT8 against FP32, side by side.

Runs the trained model (models/model) in PyTorch eager mode and its export
(models/onnx/model.onnx) in onnxruntime on the same machine, the same thread count and
the same real test images, at batch 1 and batch 32: median and p90 latency, images/s,
and the ratios. Then the INT8 variant (models/onnx/model.int8.onnx, or one quantised
here from seeded training images when the export did not make one) against FP32 ONNX:
speed and test-split accuracy.

Targets on CPU: onnxruntime >= 2x eager at batch 1 and >= 1.2x at batch 32; INT8 >= 1.5x
FP32 with at most 1 point of accuracy change.

    python bench/onnx_inference.py                 # after dvc repro (needs models/ and data/)
    python bench/onnx_inference.py --threads 1 --repeats 50
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from synermix import onnx_export as ox
from synermix.config import load_params
from synermix.inference import Classifier
from synermix.paths import EXPORT_DIR, MODEL_DIR, ONNX_MODEL, PREPARED_DIR
from synermix.stages.common import evaluation_rows
from synermix.stages.export import calibration_rows, production_inputs
from synermix.training import load_trained_model


def timed(fn, repeats: int, warmup: int = 3) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def summary(times: list[float], batch: int) -> tuple[float, float, float]:
    """median ms, p90 ms, images/s (from the median)."""
    ordered = sorted(times)
    median = statistics.median(ordered)
    p90 = ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]
    return median * 1e3, p90 * 1e3, batch / median


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="for both runtimes")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    root = Path(".")
    model, meta = load_trained_model(root / MODEL_DIR)
    fp32 = Classifier(root / ONNX_MODEL, provider="cpu", threads=args.threads)
    _, test_rows = evaluation_rows(root, meta["class_names"], meta.get("manifest_sha256"))
    names = list(meta["class_names"])
    inputs, labels = production_inputs(test_rows, root / PREPARED_DIR, fp32.preprocess, names)
    print(
        f"{meta['arch']}, input {'x'.join(map(str, inputs.shape[1:]))}, {args.threads} thread(s), "
        f"{args.repeats} timed runs each, {len(inputs)} real test images; provider {fp32.provider}"
    )

    int8_path = root / EXPORT_DIR / "model.int8.onnx"
    tmp = tempfile.TemporaryDirectory()
    if not int8_path.is_file():
        rows = calibration_rows(load_params(args.params), root, names)
        calibration, _ = production_inputs(rows, root / PREPARED_DIR, fp32.preprocess, names)
        int8_path = Path(tmp.name) / "model.int8.onnx"
        ox.quantize_int8(root / ONNX_MODEL, int8_path, calibration)
        print(f"quantised INT8 here on {len(calibration)} training images (export.int8 is off)")
    int8 = Classifier(int8_path, provider="cpu", threads=args.threads)

    rows = []
    with torch.no_grad():
        for batch in (1, 32):
            x = inputs[:batch] if len(inputs) >= batch else np.resize(inputs, (batch, *inputs.shape[1:]))
            xt = torch.from_numpy(np.ascontiguousarray(x))
            runs = {
                "pytorch eager": lambda xt=xt: model(xt),
                "onnxruntime fp32": lambda x=x: fp32.logits(x),
                "onnxruntime int8": lambda x=x: int8.logits(x),
            }
            for name, fn in runs.items():
                rows.append((batch, name, *summary(timed(fn, args.repeats), batch)))

    print(f"\n{'batch':>5}  {'runtime':<18} {'median ms':>10} {'p90 ms':>9} {'images/s':>9}")
    for batch, name, median, p90, rate in rows:
        print(f"{batch:>5}  {name:<18} {median:>10.2f} {p90:>9.2f} {rate:>9.1f}")
    rate = {(b, n): r for b, n, _, _, r in rows}
    acc32 = ox.accuracy(fp32, inputs, labels)
    acc8 = ox.accuracy(int8, inputs, labels)
    checks = [
        ("onnxruntime / eager, batch 1", rate[1, "onnxruntime fp32"] / rate[1, "pytorch eager"], 2.0),
        ("onnxruntime / eager, batch 32", rate[32, "onnxruntime fp32"] / rate[32, "pytorch eager"], 1.2),
        ("INT8 / FP32 onnxruntime, batch 1", rate[1, "onnxruntime int8"] / rate[1, "onnxruntime fp32"], 1.5),
        (
            "INT8 / FP32 onnxruntime, batch 32",
            rate[32, "onnxruntime int8"] / rate[32, "onnxruntime fp32"],
            1.5,
        ),
    ]
    print()
    for label, ratio, target in checks:
        print(f"{label:<34} {ratio:5.2f}x  (target >= {target}x: {'met' if ratio >= target else 'NOT met'})")
    change = 100 * (acc8 - acc32)
    verdict = "met" if abs(change) <= 1.0 else "NOT met"
    print(
        f"test accuracy FP32 {acc32:.4f}, INT8 {acc8:.4f}: change {change:+.2f} points "
        f"(target within 1: {verdict})"
    )
    tmp.cleanup()


if __name__ == "__main__":
    main()
