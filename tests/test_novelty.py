"""The unknown-part distance: it is the Mahalanobis distance to the nearest class under the
pooled covariance, its threshold lets the asked share of in-domain images through, far
points are rejected, and the torch module (what ONNX exports) computes the same number."""

import numpy as np
import pytest
import torch

from synermix.novelty import fit_novelty, fit_threshold, novelty_module


def gaussian_classes(n=600, d=6, k=3, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 4, size=(k, d))
    mix = rng.normal(size=(d, d))  # one shared, correlated covariance
    y = rng.integers(0, k, n)
    x = centres[y] + rng.normal(size=(n, d)) @ mix
    return x, y, centres, mix.T @ mix


def test_distance_is_the_mahalanobis_distance_to_the_nearest_class():
    x, y, _, _ = gaussian_classes()
    nov = fit_novelty(x, y, 3, shrinkage=1e-9)
    mu = np.stack([x[y == c].mean(0) for c in range(3)])
    centred = x - mu[y]
    cov = centred.T @ centred / (len(x) - 3)
    inv = np.linalg.inv(cov)
    probe = x[:20] + 0.5
    expected = np.array([min(np.sqrt((p - m) @ inv @ (p - m)) for m in mu) for p in probe])
    assert nov.distances(probe) == pytest.approx(expected, rel=1e-5)


def test_threshold_lets_the_asked_share_through():
    d = np.arange(100, dtype=float)
    assert fit_threshold(d, 0.05) == 94.0  # 95..99 (5 images) above it
    assert (d > fit_threshold(d, 0.05)).mean() == 0.05
    assert (d > fit_threshold(d, 0.001)).mean() == 0.0
    with pytest.raises(ValueError, match="no val images"):
        fit_threshold(np.array([]), 0.05)


def test_far_points_are_rejected_and_near_ones_kept():
    x, y, centres, _ = gaussian_classes(n=2000)

    train, val = slice(0, 1200), slice(1200, 2000)
    nov = fit_novelty(x[train], y[train], 3)
    threshold = fit_threshold(nov.distances(x[val]), 0.05)
    rng = np.random.default_rng(1)
    far = rng.normal(0, 1, size=(500, 6)) * 3 + np.abs(centres).max() * 6  # another domain
    assert (nov.distances(far) > threshold).mean() == 1.0
    assert (nov.distances(x[val]) > threshold).mean() <= 0.05


def test_torch_module_matches_numpy():
    x, y, _, _ = gaussian_classes()
    nov = fit_novelty(x, y, 3)
    module = novelty_module(nov)
    probe = np.concatenate([x[:50], x[:50] * 3])
    got = module(torch.tensor(probe, dtype=torch.float32)).double().numpy()
    assert got == pytest.approx(nov.distances(probe), rel=1e-4)


def test_a_class_without_images_is_refused():
    x, y, _, _ = gaussian_classes()
    with pytest.raises(ValueError, match=r"no training image of class index\(es\) \[3\]"):
        fit_novelty(x, y, 4)
