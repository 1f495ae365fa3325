"""Scoring a trained model on a split: logits and penultimate features -> a metrics report.

:func:`score_model` runs the model (fp32, eval mode) over manifest rows through the
production preprocessing recorded with the model; :func:`split_report` turns the scores
into the numbers of :mod:`synermix.metrics`. No MLflow or DVC here: the evaluate stage
and the champion comparison both call these.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from synermix import metrics as m
from synermix.data.datasets import InspectionImages
from synermix.data.transforms import Preprocessing
from synermix.engine import select_device
from synermix.models import SplitNet

log = logging.getLogger(__name__)


@dataclass
class Scores:
    """A model's outputs on one split, one row per image (in manifest order)."""

    paths: list[str]
    labels: np.ndarray  # true class index
    logits: np.ndarray  # n x K, float64
    features: np.ndarray  # n x d penultimate features, float64

    @property
    def probabilities(self) -> np.ndarray:
        return m.softmax(self.logits)

    def scaled(self, temperature: float) -> Scores:
        """The same scores with logits divided by ``temperature`` (temperature scaling)."""
        return Scores(self.paths, self.labels, self.logits / float(temperature), self.features)

    @property
    def predictions(self) -> np.ndarray:
        return self.logits.argmax(axis=1)

    @property
    def correct(self) -> np.ndarray:
        return self.predictions == self.labels


@torch.no_grad()
def score_model(
    model: SplitNet,
    preprocessing: Preprocessing,
    rows: pd.DataFrame,
    image_root: Path,
    class_names: Sequence[str],
    batch_size: int = 256,
    device: str = "auto",
    desc: str = "score",
) -> Scores:
    """Logits and penultimate features of ``model`` on ``rows`` (labels in ``class_names``).

    Always fp32 (no autocast, no TF32), so CPU and GPU give the same metrics up to float
    rounding.
    """
    setup = select_device(device, amp=False, channels_last=False, purpose="evaluation")
    if setup.device.type == "cuda":  # TF32 would round convolutions; evaluation is full fp32
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    images = InspectionImages(
        rows,
        image_root,
        class_names,
        preprocessing,
        image_size=preprocessing.image_size,
        channels=preprocessing.channels,
        cache=False,
    )
    loader = DataLoader(images, batch_size=batch_size, shuffle=False)
    model = model.to(setup.device).eval()
    logits, features = [], []
    from tqdm import tqdm

    for x, _ in tqdm(loader, desc=desc, unit="batch", disable=None, leave=False):
        f = model.features(setup.to_device(x))
        logits.append(model.classifier(f).double().cpu())
        features.append(f.double().cpu())
    num_classes = len(class_names)
    return Scores(
        paths=[str(p) for p in rows["path"]],
        labels=np.asarray(images.labels, dtype=np.int64),
        logits=torch.cat(logits).numpy() if logits else np.zeros((0, num_classes)),
        features=torch.cat(features).numpy() if features else np.zeros((0, model.feature_dim)),
    )


def split_report(scores: Scores, class_names: Sequence[str], calibration_bins: int = 15) -> dict[str, Any]:
    """Every metric of one split: headline numbers, per class, confusion, calibration, geometry."""
    k = len(class_names)
    confusion = m.confusion_matrix(scores.labels, scores.predictions, k)
    classes = m.classification_scores(confusion)
    ece, reliability = m.calibration(scores.probabilities, scores.labels, calibration_bins)
    geometry = m.feature_geometry(scores.features, scores.labels, k)
    per_class = {
        name: {
            "support": classes["per_class"]["support"][c],
            "precision": classes["per_class"]["precision"][c],
            "recall": classes["per_class"]["recall"][c],
            "f1": classes["per_class"]["f1"][c],
            "cohesion": geometry["per_class"]["cohesion_normalised"][c],
            "silhouette": geometry["per_class"]["silhouette"][c],
        }
        for c, name in enumerate(class_names)
    }
    headline = {key: value for key, value in classes.items() if key != "per_class"}
    headline["worst_class_name"] = class_names[classes["worst_class"]] if classes["worst_class"] >= 0 else ""
    shape = {key: value for key, value in geometry.items() if key not in ("per_class", "centroid_distances")}
    return {
        **headline,
        "ece": ece,
        **shape,
        "per_class": per_class,
        "confusion": confusion.tolist(),
        "calibration": reliability,
        "centroid_distances": geometry["centroid_distances"],
    }


def predictions_table(
    scores: Scores,
    class_names: Sequence[str],
    decisions: Sequence[str] | None = None,
    distances: np.ndarray | None = None,
) -> pd.DataFrame:
    """One row per image: path, actual, predicted, confidence, correct (the confusion plot's
    data), and the line decision and feature distance when there are."""
    probs = scores.probabilities
    pred = scores.predictions
    table = pd.DataFrame(
        {
            "path": scores.paths,
            "actual": [class_names[i] for i in scores.labels],
            "predicted": [class_names[i] for i in pred],
            "confidence": probs[np.arange(len(pred)), pred] if len(pred) else [],
            "correct": scores.correct,
        }
    )
    if decisions is not None and any(decisions):
        table["decision"] = list(decisions)
    if distances is not None:
        table["distance"] = np.asarray(distances, dtype=np.float64)
    return table


def scalars_only(report: dict[str, Any]) -> dict[str, Any]:
    """The report without its matrices and tables (what ``dvc metrics`` shows), NaN -> None."""
    skip = ("confusion", "calibration", "centroid_distances")
    return json_safe({key: value for key, value in report.items() if key not in skip})


def json_safe(value: Any) -> Any:
    """NaN and infinities become None (JSON has no NaN); numpy scalars become Python ones."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
