"""Drift statistics: is a window of line images drawn from what the model was trained on?

Each test compares a window of served images with the reference sample stored with the
model (:mod:`synermix.profile`, the val images run through the exported model), and
answers a p-value under "no drift":

- **image statistics** (grey-level mean, standard deviation, sharpness, width, height):
  the two-sample Kolmogorov-Smirnov test per statistic, and the population stability
  index ``PSI = sum_b (w_b - r_b) ln(w_b / r_b)`` over the reference's deciles as an
  effect size (> 0.25 is the usual "large shift");
- **prediction mix**: the chi-square test of the 2 x K table (reference, window) x
  predicted class, so the reference's own sampling noise counts;
- **features**: the squared maximum mean discrepancy of the embeddings (the model's
  penultimate features in a fixed projection) with a Gaussian kernel whose bandwidth is the
  reference's median pairwise distance, and a permutation test::

      MMD^2 = mean_{i != j} k(x_i, x_j) + mean_{i != j} k(y_i, y_j) - 2 mean_{i, j} k(x_i, y_j)

  (Gretton et al. 2012, the unbiased estimate); p = (1 + #{permuted >= observed}) / (1 + P).

Per class (by predicted class) the window's centroid shift ``||mu_c^w - mu_c^r|| /
sqrt(W_c^r)`` (in units of the reference class's own spread) and its cohesion ``W_c / T``
against the reference's, in the terms of :func:`synermix.metrics.feature_geometry`, are
reported beside the tests; they explain an alarm, they do not raise one.

An alarm needs ``p < alpha / m`` for one of the ``m`` tests of the window (all slices
together): Bonferroni, so the chance that an unchanged window raises any alarm is at most
``alpha`` when the reference and the window are samples of one distribution. For an image
statistic the shift must also matter: a PSI of at least ``monitor.min_psi`` (0.1, the usual
"moderate shift" line), because with thousands of reference images a shift too small to
change any answer is still significant. Measured on ELPV (docs/benchmarks.md): the
sharpness of the test windows sits at PSI 0.06-0.08 from the reference with p near 0.005,
which raised 5 false alarms in 100 windows of 200 before that floor and none with it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

#: the image statistics recorded per image, in this order
IMAGE_STATISTICS = ("mean", "std", "sharpness", "width", "height")


def image_statistics(pixels: np.ndarray, width: int, height: int) -> dict[str, float]:
    """Statistics of one image: grey-level mean and standard deviation of the pixels the
    model sees (uint8 ``H x W x C``), sharpness as the variance of their 4-neighbour
    Laplacian (blur lowers it), and the decoded image's width and height."""
    grey = np.asarray(pixels, dtype=np.float64)
    if grey.ndim == 3:
        grey = grey.mean(axis=2)
    lap = (
        grey[1:-1, :-2] + grey[1:-1, 2:] + grey[:-2, 1:-1] + grey[2:, 1:-1] - 4.0 * grey[1:-1, 1:-1]
        if min(grey.shape) >= 3
        else np.zeros(1)
    )
    return {
        "mean": float(grey.mean()),
        "std": float(grey.std()),
        "sharpness": float(lap.var()),
        "width": float(width),
        "height": float(height),
    }


@dataclass(frozen=True)
class TestResult:
    """One test of one window (and slice)."""

    test: str
    statistic: float
    p_value: float
    #: an effect size a person can read (PSI, total variation distance, MMD^2), or nan
    effect: float = math.nan
    #: image (a statistic; its effect is the PSI) | mix | features
    kind: str = "image"

    def to_dict(self) -> dict[str, float | str]:
        return {
            "test": self.test,
            "kind": self.kind,
            "statistic": self.statistic,
            "p_value": self.p_value,
            "effect": self.effect,
        }


def ks_test(reference: np.ndarray, window: np.ndarray) -> tuple[float, float]:
    """(KS statistic, p-value); two constant samples of one value are the same (p = 1)."""
    from scipy.stats import ks_2samp

    ref = np.asarray(reference, dtype=np.float64)
    win = np.asarray(window, dtype=np.float64)
    if np.ptp(ref) == 0 and np.ptp(win) == 0 and ref[0] == win[0]:
        return 0.0, 1.0
    result = ks_2samp(ref, win)
    return float(result.statistic), float(result.pvalue)


def psi(reference: np.ndarray, window: np.ndarray, bins: int = 10, floor: float = 1e-4) -> float:
    """Population stability index over the reference's quantile bins (0: same shares)."""
    ref = np.asarray(reference, dtype=np.float64)
    win = np.asarray(window, dtype=np.float64)
    edges = np.unique(np.quantile(ref, np.linspace(0, 1, bins + 1)[1:-1]))
    r = np.bincount(np.searchsorted(edges, ref, side="right"), minlength=len(edges) + 1) / len(ref)
    w = np.bincount(np.searchsorted(edges, win, side="right"), minlength=len(edges) + 1) / len(win)
    r, w = np.maximum(r, floor), np.maximum(w, floor)
    return float(((w - r) * np.log(w / r)).sum())


def mix_test(reference_counts: np.ndarray, window_counts: np.ndarray) -> tuple[float, float, float]:
    """(chi-square, p-value, total variation distance) of two count vectors over the classes.
    Classes neither sample predicted are left out; one class in all: no evidence (p = 1)."""
    from scipy.stats import chi2_contingency

    table = np.stack([np.asarray(reference_counts, float), np.asarray(window_counts, float)])
    table = table[:, table.sum(axis=0) > 0]
    shares = table / table.sum(axis=1, keepdims=True)
    tvd = float(0.5 * np.abs(shares[0] - shares[1]).sum())
    if table.shape[1] < 2:
        return 0.0, 1.0, tvd
    stat, p, _, _ = chi2_contingency(table, correction=False)
    return float(stat), float(p), tvd


def median_bandwidth(x: np.ndarray, most: int = 1000, seed: int = 0) -> float:
    """The median pairwise Euclidean distance of (at most ``most`` seeded rows of) ``x``."""
    x = np.asarray(x, dtype=np.float64)
    if len(x) > most:
        x = x[np.random.default_rng(seed).choice(len(x), most, replace=False)]
    d = np.sqrt(np.maximum(_sq_distances(x, x), 0.0))
    pairs = d[np.triu_indices(len(x), k=1)]
    value = float(np.median(pairs)) if pairs.size else 1.0
    return value if value > 0 else 1.0


def _sq_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T


def mmd_test(
    reference: np.ndarray,
    window: np.ndarray,
    bandwidth: float,
    permutations: int = 500,
    seed: int = 0,
) -> tuple[float, float]:
    """(unbiased MMD^2, permutation p-value) of two samples of embeddings (rows)."""
    x = np.asarray(reference, dtype=np.float64)
    y = np.asarray(window, dtype=np.float64)
    z = np.concatenate([x, y])
    kernel = np.exp(-np.maximum(_sq_distances(z, z), 0.0) / (2.0 * bandwidth**2))
    np.fill_diagonal(kernel, 0.0)  # the unbiased estimate leaves out k(x_i, x_i)
    n, m = len(x), len(y)
    observed = _mmd2(kernel, np.r_[np.zeros(n), np.ones(m)][:, None], n, m)[0]
    rng = np.random.default_rng(seed)
    # each column one relabelling: which rows play the window
    masks = np.zeros((n + m, permutations))
    for j in range(permutations):
        masks[rng.permutation(n + m)[:m], j] = 1.0
    permuted = _mmd2(kernel, masks, n, m)
    p = (1.0 + float((permuted >= observed - 1e-15).sum())) / (1.0 + permutations)
    return float(observed), p


def _mmd2(kernel: np.ndarray, masks: np.ndarray, n: int, m: int) -> np.ndarray:
    """Unbiased MMD^2 for each column of ``masks`` (1: the row is in the window sample)."""
    total = kernel.sum()
    km = kernel @ masks
    yy = (masks * km).sum(0)  # sum over window pairs
    row_y = km.sum(0)  # sum_i,j k(i, j) with j in the window
    xy = row_y - yy
    xx = total - 2.0 * xy - yy
    return xx / (n * (n - 1)) + yy / (m * (m - 1)) - 2.0 * xy / (n * m)


def class_shift(
    reference: np.ndarray,
    reference_classes: np.ndarray,
    window: np.ndarray,
    window_classes: np.ndarray,
    class_names: list[str],
    min_images: int,
) -> dict[str, dict[str, float | int]]:
    """Per predicted class with at least ``min_images`` window images: the centroid shift in
    units of the reference class's spread, and cohesion ``W_c / T`` in both samples."""
    from synermix.metrics import feature_geometry

    k = len(class_names)
    ref_geo = feature_geometry(reference, reference_classes, k)["per_class"]["cohesion_normalised"]
    win_geo = feature_geometry(window, window_classes, k)["per_class"]["cohesion_normalised"]
    out: dict[str, dict[str, float | int]] = {}
    for c, name in enumerate(class_names):
        r = reference[reference_classes == c]
        w = window[window_classes == c]
        if len(w) < min_images or len(r) < 2:
            continue
        spread = float(((r - r.mean(0)) ** 2).sum(1).mean())
        shift = float(np.linalg.norm(w.mean(0) - r.mean(0)))
        out[name] = {
            "images": len(w),
            "centroid_shift": shift / math.sqrt(spread) if spread > 0 else math.nan,
            "cohesion_reference": float(ref_geo[c]),
            "cohesion_window": float(win_geo[c]),
        }
    return out
