"""ONNX export of a trained model, the parity check against PyTorch, FP16 and INT8 variants.

The exported file is self-contained (no external data) with a dynamic batch axis, a
pinned opset and the exporter named explicitly (``dynamo``: ``torch.export`` based, the
default of torch 2.x; ``torchscript``: the legacy tracer). Its metadata carries what a
line needs to run it without the training code (see :mod:`synermix.inference`).
No MLflow or DVC here.
"""

from __future__ import annotations

import json
import logging
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from synermix.inference import METADATA_KEY, METADATA_VERSION, Classifier
from synermix.preprocessing import Preprocessing

log = logging.getLogger(__name__)

INPUT_NAME = "image"
OUTPUT_NAME = "logits"
#: second output when the model carries the unknown-part fit: feature distance to the nearest class
DISTANCE_NAME = "distance"


def model_metadata(meta: dict[str, Any], exporter: str, opset: int, **extra: Any) -> dict[str, str]:
    """ONNX ``metadata_props``: one JSON entry that inference reads, plus readable copies."""
    pre = Preprocessing.from_dict(meta["preprocessing"]).to_dict()  # the contract, checked
    description = {
        "format_version": METADATA_VERSION,
        "class_names": list(meta["class_names"]),
        "preprocessing": pre,
        "prepare_image_size": meta.get("prepare_image_size"),
        "arch": meta["arch"],
        "method": meta.get("method"),
        "beta": meta.get("beta"),
        "training_run_id": meta.get("mlflow_run_id", ""),
        "weights_sha256": meta["weights_sha256"],
        "manifest_sha256": meta.get("manifest_sha256", ""),
        "exporter": exporter,
        "opset": opset,
        "input": f"{INPUT_NAME}: float32 N x {pre['channels']} x {pre['image_size']} x {pre['image_size']}",
        "output": f"{OUTPUT_NAME}: N x {len(meta['class_names'])} (softmax gives class probabilities)",
        **extra,
    }
    temperature = extra.get("temperature")
    if temperature is not None and temperature != 1.0:
        description["output"] = (
            f"{OUTPUT_NAME}: N x {len(meta['class_names'])} logits divided by the temperature "
            f"{temperature:.6g} (softmax gives calibrated class probabilities)"
        )
    decision = extra.get("decision") or {}
    if decision.get("unknown_above") is not None:
        description["output"] += (
            f"; {DISTANCE_NAME}: N Mahalanobis distances of the penultimate features to the nearest class "
            f"(above {decision['unknown_above']:.6g}: an unknown part)"
        )
    return {
        METADATA_KEY: json.dumps(description, sort_keys=True),
        "class_names": json.dumps(list(meta["class_names"])),
        "input_size": str(pre["image_size"]),
        "channels": str(pre["channels"]),
        "mean": json.dumps(pre["mean"]),
        "std": json.dumps(pre["std"]),
        "architecture": meta["arch"],
        "training_run_id": str(meta.get("mlflow_run_id", "")),
        "weights_sha256": meta["weights_sha256"],
    }


#: node metadata the dynamo exporter writes that holds this machine's source paths
STACK_TRACE_KEY = "pkg.torch.onnx.stack_trace"


def drop_source_paths(proto: onnx.ModelProto) -> None:
    """Remove the exporter's per-node Python stack traces: they name files on the machine
    that exported (its checkout and venv folders), which a model shipped to a line must not
    carry, and they made the file's sha256 depend on the folder it was exported from."""
    for node in proto.graph.node:
        kept = [p for p in node.metadata_props if p.key != STACK_TRACE_KEY]
        if len(kept) != len(node.metadata_props):
            del node.metadata_props[:]
            node.metadata_props.extend(kept)


def set_metadata(proto: onnx.ModelProto, metadata: dict[str, str]) -> None:
    del proto.metadata_props[:]
    for key, value in sorted(metadata.items()):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value


#: third output when the model carries the monitoring projection: the penultimate features
#: in a fixed low-dimensional projection, what drift monitoring compares (synermix.drift)
EMBEDDING_NAME = "embedding"


class LineModel(torch.nn.Module):
    """What is exported: ``net.classifier(f) / T`` with ``f`` the penultimate features, so the
    graph itself outputs calibrated logits (their softmax is the calibrated probabilities)
    for every consumer of the file; with ``distance`` also the unknown-part distance
    (:mod:`synermix.novelty`) and with ``projection`` the monitoring embedding
    (:class:`Projection`), all from one pass. ``output_names`` lists them in order."""

    def __init__(
        self,
        net: torch.nn.Module,
        temperature: float = 1.0,
        distance: torch.nn.Module | None = None,
        projection: torch.nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.net = net
        self.distance = distance
        self.projection = projection
        self.register_buffer("inverse_temperature", torch.tensor(1.0 / float(temperature)))
        self.output_names = (
            [OUTPUT_NAME]
            + ([DISTANCE_NAME] if distance is not None else [])
            + ([EMBEDDING_NAME] if projection is not None else [])
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        f = self.net.features(x)
        out = [self.net.classifier(f) * self.inverse_temperature]
        if self.distance is not None:
            out.append(self.distance(f))
        if self.projection is not None:
            out.append(self.projection(f))
        return out[0] if len(out) == 1 else tuple(out)


class Projection(torch.nn.Module):
    """Penultimate features (N x D) -> ``(f - mean) @ basis`` (N x k): the top principal
    directions of the training images' features (:func:`fit_projection`)."""

    def __init__(self, mean: np.ndarray, basis: np.ndarray) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32))
        self.register_buffer("basis", torch.tensor(basis, dtype=torch.float32))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return (features - self.mean) @ self.basis


def fit_projection(features: np.ndarray, dims: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean D, basis D x k) of the top ``k = min(dims, D, n - 1)`` principal directions of
    ``features`` (N x D), each direction's sign fixed (largest entry positive) so the same
    features always give the same projection."""
    f = np.asarray(features, dtype=np.float64)
    mean = f.mean(axis=0)
    k = max(1, min(dims, f.shape[1], len(f) - 1))
    _, _, vt = np.linalg.svd(f - mean, full_matrices=False)
    basis = vt[:k].T.copy()
    signs = np.sign(basis[np.abs(basis).argmax(axis=0), np.arange(k)])
    basis *= np.where(signs == 0, 1.0, signs)
    return mean, basis


def named_outputs(model: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The outputs of a model that returns logits or a tuple (see :class:`LineModel`), by name."""
    out = model(x)
    if not isinstance(out, tuple):
        return {OUTPUT_NAME: out}
    names = getattr(model, "output_names", [OUTPUT_NAME, DISTANCE_NAME, EMBEDDING_NAME])
    return dict(zip(names, out, strict=False))


def export_onnx(
    model: torch.nn.Module,
    channels: int,
    image_size: int,
    path: Path,
    exporter: str,
    opset: int,
    metadata: dict[str, str],
) -> onnx.ModelProto:
    """Write ``model`` to ``path`` as one ONNX file with a dynamic batch axis; check it.
    A :class:`LineModel` gets the outputs its ``output_names`` lists (logits first)."""
    model = model.cpu().eval()
    example = torch.zeros(2, channels, image_size, image_size)
    with torch.no_grad():
        outputs = list(named_outputs(model, example))
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "model.onnx"
        if exporter == "dynamo":
            torch.onnx.export(
                model,
                (example,),
                str(raw),
                dynamo=True,
                opset_version=opset,
                external_data=False,
                dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=65536)}},
                input_names=[INPUT_NAME],
                output_names=outputs,
                verbose=False,
            )
        elif exporter == "torchscript":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "legacy exporter" notices: chosen on purpose
                torch.onnx.export(
                    model,
                    (example,),
                    str(raw),
                    dynamo=False,
                    opset_version=opset,
                    input_names=[INPUT_NAME],
                    output_names=outputs,
                    dynamic_axes={INPUT_NAME: {0: "batch"}, **{name: {0: "batch"} for name in outputs}},
                )
        else:
            raise ValueError(f"unknown exporter {exporter!r}")
        proto = onnx.load(str(raw))
    drop_source_paths(proto)
    set_metadata(proto, metadata)
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(path), save_as_external_data=False)
    log.info(
        "exported %s with the %s exporter, opset %d: %s", metadata.get("architecture"), exporter, opset, path
    )
    return proto


@dataclass(frozen=True)
class Parity:
    images: int
    max_abs_diff: float
    mean_abs_diff: float
    top1_agreement: float
    preprocessing_max_abs_diff: float
    #: the unknown-part distance: largest |difference| / max(1, distance); None without one
    distance_max_rel_diff: float | None = None
    #: the monitoring embedding: largest |difference| / max(1, |value|); None without one
    embedding_max_rel_diff: float | None = None

    def passed(self, tolerance: float) -> bool:
        """Logits within ``tolerance``, every top-1 equal, the distance within ``tolerance``
        (relative), and the production input within ``tolerance`` of training's (a
        preprocessing drift fails too)."""
        return (
            self.max_abs_diff <= tolerance
            and self.top1_agreement == 1.0
            and self.preprocessing_max_abs_diff <= tolerance
            and (self.distance_max_rel_diff is None or self.distance_max_rel_diff <= tolerance)
            and (self.embedding_max_rel_diff is None or self.embedding_max_rel_diff <= tolerance)
        )

    def to_dict(self) -> dict[str, float | None]:
        return {
            "images": self.images,
            "max_abs_diff": self.max_abs_diff,
            "mean_abs_diff": self.mean_abs_diff,
            "top1_agreement": self.top1_agreement,
            "preprocessing_max_abs_diff": self.preprocessing_max_abs_diff,
            "distance_max_rel_diff": self.distance_max_rel_diff,
            "embedding_max_rel_diff": self.embedding_max_rel_diff,
        }


@torch.no_grad()
def check_parity(
    model: torch.nn.Module,
    classifier: Classifier,
    files: Sequence[Path],
    training_view: Sequence[torch.Tensor],
    batch_size: int = 64,
) -> Parity:
    """PyTorch (fp32, CPU) against onnxruntime on real images, from their file bytes.

    Each file goes through the production preprocessing of :mod:`synermix.inference`; the
    same input feeds both runtimes (logit difference and top-1 agreement). The production
    input is also compared with ``training_view``, what training made of the same files,
    so a drift between the two preprocessing paths shows up too.
    """
    model = model.cpu().eval()
    inputs = np.stack([classifier.preprocess(Path(f).read_bytes()) for f in files])
    pre_diff = float(
        max((np.abs(inputs[i] - t.numpy()).max() for i, t in enumerate(training_view)), default=0.0)
    )
    diffs, agree = [], 0
    relative: dict[str, list[np.ndarray]] = {DISTANCE_NAME: [], EMBEDDING_NAME: []}
    for start in range(0, len(inputs), batch_size):
        batch = inputs[start : start + batch_size]
        expected = {k: v.double().numpy() for k, v in named_outputs(model, torch.from_numpy(batch)).items()}
        got = dict(
            zip((OUTPUT_NAME, DISTANCE_NAME, EMBEDDING_NAME), classifier.all_outputs(batch), strict=True)
        )
        diffs.append(np.abs(got[OUTPUT_NAME] - expected[OUTPUT_NAME]))
        agree += int((got[OUTPUT_NAME].argmax(1) == expected[OUTPUT_NAME].argmax(1)).sum())
        for name, rows in relative.items():
            if (expected.get(name) is None) != (got[name] is None):
                raise ValueError(f"the ONNX model and the PyTorch model disagree on having a {name} output")
            if got[name] is not None:
                ref = expected[name]
                rows.append((np.abs(got[name] - ref) / np.maximum(1.0, np.abs(ref))).reshape(-1))
    diff = np.concatenate(diffs) if diffs else np.zeros((0, 1))

    def largest(name: str) -> float | None:
        rows = relative[name]
        if not rows:
            return None
        values = np.concatenate(rows)
        return float(values.max()) if values.size else 0.0

    return Parity(
        images=len(inputs),
        max_abs_diff=float(diff.max()) if diff.size else 0.0,
        mean_abs_diff=float(diff.mean()) if diff.size else 0.0,
        top1_agreement=agree / max(len(inputs), 1),
        preprocessing_max_abs_diff=pre_diff,
        distance_max_rel_diff=largest(DISTANCE_NAME),
        embedding_max_rel_diff=largest(EMBEDDING_NAME),
    )


def convert_fp16(src: Path, dst: Path) -> None:
    """Weights and activations in float16, inputs and outputs kept float32 (for GPU lines)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    proto = onnx.load(str(src))
    metadata = {p.key: p.value for p in proto.metadata_props}
    graph = OnnxModel(convert_float_to_float16(proto, keep_io_types=True))
    graph.topological_sort()  # the converter appends its input casts after their users
    half = graph.model
    set_metadata(half, {**metadata, "precision": "fp16"})
    onnx.checker.check_model(half)
    onnx.save(half, str(dst), save_as_external_data=False)


class _Calibration:
    """onnxruntime's CalibrationDataReader over preprocessed training images."""

    def __init__(self, batches: Sequence[np.ndarray]) -> None:
        self.batches = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self.batches, None)
        return None if batch is None else {INPUT_NAME: batch}


def quantize_int8(src: Path, dst: Path, calibration: np.ndarray, batch_size: int = 32) -> None:
    """Static INT8 (QDQ, per-channel weights) calibrated on ``calibration`` (N x C x H x W)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    metadata = {p.key: p.value for p in onnx.load(str(src)).metadata_props}
    batches = [calibration[i : i + batch_size] for i in range(0, len(calibration), batch_size)]
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared),
            str(dst),
            _Calibration(batches),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )
    proto = onnx.load(str(dst))
    set_metadata(proto, {**metadata, "precision": "int8"})
    onnx.save(proto, str(dst), save_as_external_data=False)


def batched_outputs(
    classifier: Classifier, inputs: np.ndarray, batch_size: int = 64
) -> tuple[np.ndarray, np.ndarray | None]:
    """(logits, distance or None) of an ONNX model on preprocessed inputs, in batches."""
    logits, distances = [], []
    for start in range(0, len(inputs), batch_size):
        z, d = classifier.outputs(inputs[start : start + batch_size])
        logits.append(z)
        if d is not None:
            distances.append(d)
    k = len(classifier.class_names)
    return (
        np.concatenate(logits) if logits else np.zeros((0, k)),
        np.concatenate(distances) if distances else None,
    )


def accuracy_of(logits: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of ``logits`` against class indices."""
    return int((logits.argmax(1) == labels).sum()) / max(len(labels), 1)


def accuracy(classifier: Classifier, inputs: np.ndarray, labels: np.ndarray, batch_size: int = 64) -> float:
    """Top-1 accuracy of an ONNX model on preprocessed inputs."""
    return accuracy_of(batched_outputs(classifier, inputs, batch_size)[0], labels)
