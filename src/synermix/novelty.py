"""Rejecting unknown parts: how far an image's penultimate features are from every class.

A classifier answers one of its classes for any input, a photo of the wrong part or of
the floor included. The penultimate features are the space SynerMix shapes (classes
cohesive, apart), so "far from every class there" is a usable sign of "not a part I know".
The measure is the Mahalanobis distance with one covariance shared by the classes (Lee et
al. 2018, "A simple unified framework for detecting out-of-distribution samples")::

    d(x) = min_c sqrt((f(x) - mu_c)^T  S^-1  (f(x) - mu_c))

with ``mu_c`` the mean feature of class ``c`` and ``S`` the pooled within-class covariance
of the **training** images, shrunk towards its mean variance (``S + shrinkage * tr(S)/D * I``)
so that it inverts even when the features are fewer than their dimensions or collinear.
The threshold is fitted on the **val** split: the distance below which ``1 - false_reject``
of the val images fall, so about that share of real parts is wrongly called unknown.

:class:`Novelty` holds the fit as ``S^-1 = L L^T`` (Cholesky): the exported ONNX model
computes ``d`` in its graph from ``z = f L`` and the whitened centroids, so every consumer
of the file gets the same distance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

#: shrinkage of the shared covariance towards (tr S / D) I
DEFAULT_SHRINKAGE = 0.01


@dataclass(frozen=True)
class Novelty:
    """Class centroids and the whitening map of the shared covariance."""

    centroids: np.ndarray  # K x D
    whitening: np.ndarray  # D x D lower-triangular L with S^-1 = L L^T
    images: int
    shrinkage: float

    def distances(self, features: np.ndarray) -> np.ndarray:
        """The Mahalanobis distance of each row of ``features`` (N x D) to its nearest class."""
        f = np.asarray(features, dtype=np.float64)
        if len(f) == 0:
            return np.zeros(0)
        z = f @ self.whitening
        zc = self.centroids @ self.whitening
        d2 = ((z[:, None, :] - zc[None, :, :]) ** 2).sum(axis=2)  # differences: no cancellation
        return np.sqrt(d2.min(axis=1))


def fit_novelty(
    features: np.ndarray, labels: np.ndarray, num_classes: int, shrinkage: float = DEFAULT_SHRINKAGE
) -> Novelty:
    """Centroids and shared covariance of the training features; ValueError (one line) when a
    class has no image or the features carry no variance."""
    f = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    counts = np.bincount(y, minlength=num_classes)
    if (counts == 0).any():
        raise ValueError(
            f"no training image of class index(es) {np.flatnonzero(counts == 0).tolist()}: "
            "the unknown-part distance needs every class's centroid"
        )
    centroids = np.stack([f[y == c].mean(axis=0) for c in range(num_classes)])
    centred = f - centroids[y]
    dims = f.shape[1]
    cov = centred.T @ centred / max(1, len(f) - num_classes)
    scale = float(np.trace(cov)) / dims
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError("the training features have no within-class variance: no distance can be fitted")
    cov = cov + shrinkage * scale * np.eye(dims)
    precision = np.linalg.inv(cov)
    precision = (precision + precision.T) / 2
    whitening = np.linalg.cholesky(precision)
    return Novelty(centroids, whitening, len(f), shrinkage)


def fit_threshold(distances: np.ndarray, false_reject: float) -> float:
    """The distance that ``1 - false_reject`` of these in-domain images stay at or below: the
    smallest observed distance such that at most ``false_reject`` of the images are above it."""
    d = np.sort(np.asarray(distances, dtype=np.float64))
    if len(d) == 0:
        raise ValueError("no val images to fit the unknown-part threshold on")
    allowed = math.floor(false_reject * len(d) + 1e-9)  # images that may lie above
    return float(d[len(d) - 1 - min(allowed, len(d) - 1)])


def novelty_module(novelty: Novelty):
    """A torch module: penultimate features (N x D) -> the distance (N), as ONNX exports it."""
    import torch

    class _Distance(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            w = torch.tensor(novelty.whitening, dtype=torch.float32)
            zc = torch.tensor(novelty.centroids @ novelty.whitening, dtype=torch.float32)
            self.register_buffer("whitening", w)
            self.register_buffer("whitened_centroids", zc)

        def forward(self, features: torch.Tensor) -> torch.Tensor:
            z = features @ self.whitening
            # differences, not |z|^2 - 2 z.c + |c|^2: float32 would cancel digits away
            diff = z.unsqueeze(1) - self.whitened_centroids.unsqueeze(0)
            return torch.sqrt((diff * diff).sum(dim=2).min(dim=1).values)

    return _Distance()
