"""A tiny real ONNX model with the monitoring embedding and a reference profile, built as the
export stage builds them (LineModel + Projection, observe, build_profile, attach_profile)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from synermix import onnx_export as ox
from synermix.data.transforms import Preprocessing
from synermix.inference import Classifier
from synermix.profile import attach_profile, build_profile, observe

CLASSES = ["crack", "ok", "scratch"]


class TinySplit(torch.nn.Module):
    """features(x) -> 8 values, classifier -> 3 logits, on 1 x 16 x 16."""

    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(1, 4, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(2),
            torch.nn.Flatten(),
        )
        self.head = torch.nn.Linear(16, len(CLASSES))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    @property
    def classifier(self) -> torch.nn.Module:
        return self.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def cell(seed: int, brightness: float = 1.0, size: int = 24) -> bytes:
    """A grey picture with some structure: bright stripes on noise (unique per seed)."""
    rng = np.random.default_rng(seed)
    pixels = rng.normal(120, 25, (size, size))
    pixels[:, :: 4 + seed % 3] += 60
    image = Image.fromarray(np.clip(pixels * brightness, 0, 255).astype(np.uint8))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def monitored_model(
    path: Path, seed: int = 0, weights_sha256: str | None = None, reference: int = 120, roll: int = 0
) -> Path:
    """Export a tiny model with an embedding output and attach its profile (``reference``
    training and val images each, seeds 10_000+ and 20_000+). ``roll``: the class scores
    moved by that many places, so the model answers another class for every image."""
    torch.manual_seed(seed)
    net = TinySplit().eval()
    if roll:
        with torch.no_grad():
            net.head.weight.copy_(torch.roll(net.head.weight, roll, dims=0))
            net.head.bias.copy_(torch.roll(net.head.bias, roll, dims=0))
    pre = Preprocessing(16, 1, (0.5,), (0.25,))
    weights = weights_sha256 or f"{seed + 1:060d}{roll:04d}"
    meta = {
        "arch": "tiny",
        "class_names": CLASSES,
        "preprocessing": pre.to_dict(),
        "prepare_image_size": None,
        "weights_sha256": weights,
        "mlflow_run_id": f"run-{seed}",
    }
    train = [(cell(10_000 + i), i % 3) for i in range(reference)]
    plain = path.with_suffix(".plain.onnx")
    ox.export_onnx(net, 1, 16, plain, "torchscript", 18, ox.model_metadata(meta, "torchscript", 18))
    classifier = Classifier(plain, provider="cpu")
    x = np.stack([classifier.preprocess(b) for b, _ in train])
    with torch.no_grad():
        features = net.features(torch.from_numpy(x)).double().numpy()
    mean, basis = ox.fit_projection(features, 4)
    model = ox.LineModel(net, 1.0, None, ox.Projection(mean, basis)).eval()
    ox.export_onnx(model, 1, 16, path, "torchscript", 18, ox.model_metadata(meta, "torchscript", 18))
    plain.unlink()
    classifier = Classifier(path, provider="cpu")
    val = [(cell(20_000 + i), i % 3) for i in range(reference)]
    profile = build_profile(classifier, observe(classifier, val), observe(classifier, train), weights)
    attach_profile(path, profile)
    return path
