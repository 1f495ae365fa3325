"""Temperature scaling: one positive number T that turns the network's logits z into
calibrated probabilities softmax(z / T), fitted on the val split by negative log-likelihood.

Why one scalar and not a vector per class: T > 0 never changes which class wins, so
accuracy, recall and the confusion matrix stay exactly those the gates judged, and one
parameter fitted on a few hundred val images (ELPV: 393, 16 of the rarest class) does not
overfit; a per-class vector would change the argmax and needs many images of every class.
(Guo et al. 2017, "On calibration of modern neural networks", found the scalar as good as
richer maps on most data.)

The NLL of softmax(u z) is convex in u = 1 / T (a log-sum-exp of terms linear in u, minus a
term linear in u), so a golden-section search over u finds its minimum to the tolerance,
deterministically and without an optimiser's settings.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

#: the range T is searched in; a fit at either end is reported as such
T_MIN, T_MAX = 0.05, 20.0
TOLERANCE = 1e-7


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the true labels under softmax(logits / temperature)."""
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    y = np.asarray(labels, dtype=np.int64)
    if len(y) == 0:
        return math.nan
    z = z - z.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(z).sum(axis=1))
    return float(np.mean(log_norm - z[np.arange(len(y)), y]))


@dataclass(frozen=True)
class Temperature:
    """The fitted temperature and what it did on the images it was fitted on."""

    temperature: float
    images: int
    nll_before: float
    nll_after: float
    at_bound: bool = False
    note: str = ""

    def to_dict(self) -> dict:
        return {
            "temperature": self.temperature,
            "fitted_on_images": self.images,
            "fit_nll_before": self.nll_before,
            "fit_nll_after": self.nll_after,
            "at_bound": self.at_bound,
            "note": self.note,
        }


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> Temperature:
    """T in [T_MIN, T_MAX] minimising the NLL of ``labels``; T = 1 with a note when there is
    nothing to fit on."""
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    if len(y) == 0 or not np.isfinite(z).all():
        why = "no images to fit on" if len(y) == 0 else "the logits are not all finite"
        return Temperature(1.0, len(y), math.nan, math.nan, note=f"not calibrated: {why}")
    before = nll(z, y)
    if (z.argmax(axis=1) == y).all():
        # NLL falls without bound as T -> 0: any T would only make the model surer
        note = "not calibrated: every image of the fit is right, so the NLL has no minimum"
        log.warning("temperature scaling: %s", note)
        return Temperature(1.0, len(y), before, before, note=note)

    def cost(u: float) -> float:
        return nll(z, y, 1.0 / u)

    low, high = 1.0 / T_MAX, 1.0 / T_MIN
    ratio = (math.sqrt(5) - 1) / 2
    a, b = low, high
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = cost(c), cost(d)
    while b - a > TOLERANCE * max(1.0, abs(c)):
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = cost(c)
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = cost(d)
    u = (a + b) / 2
    temperature = 1.0 / u
    at_bound = u - low < 1e-4 * low or high - u < 1e-4 * high
    note = ""
    if at_bound:
        note = f"T hit the end of its range [{T_MIN:g}, {T_MAX:g}]: " + (
            "the fit images are nearly all right with wide margins"
            if temperature <= T_MIN * 1.01
            else "the logits carry almost no information about the labels"
        )
        log.warning("temperature scaling: %s", note)
    return Temperature(temperature, len(y), before, nll(z, y, temperature), at_bound, note)
