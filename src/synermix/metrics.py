"""Held-out metrics of a classifier, from labels, predictions, probabilities and features.

Pure numpy: no torch, MLflow, DVC, Optuna or GX, so the evaluate stage, the champion
comparison and a pilot-line evaluation all compute the same numbers the same way.

Notation used in every docstring below: ``n`` samples, ``K`` classes, ``y_i`` the true
and ``ŷ_i`` the predicted class of sample ``i``, ``C`` the confusion matrix with
``C[a, p]`` = number of samples of true class ``a`` predicted as ``p``, ``n_c`` the
number of samples of class ``c``, ``f_i`` the penultimate feature vector of sample ``i``
(the input of the final linear layer), ``μ_c = (1/n_c) Σ_{y_i=c} f_i`` the centroid of
class ``c`` and ``μ = (1/n) Σ_i f_i`` the global mean. A class with no sample in the
split has no recall (NaN, "not measured"), which is not a recall of 0; averages over
classes skip it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """``C[a, p] = #{i : y_i = a, ŷ_i = p}`` (rows: true class, columns: predicted)."""
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"{len(y_true)} labels but {len(y_pred)} predictions")
    for name, values in (("labels", y_true), ("predictions", y_pred)):
        if values.size and (values.min() < 0 or values.max() >= num_classes):
            raise ValueError(f"{name} must lie in [0, {num_classes})")
    flat = np.bincount(y_true * num_classes + y_pred, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes)


def classification_scores(confusion: np.ndarray) -> dict[str, Any]:
    """Accuracy, per-class precision/recall/F1 and the spread of per-class recall.

    - accuracy = ``Σ_c C[c, c] / n``, with its 95 % Wilson interval (:func:`wilson_interval`)
    - recall_c = ``C[c, c] / Σ_p C[c, p]`` (NaN when class ``c`` has no sample)
    - precision_c = ``C[c, c] / Σ_a C[a, c]`` (0 when nothing was predicted as ``c``)
    - F1_c = ``2 precision_c recall_c / (precision_c + recall_c)`` (0 when both are 0)
    - macro recall = balanced accuracy = mean of recall_c over the classes present;
      macro precision and macro F1 likewise
    - recall spread: population std, min, max and ``max - min`` of recall_c over the
      classes present; ``worst_class`` is the index of the lowest recall
    """
    confusion = np.asarray(confusion, dtype=np.int64)
    total = int(confusion.sum())
    correct = np.diag(confusion).astype(np.float64)
    support = confusion.sum(axis=1)
    predicted = confusion.sum(axis=0)
    present = support > 0
    recall = np.where(present, correct / np.maximum(support, 1), np.nan)
    precision = np.where(predicted > 0, correct / np.maximum(predicted, 1), 0.0)
    r = np.nan_to_num(recall)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(precision + r > 0, 2 * precision * r / (precision + r), 0.0)
    f1 = np.where(present, f1, np.nan)
    measured = recall[present]
    low, high = wilson_interval(int(correct.sum()), total)
    return {
        "images": total,
        "accuracy": float(correct.sum() / total) if total else math.nan,
        "accuracy_ci95_low": low,
        "accuracy_ci95_high": high,
        "macro_recall": float(measured.mean()) if measured.size else math.nan,
        "macro_precision": float(precision[present].mean()) if measured.size else math.nan,
        "macro_f1": float(f1[present].mean()) if measured.size else math.nan,
        "recall_std": float(measured.std()) if measured.size else math.nan,
        "recall_min": float(measured.min()) if measured.size else math.nan,
        "recall_max": float(measured.max()) if measured.size else math.nan,
        "recall_spread": float(measured.max() - measured.min()) if measured.size else math.nan,
        "worst_class": int(np.nanargmin(recall)) if measured.size else -1,
        "classes_measured": int(present.sum()),
        "per_class": {
            "support": support.tolist(),
            "precision": precision.tolist(),
            "recall": recall.tolist(),
            "f1": f1.tolist(),
        },
    }


def wilson_interval(successes: int, trials: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval of a proportion (95 % for the default ``z``).

    With ``p = successes / trials`` and ``n = trials``:

        centre = (p + z²/2n) / (1 + z²/n)
        half   = z sqrt(p(1-p)/n + z²/4n²) / (1 + z²/n)

    It stays inside [0, 1] and is sensible for small ``n`` and for ``p`` near 0 or 1,
    where the normal approximation is not: how far a test-split accuracy can be trusted.
    """
    if trials <= 0:
        return math.nan, math.nan
    p = successes / trials
    denominator = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denominator
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise ``exp(z - max z) / Σ exp(z - max z)`` in float64."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def calibration(
    probs: np.ndarray, y_true: np.ndarray, bins: int = 15
) -> tuple[float, list[dict[str, float]]]:
    """Expected calibration error and the reliability table it is computed from.

    Confidence ``p_i = max_c P(c | x_i)``, the predicted class's probability. Bin ``b`` of
    ``B`` equal-width bins holds the samples with ``(b-1)/B < p_i ≤ b/B`` (bin 1 also
    takes ``p_i = 0``). With ``acc_b`` the accuracy and ``conf_b`` the mean confidence of
    the ``n_b`` samples in bin ``b``:

        ECE = Σ_b (n_b / n) |acc_b - conf_b|

    0 is perfectly calibrated; a model that says 90 % and is right 60 % of the time adds
    0.3 times that bin's share. Empty bins are left out of the table and the sum.
    """
    probs = np.asarray(probs, dtype=np.float64)
    y_true = np.asarray(y_true, dtype=np.int64)
    if bins < 1:
        raise ValueError("bins must be >= 1")
    n = len(y_true)
    if n == 0:
        return math.nan, []
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == y_true
    index = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)
    ece = 0.0
    table = []
    for b in range(bins):
        members = index == b
        count = int(members.sum())
        if not count:
            continue
        acc, conf = float(correct[members].mean()), float(confidence[members].mean())
        ece += count / n * abs(acc - conf)
        table.append(
            {
                "bin_low": b / bins,
                "bin_high": (b + 1) / bins,
                "images": count,
                "confidence": conf,
                "accuracy": acc,
            }
        )
    return float(ece), table


def _pairwise_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    squared = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.sqrt(np.maximum(squared, 0.0))


def silhouette(features: np.ndarray, labels: np.ndarray, num_classes: int, chunk: int = 1024) -> np.ndarray:
    """Per-sample silhouette ``s_i = (b_i - a_i) / max(a_i, b_i)`` with Euclidean distances.

    ``a_i`` = mean distance from ``f_i`` to the other samples of its class; ``b_i`` =
    the smallest, over the other classes present, of the mean distance from ``f_i`` to
    that class's samples. ``s_i = 0`` when sample ``i`` is alone in its class (as in
    Rousseeuw 1987 and scikit-learn) and NaN when only one class is present. Exact, in
    row chunks: memory ``O(chunk * n)``, not ``O(n^2)``.
    """
    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    n = len(y)
    counts = np.bincount(y, minlength=num_classes).astype(np.float64)
    present = counts > 0
    out = np.full(n, np.nan)
    if present.sum() < 2:
        return out
    onehot = np.zeros((n, num_classes))
    onehot[np.arange(n), y] = 1.0
    for start in range(0, n, chunk):
        rows = slice(start, min(start + chunk, n))
        distances = _pairwise_distances(x[rows], x)
        distances[np.arange(rows.stop - start), np.arange(start, rows.stop)] = 0.0  # no rounding noise
        sums = distances @ onehot  # chunk x K: distance sums per class
        own = y[rows]
        own_count = counts[own]
        a = sums[np.arange(len(own)), own] / np.maximum(own_count - 1, 1)
        means = np.where(present, sums / np.maximum(counts, 1), np.inf)
        means[np.arange(len(own)), own] = np.inf
        b = means.min(axis=1)
        largest = np.maximum(a, b)
        s = np.where(largest > 0, (b - a) / np.where(largest > 0, largest, 1), 0.0)
        out[rows] = np.where(own_count > 1, s, 0.0)
    return out


def feature_geometry(features: np.ndarray, labels: np.ndarray, num_classes: int) -> dict[str, Any]:
    """Intra-class cohesion and inter-class separability of penultimate features.

    - total variance ``T = (1/n) Σ_i ||f_i - μ||²`` (the trace of the covariance)
    - cohesion of class c ``W_c = (1/n_c) Σ_{y_i=c} ||f_i - μ_c||²``, reported
      normalised as ``W_c / T`` (scale-free: 0 = every sample on its centroid; 1 = as
      spread as the whole split)
    - ``intra_class_variance`` = mean of ``W_c / T`` over the classes present (each class
      counts once, so a rare defect class weighs as much as the common one)
    - within ``S_W = (1/n) Σ_c n_c W_c`` and between ``S_B = (1/n) Σ_c n_c ||μ_c - μ||²``
      (``S_W + S_B = T``); ``within_fraction = S_W / T``
    - Fisher ratio ``S_B / S_W`` (a trace form of Fisher's criterion: larger = classes
      further apart relative to their spread)
    - centroid distances ``D_cc' = ||μ_c - μ_c'||`` (a K x K matrix), their min and mean
      over pairs, and the min normalised by ``sqrt(T)``
    - silhouette: mean of :func:`silhouette` over all samples, and per class

    Normalised values are NaN when ``T = 0`` (every feature identical).
    """
    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    n = len(y)
    if x.ndim != 2 or len(x) != n:
        raise ValueError("features must be an n x d array with one row per label")
    counts = np.bincount(y, minlength=num_classes)
    present = counts > 0
    mean = x.mean(axis=0)
    total = float(((x - mean) ** 2).sum(axis=1).mean()) if n else math.nan
    centroids = np.zeros((num_classes, x.shape[1]))
    np.add.at(centroids, y, x)
    centroids /= np.maximum(counts, 1)[:, None]
    within_sum = np.zeros(num_classes)
    np.add.at(within_sum, y, ((x - centroids[y]) ** 2).sum(axis=1))
    cohesion = np.where(present, within_sum / np.maximum(counts, 1), np.nan)
    within = float(within_sum.sum() / n) if n else math.nan
    between = float((counts * ((centroids - mean) ** 2).sum(axis=1)).sum() / n) if n else math.nan
    normalised = cohesion / total if total > 0 else np.full(num_classes, np.nan)
    distances = _pairwise_distances(centroids, centroids)
    distances[~present, :] = np.nan
    distances[:, ~present] = np.nan
    pairs = distances[np.triu_indices(num_classes, k=1)]
    pairs = pairs[~np.isnan(pairs)]
    s = silhouette(x, y, num_classes)
    per_class_silhouette = [float(s[y == c].mean()) if present[c] else math.nan for c in range(num_classes)]
    return {
        "total_variance": total,
        "intra_class_variance": float(np.nanmean(normalised)) if present.any() and total > 0 else math.nan,
        "within_fraction": within / total if total > 0 else math.nan,
        "fisher_ratio": between / within if within > 0 else math.nan,
        "centroid_distance_min": float(pairs.min()) if pairs.size else math.nan,
        "centroid_distance_mean": float(pairs.mean()) if pairs.size else math.nan,
        "centroid_distance_min_normalised": float(pairs.min() / math.sqrt(total))
        if pairs.size and total > 0
        else math.nan,
        "silhouette": float(np.nanmean(s)) if not np.isnan(s).all() else math.nan,
        "per_class": {
            "cohesion": cohesion.tolist(),
            "cohesion_normalised": normalised.tolist(),
            "silhouette": per_class_silhouette,
        },
        "centroid_distances": distances.tolist(),
    }


@dataclass(frozen=True)
class PairedComparison:
    """Two models scored on the same images (see :func:`mcnemar_exact`)."""

    images: int
    only_a_right: int
    only_b_right: int
    p_value: float


def mcnemar_exact(correct_a: np.ndarray, correct_b: np.ndarray) -> PairedComparison:
    """Exact McNemar test of two models on the same images.

    With ``b`` = images only model A gets right and ``c`` = images only model B gets
    right, under "equally accurate" each discordant image is a fair coin:

        p = min(1, 2 Σ_{k=0}^{min(b,c)} C(b+c, k) / 2^(b+c))

    (two-sided; 1 when there are no discordant images). Images both get right or both
    get wrong carry no information about which model is better.
    """
    a = np.asarray(correct_a, dtype=bool)
    b_arr = np.asarray(correct_b, dtype=bool)
    if a.shape != b_arr.shape:
        raise ValueError("both models must be scored on the same images")
    b = int((a & ~b_arr).sum())
    c = int((~a & b_arr).sum())
    m = b + c
    tail = sum(math.comb(m, k) for k in range(min(b, c) + 1)) / 2**m if m else 0.5
    return PairedComparison(len(a), b, c, min(1.0, 2 * tail))


def project_2d(features: np.ndarray) -> tuple[np.ndarray, tuple[float, float]]:
    """The first two principal components of centred features, and their variance shares.

    Each axis's sign is fixed so that its largest-magnitude loading is positive, so the
    same features always give the same picture.
    """
    x = np.asarray(features, dtype=np.float64)
    x = x - x.mean(axis=0)
    _, singular, vt = np.linalg.svd(x, full_matrices=False)
    axes = vt[:2]
    if len(axes) < 2:
        axes = np.vstack([axes, np.zeros((2 - len(axes), x.shape[1]))])
    signs = np.sign(axes[np.arange(2), np.abs(axes).argmax(axis=1)])
    axes = axes * np.where(signs == 0, 1.0, signs)[:, None]
    energy = singular**2
    share = energy[:2] / energy.sum() if energy.sum() > 0 else np.zeros(2)
    share = np.pad(share, (0, 2 - len(share)))
    return x @ axes.T, (float(share[0]), float(share[1]))
