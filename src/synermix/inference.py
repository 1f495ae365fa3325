"""Running an exported model with onnxruntime: self-describing, provider-checked, batched.

Everything needed to run a model comes from the ONNX file: class names and the
production preprocessing are in its metadata (written by :mod:`synermix.onnx_export`),
so a line machine needs this module, numpy, Pillow and onnxruntime, not torch or the
training code. Preprocessing from file bytes: safe decode with a decompression-bomb guard,
EXIF orientation, canonical grey/RGB (as ``prepare``), the prepare-time resize when the
model was trained on resized images, then the model's own resize, centre crop and
normalisation (:func:`synermix.data.images.fit_square`, shared with training).

Provider choice is checked after the session exists: onnxruntime-gpu lists CUDA as
*available* even on a machine without a GPU and then silently runs on CPU, so the
provider really used is read back from ``session.get_providers()``, logged, and a
fall-back from a requested GPU provider is reported as a warning.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from synermix import decision as dc
from synermix.choices import MAX_PIXELS, PROVIDERS
from synermix.data.images import IMAGE_EXTENSIONS, Reserve, fit_square, inspect_image, resize_shorter_side
from synermix.metrics import softmax
from synermix.preprocessing import RESIZE_POLICY, Preprocessing

log = logging.getLogger(__name__)

#: metadata key holding the JSON description of the model (see onnx_export.model_metadata)
METADATA_KEY = "synermix"
METADATA_VERSION = 1
#: default decompression-bomb guard for images sent to a model (as data.max_pixels)
DEFAULT_MAX_PIXELS = MAX_PIXELS

_PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}
PROVIDER_CHOICES = PROVIDERS  # "auto" and the keys above


class BadImage(ValueError):
    """An input image that cannot be scored; ``str()`` is the reason."""


@dataclass(frozen=True)
class ModelInfo:
    """What an ONNX file says about itself."""

    class_names: list[str]
    preprocessing: Preprocessing
    prepare_image_size: int | None
    extra: dict[str, Any] = field(default_factory=dict)
    #: the line's decision stored with the model (None: class labels only / no unknown check)
    operating_point: dc.OperatingPoint | None = None
    unknown_above: float | None = None

    # the contract's fields, read through (bundle, serve and the tests use them)
    image_size = property(lambda self: self.preprocessing.image_size)
    channels = property(lambda self: self.preprocessing.channels)
    mean = property(lambda self: self.preprocessing.mean)
    std = property(lambda self: self.preprocessing.std)
    resize = property(lambda self: self.preprocessing.resize)

    @classmethod
    def from_metadata(cls, custom: dict[str, str]) -> ModelInfo:
        if METADATA_KEY not in custom:
            raise ValueError(
                f"the model has no '{METADATA_KEY}' metadata: export it with the export stage "
                "(dvc repro) so it carries its class names and preprocessing"
            )
        try:
            data = json.loads(custom[METADATA_KEY])
        except (json.JSONDecodeError, RecursionError) as exc:
            raise ValueError(f"the model's '{METADATA_KEY}' metadata is not JSON ({exc})") from None
        if not isinstance(data, dict):
            raise ValueError(f"the model's '{METADATA_KEY}' metadata is not a JSON object")
        if data.get("format_version") != METADATA_VERSION:
            raise ValueError(
                f"model metadata version {data.get('format_version')} (this code reads {METADATA_VERSION})"
            )
        try:
            names = data["class_names"]
            if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
                raise ValueError("class_names must be a list of class names")
            size = data.get("prepare_image_size")
            if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 1):
                raise ValueError(f"prepare_image_size {size!r} is not a size in pixels")
            preprocessing = Preprocessing.from_dict(data["preprocessing"])
            decision = data.get("decision") or {}
            if not isinstance(decision, dict):
                raise ValueError("decision is not a JSON object")
            point = decision.get("operating_point")
            point = None if point is None else dc.OperatingPoint.from_dict(point, names)
            unknown_above = dc.check_unknown_above(decision.get("unknown_above"))
        except (KeyError, TypeError, ValueError) as exc:
            what = f"no {exc}" if isinstance(exc, KeyError) else str(exc)
            raise ValueError(f"the model's '{METADATA_KEY}' metadata is malformed: {what}") from None
        return cls(
            class_names=list(names),
            preprocessing=preprocessing,
            prepare_image_size=size,
            extra={k: v for k, v in data.items() if k not in ("class_names", "preprocessing")},
            operating_point=point,
            unknown_above=unknown_above,
        )


class Preprocessor:
    """File bytes -> the model's normalised float32 ``C x H x W`` input."""

    def __init__(
        self, info: ModelInfo, max_pixels: int = DEFAULT_MAX_PIXELS, reserve: Reserve | None = None
    ) -> None:
        if info.resize != RESIZE_POLICY:
            raise ValueError(f"unknown resize policy {info.resize!r} in the model metadata")
        self.info = info
        self.max_pixels = max_pixels
        #: held while an image decodes (the service's memory budget); None: no bound
        self.reserve = reserve
        self.mean = np.asarray(info.mean, dtype=np.float32).reshape(-1, 1, 1)
        self.std = np.asarray(info.std, dtype=np.float32).reshape(-1, 1, 1)

    def pixels(self, data: bytes) -> np.ndarray:
        """uint8 ``H x W x C`` pixels the model sees (before normalisation)."""
        return self._decode(data)[0]

    def _decode(self, data: bytes) -> tuple[np.ndarray, int, int]:
        # a prediction needs the pixels only: no statistics or pixel hash (manifest fields)
        decoded = inspect_image(data, self.max_pixels, describe=False, reserve=self.reserve)
        if not decoded.decodable or decoded.image is None:
            raise BadImage(decoded.error)
        image = decoded.image
        width, height = image.size
        if self.info.prepare_image_size:
            image = resize_shorter_side(image, int(self.info.prepare_image_size))
        return fit_square(image, self.info.image_size, self.info.channels), width, height

    def normalise(self, pixels: np.ndarray) -> np.ndarray:
        chw = pixels.transpose(2, 0, 1).astype(np.float32)
        return (chw / np.float32(255.0) - self.mean) / self.std

    def __call__(self, data: bytes) -> np.ndarray:
        return self.normalise(self.pixels(data))

    def with_statistics(self, data: bytes) -> tuple[np.ndarray, dict[str, float]]:
        """The model input and the image's drift statistics (:func:`synermix.drift.image_statistics`:
        of the pixels the model sees, and the decoded width and height)."""
        from synermix.drift import image_statistics

        pixels, width, height = self._decode(data)
        return self.normalise(pixels), image_statistics(pixels, width, height)


def _gpu_present() -> bool:
    """An NVIDIA device node exists (Linux), so CUDA is worth asking for."""
    import glob

    return bool(glob.glob("/dev/nvidia[0-9]*"))


def make_session(
    path: str | Path, provider: str = "auto", threads: int | None = None, spin: bool = True
) -> tuple[Any, str]:
    """An onnxruntime session and the provider it really runs on.

    ``spin=False`` stops onnxruntime's worker threads busy-waiting between runs: a service
    shares its cores with request decoding, which spinning threads would starve.

    ``auto`` asks for CUDA when this build offers it and a GPU is present, else CPU; ``cuda`` and
    ``tensorrt`` ask for those first (TensorRT only when asked: it builds engines at start).
    A GPU provider that was asked for but not taken is logged as a warning (the session
    still works, on CPU).
    """
    import onnxruntime as ort

    if provider not in PROVIDER_CHOICES:
        raise ValueError(f"provider must be one of {', '.join(PROVIDER_CHOICES)}, not {provider!r}")
    available = ort.get_available_providers()
    if provider == "auto":
        # onnxruntime-gpu offers CUDA on any machine; without a GPU, asking only prints errors
        wanted = _PROVIDERS["cuda"] if _gpu_present() else _PROVIDERS["cpu"]
    else:
        wanted = _PROVIDERS[provider]
    asked = [p for p in wanted if p in available] or ["CPUExecutionProvider"]
    options = ort.SessionOptions()
    options.log_severity_level = 3  # onnxruntime's own provider warnings: we report the outcome
    if threads:
        options.intra_op_num_threads = threads
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), sess_options=options, providers=asked)
    used = session.get_providers()[0]
    if used != asked[0]:
        log.warning(
            "asked onnxruntime for %s but the session runs on %s (no usable GPU, or missing CUDA/TensorRT "
            "libraries)",
            asked[0],
            used,
        )
    if provider in ("cuda", "tensorrt") and asked[0] == "CPUExecutionProvider":
        log.warning(
            "%s was asked for, but this onnxruntime build offers only %s", provider, ", ".join(available)
        )
    log.info("onnxruntime %s on %s (%s)", ort.__version__, used, Path(path).name)
    return session, used


@dataclass(frozen=True)
class Prediction:
    """One image's result: ``status`` ok | abstain | error; ``decision`` accept | reject |
    review | unknown (the model's stored operating point; "" when it has none)."""

    path: str
    status: str
    label: str = ""
    confidence: float = math.nan
    scores: dict[str, float] = field(default_factory=dict)
    error: str = ""
    decision: str = ""
    #: feature distance to the nearest class (nan: the model has no distance output)
    distance: float = math.nan

    def to_row(self, class_names: Sequence[str]) -> dict[str, Any]:
        row: dict[str, Any] = {
            "path": self.path,
            "status": self.status,
            "decision": self.decision,
            "class": self.label,
            "confidence": None if math.isnan(self.confidence) else round(self.confidence, 6),
            "distance": None if math.isnan(self.distance) else round(self.distance, 6),
        }
        for name in class_names:
            value = self.scores.get(name)
            row[f"score_{name}"] = None if value is None else round(value, 6)
        row["error"] = self.error
        return row


class Classifier:
    """An exported model, ready to score images."""

    def __init__(
        self,
        path: str | Path,
        provider: str = "auto",
        max_pixels: int = DEFAULT_MAX_PIXELS,
        threads: int | None = None,
        spin: bool = True,
    ) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such model file")
        self.session, self.provider = make_session(self.path, provider, threads, spin)
        self.info = ModelInfo.from_metadata(self.session.get_modelmeta().custom_metadata_map)
        self.preprocess = Preprocessor(self.info, max_pixels)
        self.input_name = self.session.get_inputs()[0].name
        self.input_type = self.session.get_inputs()[0].type  # tensor(float) or tensor(float16)
        outputs = [o.name for o in self.session.get_outputs()]
        self.output_names = [outputs[0]] + (["distance"] if "distance" in outputs[1:] else [])
        #: the monitoring embedding output (synermix.drift), when the graph has one
        self.embedding_name = "embedding" if "embedding" in outputs[1:] else None
        if self.info.unknown_above is not None and len(self.output_names) < 2:
            raise ValueError(
                f"{self.path.name}: its metadata sets an unknown-part threshold but the graph has no "
                "'distance' output: export it again (dvc repro)"
            )
        self.smoke_test()

    def smoke_test(self) -> None:
        """Run one synthetic input of the shape the metadata declares; ValueError when the
        graph cannot take it or does not answer one score per class (a model that loads
        but cannot run, e.g. metadata saying 32 px for a 64 px graph)."""
        info = self.info
        x = np.zeros((1, info.channels, info.image_size, info.image_size), dtype=np.float32)
        try:
            out, distance = self.outputs(x)
        except Exception as exc:  # onnxruntime raises its own exception types
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ValueError(
                f"{self.path.name}: the model does not run on the input its metadata declares "
                f"({info.channels}x{info.image_size}x{info.image_size}): {reason}"
            ) from None
        if out.shape != (1, len(info.class_names)) or not np.isfinite(out).all():
            raise ValueError(
                f"{self.path.name}: the model answers shape {list(out.shape)} (finite: "
                f"{bool(np.isfinite(out).all())}) for one image, not one finite score for each of its "
                f"{len(info.class_names)} classes"
            )
        if distance is not None and distance.shape != (1,):
            raise ValueError(
                f"{self.path.name}: its distance output has shape {list(distance.shape)} "
                "for one image, not [1]"
            )

    @property
    def class_names(self) -> list[str]:
        return self.info.class_names

    def outputs(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(logits ``N x K``, distance ``N`` or None) for a float32 ``N x C x H x W`` batch."""
        if self.input_type == "tensor(float16)":
            batch = batch.astype(np.float16)
        out = self.session.run(self.output_names, {self.input_name: batch})
        logits = np.asarray(out[0], dtype=np.float64)
        return logits, (np.asarray(out[1], dtype=np.float64) if len(out) > 1 else None)

    def all_outputs(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """(logits ``N x K``, distance ``N`` or None, embedding ``N x k`` or None) from one run."""
        if self.embedding_name is None:
            return (*self.outputs(batch), None)
        if self.input_type == "tensor(float16)":
            batch = batch.astype(np.float16)
        out = self.session.run([*self.output_names, self.embedding_name], {self.input_name: batch})
        logits = np.asarray(out[0], dtype=np.float64)
        distance = np.asarray(out[1], dtype=np.float64) if len(out) > 2 else None
        return logits, distance, np.asarray(out[-1], dtype=np.float64)

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """Model outputs (calibrated logits) for a float32 ``N x C x H x W`` batch."""
        return self.outputs(batch)[0]

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        return softmax(self.logits(batch))

    def decisions(self, probabilities: np.ndarray, distances: np.ndarray | None) -> list[str]:
        """The stored decision per image (:func:`synermix.decision.decide`)."""
        return dc.decide(self.info.operating_point, self.info.unknown_above, probabilities, distances)

    def result(
        self,
        name: str,
        probabilities: np.ndarray,
        abstain_below: float = 0.0,
        distance: float = math.nan,
        decision: str | None = None,
    ) -> Prediction:
        """One image's :class:`Prediction` from its class probabilities (and distance)."""
        top = int(probabilities.argmax())
        status = "abstain" if probabilities[top] < abstain_below else "ok"
        scores = {c: float(v) for c, v in zip(self.class_names, probabilities, strict=True)}
        if decision is None:
            d = None if math.isnan(distance) else np.array([distance])
            decision = self.decisions(probabilities[None, :], d)[0]
        return Prediction(
            name,
            status,
            self.class_names[top],
            float(probabilities[top]),
            scores,
            "",
            decision,
            float(distance),
        )

    def predict(
        self, items: Iterable[tuple[str, bytes | str]], batch_size: int = 32, abstain_below: float = 0.0
    ) -> list[Prediction]:
        """Score ``(name, file bytes)`` pairs in batches; a bad file becomes an error row.

        ``abstain_below``: a top-class probability under this marks the image ``abstain``
        (for manual inspection) while still reporting its scores. A ``str`` in place of the
        bytes is the reason the file could not be read.
        """
        results: list[Prediction] = []
        pending: list[tuple[int, str, np.ndarray]] = []

        def flush() -> None:
            if not pending:
                return
            logits, distances = self.outputs(np.stack([x for _, _, x in pending]))
            probs = softmax(logits)
            decisions = self.decisions(probs, distances)
            for i, ((slot, name, _), p) in enumerate(zip(pending, probs, strict=True)):
                distance = math.nan if distances is None else float(distances[i])
                results[slot] = self.result(name, p, abstain_below, distance, decisions[i])
            pending.clear()

        for name, data in items:
            results.append(Prediction(name, "error"))
            if isinstance(data, str):
                results[-1] = Prediction(name, "error", error=data)
                continue
            try:
                pending.append((len(results) - 1, name, self.preprocess(data)))
            except BadImage as exc:
                results[-1] = Prediction(name, "error", error=str(exc))
                continue
            if len(pending) >= batch_size:
                flush()
        flush()
        return results


def image_files(paths: Sequence[str | Path]) -> list[Path]:
    """Files given, and image files (by extension) under folders given, in a stable order.
    Entries under a folder that are not regular files (a FIFO, a dangling link) are kept,
    so that they become error rows rather than vanish."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found.extend(
                sorted(p for p in path.rglob("*") if not p.is_dir() and p.suffix.lower() in IMAGE_EXTENSIONS)
            )
        else:
            found.append(path)
    return found


#: a file larger than this is not an inspection photo (and is not read into memory)
MAX_FILE_BYTES = 256 * 2**20


def read_files(paths: Iterable[Path]) -> Iterable[tuple[str, bytes | str]]:
    """``(path, bytes)``, or ``(path, reason)`` for a file that cannot be read. Only regular
    files are opened: a FIFO would block the reader, a device never end."""
    import stat

    for path in paths:
        try:
            info = path.stat()
        except FileNotFoundError:
            reason = "a link to nothing (dangling)" if path.is_symlink() else "no such file"
            yield str(path), f"cannot read the file: {reason}"
            continue
        except OSError as exc:
            yield str(path), f"cannot read the file: {exc.strerror or exc}"
            continue
        if not stat.S_ISREG(info.st_mode):
            kind = "a FIFO" if stat.S_ISFIFO(info.st_mode) else "not a regular file"
            yield str(path), f"cannot read the file: {kind}"
            continue
        if info.st_size > MAX_FILE_BYTES:
            yield (
                str(path),
                f"cannot read the file: {info.st_size} bytes is over {MAX_FILE_BYTES} (not a photo)",
            )
            continue
        try:
            yield str(path), path.read_bytes()
        except OSError as exc:
            yield str(path), f"cannot read the file: {exc.strerror or exc}"
