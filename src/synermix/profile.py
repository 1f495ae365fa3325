"""The reference profile: what the model saw before the line, stored inside the model file.

The export stage runs the exported ONNX model (the same runtime and preprocessing as the
line) over the val and training images and keeps:

- **per image, the reference samples** drift tests compare a window with (see
  :mod:`synermix.drift`): the image statistics of the training *and* val images, and the
  embedding (the graph's ``embedding`` output: penultimate features in a fixed
  projection), predicted class and decision of the val images;
- **train, summarised**: image-statistic quantiles, the prediction mix, per-class
  centroids and spread of the embeddings (by label);
- the Gaussian kernel bandwidth for the MMD test (median pairwise distance of the val
  embeddings), and the model's ``weights_sha256``, so a profile is never used with
  another model's records.

Why two reference samples: an image statistic does not depend on the network, so all
training and val images describe what the camera gave (ELPV's cells come in modules, and
393 val images alone differ from the test split in sharpness more than chance would: a
reference that small raised false alarms on unchanged test windows). The network's
outputs do depend on it: it has fitted its training images, whose features sit closer to
the centroids than any new image's would, so only val images are the reference there.

The profile is canonical JSON with its own sha256, written into the ONNX file's metadata
(key ``synermix_profile``): it travels with every copy of the model (bundle, MLflow
registry, FP16 / INT8 variants), and the file's checksum covers it. A readable copy is
``models/onnx/profile.json``.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from synermix.drift import IMAGE_STATISTICS, median_bandwidth
from synermix.paths import EXPORT_DIR

#: ONNX metadata key of the profile
PROFILE_KEY = "synermix_profile"
PROFILE_VERSION = 1
#: the readable copy the export stage writes beside the model
PROFILE_JSON = EXPORT_DIR / "profile.json"


@dataclass(frozen=True)
class ReferenceProfile:
    """The reference sample (val) and the training summary of one model."""

    weights_sha256: str
    class_names: list[str]
    statistics: dict[str, np.ndarray]  # name -> one value per training and val image
    embeddings: np.ndarray  # n x k
    predicted: np.ndarray  # n class indices
    decisions: dict[str, int]
    bandwidth: float
    train: dict[str, Any] = field(default_factory=dict)

    @property
    def images(self) -> int:
        """Val images: the reference of the embeddings and the prediction mix."""
        return len(self.predicted)

    @property
    def statistics_images(self) -> int:
        """Training and val images: the reference of the image statistics."""
        return len(self.statistics["mean"])

    @property
    def prediction_counts(self) -> np.ndarray:
        return np.bincount(self.predicted, minlength=len(self.class_names))

    def to_dict(self) -> dict[str, Any]:
        body = {
            "format_version": PROFILE_VERSION,
            "weights_sha256": self.weights_sha256,
            "class_names": list(self.class_names),
            "statistics": {k: _rounded(v) for k, v in self.statistics.items()},
            "val": {
                "images": self.images,
                "embeddings": [_rounded(row) for row in self.embeddings],
                "predicted": [int(c) for c in self.predicted],
                "decisions": dict(sorted(self.decisions.items())),
            },
            "bandwidth": round(float(self.bandwidth), 8),
            "train": self.train,
        }
        return {**body, "sha256": _digest(body)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: Any, where: str) -> ReferenceProfile:
        if not isinstance(data, dict):
            raise ValueError(f"{where}: the profile is not a JSON object")
        if data.get("format_version") != PROFILE_VERSION:
            raise ValueError(
                f"{where}: profile format {data.get('format_version')!r} (this code reads {PROFILE_VERSION})"
            )
        body = {k: v for k, v in data.items() if k != "sha256"}
        if data.get("sha256") != _digest(body):
            raise ValueError(f"{where}: the profile's sha256 does not match its content (edited or damaged)")
        try:
            val = data["val"]
            names = list(data["class_names"])
            embeddings = np.asarray(val["embeddings"], dtype=np.float64)
            predicted = np.asarray(val["predicted"], dtype=np.int64)
            statistics = {k: np.asarray(data["statistics"][k], dtype=np.float64) for k in IMAGE_STATISTICS}
            if embeddings.ndim != 2 or len(embeddings) != len(predicted):
                raise ValueError("embeddings and predictions differ in length")
            if len({len(v) for v in statistics.values()}) != 1 or not len(statistics["mean"]):
                raise ValueError("the image statistics differ in length or are empty")
            return cls(
                weights_sha256=str(data["weights_sha256"]),
                class_names=names,
                statistics=statistics,
                embeddings=embeddings,
                predicted=predicted,
                decisions={str(k): int(v) for k, v in val["decisions"].items()},
                bandwidth=float(data["bandwidth"]),
                train=dict(data.get("train") or {}),
            )
        except (KeyError, TypeError, ValueError) as exc:
            what = f"no {exc}" if isinstance(exc, KeyError) else str(exc)
            raise ValueError(f"{where}: the profile is malformed: {what}") from None


def _rounded(values: Iterable[float], digits: int = 6) -> list[float]:
    return [float(f"{float(v):.{digits}g}") for v in values]


def _digest(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@dataclass
class Observed:
    """What a model made of a set of images: per image statistics, embedding, class, decision."""

    statistics: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in IMAGE_STATISTICS})
    embeddings: list[np.ndarray] = field(default_factory=list)
    predicted: list[int] = field(default_factory=list)
    decisions: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)


def observe(classifier, files: Iterable[tuple[bytes, int]], batch_size: int = 64) -> Observed:
    """Run ``classifier`` (:class:`synermix.inference.Classifier` with an embedding output)
    over ``(file bytes, label index)`` pairs, as the service would."""
    from synermix.metrics import softmax

    if classifier.embedding_name is None:
        raise ValueError("the model has no embedding output: export it again (dvc repro)")
    seen = Observed()
    pending: list[np.ndarray] = []

    def flush() -> None:
        if not pending:
            return
        logits, distances, embeddings = classifier.all_outputs(np.stack(pending))
        probabilities = softmax(logits)
        seen.embeddings.extend(embeddings)
        seen.predicted.extend(int(c) for c in probabilities.argmax(1))
        seen.decisions.extend(classifier.decisions(probabilities, distances))
        pending.clear()

    for data, label in files:
        x, stats = classifier.preprocess.with_statistics(data)
        for k in IMAGE_STATISTICS:
            seen.statistics[k].append(stats[k])
        seen.labels.append(int(label))
        pending.append(x)
        if len(pending) >= batch_size:
            flush()
    flush()
    return seen


def build_profile(classifier, val: Observed, train: Observed, weights_sha256: str) -> ReferenceProfile:
    """The profile of a model from what it made of the val and training images."""
    names = classifier.class_names
    if not val.predicted:
        raise ValueError("no val images to build the reference profile from")
    embeddings = np.stack(val.embeddings)
    decisions: dict[str, int] = {}
    for d in val.decisions:
        decisions[d or "none"] = decisions.get(d or "none", 0) + 1
    return ReferenceProfile(
        weights_sha256=weights_sha256,
        class_names=list(names),
        statistics={k: np.asarray(train.statistics[k] + val.statistics[k]) for k in IMAGE_STATISTICS},
        embeddings=embeddings,
        predicted=np.asarray(val.predicted, dtype=np.int64),
        decisions=decisions,
        bandwidth=median_bandwidth(embeddings),
        train=_train_summary(train, names),
    )


def _train_summary(train: Observed, names: list[str]) -> dict[str, Any]:
    if not train.predicted:
        return {"images": 0}
    embeddings = np.stack(train.embeddings)
    labels = np.asarray(train.labels)
    classes = {}
    for c, name in enumerate(names):
        rows = embeddings[labels == c]
        if len(rows):
            centroid = rows.mean(0)
            classes[name] = {
                "images": len(rows),
                "centroid": _rounded(centroid),
                "spread": float(f"{math.sqrt(((rows - centroid) ** 2).sum(1).mean()):.6g}"),
            }
    predicted = np.bincount(np.asarray(train.predicted), minlength=len(names))
    return {
        "images": len(train.predicted),
        "statistics": {
            k: dict(zip(("p05", "p50", "p95"), _rounded(np.quantile(v, [0.05, 0.5, 0.95])), strict=True))
            for k, v in train.statistics.items()
        },
        "prediction_mix": {n: int(v) for n, v in zip(names, predicted, strict=True)},
        "classes": classes,
    }


def attach_profile(path: Path, profile: ReferenceProfile) -> None:
    """Write ``profile`` into the ONNX file's metadata (replaced atomically)."""
    import os
    import tempfile

    import onnx

    proto = onnx.load(str(path))
    kept = [p for p in proto.metadata_props if p.key != PROFILE_KEY]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    entry = proto.metadata_props.add()
    entry.key, entry.value = PROFILE_KEY, profile.to_json()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        onnx.save(proto, tmp, save_as_external_data=False)
        os.chmod(tmp, path.stat().st_mode & 0o777)  # mkstemp's 0600 would hide the model from a service user
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def profile_of(path: Path) -> ReferenceProfile:
    """The profile inside an ONNX file (or a bundle folder's model.onnx, or a profile.json);
    ValueError (one line) when there is none or it is damaged."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.onnx"
    if path.suffix == ".json":
        try:
            return ReferenceProfile.from_dict(json.loads(path.read_text()), str(path))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path}: not a readable profile ({exc})") from None
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and others for a file that is not a model
        raise ValueError(f"{path}: not an ONNX model ({type(exc).__name__})") from None
    return profile_from_metadata({p.key: p.value for p in proto.metadata_props}, str(path))


def profile_from_metadata(custom: dict[str, str], where: str) -> ReferenceProfile:
    """The profile in an ONNX model's metadata map (onnxruntime's ``custom_metadata_map``)."""
    if PROFILE_KEY not in custom:
        raise ValueError(
            f"{where}: the model carries no reference profile: export it again with this version (dvc repro)"
        )
    try:
        data = json.loads(custom[PROFILE_KEY])
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where}: its profile is not JSON ({exc})") from None
    return ReferenceProfile.from_dict(data, where)
