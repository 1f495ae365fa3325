"""Decisions in the line's terms: accept, reject, review or unknown, from calibrated scores.

An inspection line acts on two rates, not on accuracy: the **escape rate** (share of
defective parts accepted as good) and the **overkill rate** (share of good parts rejected),
and it sends the parts the model is unsure of to a person (**review**). This module turns
a model's calibrated class probabilities into those decisions and fits the thresholds.

The score of an image is ``s = P(defect) = Σ_{c ∈ defect_classes} p_c`` (calibrated
probabilities, so ``s`` means what it says). Two thresholds ``accept_below <= reject_from``
split it::

    s <  accept_below                 -> accept   (the part is good)
    accept_below <= s < reject_from   -> review   (a person looks)
    s >= reject_from                  -> reject   (the part is defective)

and, before all of them, an image whose penultimate features are far from every class
(:mod:`synermix.novelty`) is ``unknown``: not a part the model knows, whatever it scores.

:func:`fit_operating_point` chooses the thresholds on the val split: among every pair of
cut points between the val scores whose val rates meet the limits (``max_escape_rate``,
``max_overkill_rate``, ``max_review_rate``), the pair with the lowest mean cost under the
2 x 3 cost matrix (rows: the part is good | defective; columns: accept | review | reject).
All pairs are evaluated exactly (counts by cumulative sums), so the fit is deterministic
and optimal on val. When no pair meets the limits, :class:`Infeasible` says the best rate
the model reaches on val. :func:`decision_rates` reports the rates of a fitted point on
another split (test) with 95 % Wilson intervals, overall and per class.

Pure numpy: the evaluate stage fits, inference and the service apply, pilot-eval reports.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from synermix.metrics import wilson_interval

ACCEPT, REVIEW, REJECT, UNKNOWN = "accept", "review", "reject", "unknown"
DECISIONS = (ACCEPT, REJECT, REVIEW, UNKNOWN)
#: columns of the cost matrix, in order
COST_COLUMNS = (ACCEPT, REVIEW, REJECT)
#: rows of the cost matrix, in order
COST_ROWS = ("good", "defective")
#: above every probability: ``accept_below`` at this accepts everything
ABOVE_ONE = float(np.nextafter(1.0, 2.0))


class Infeasible(ValueError):
    """The limits cannot all be met on the fit split; ``str()`` names the best rates reached."""


@dataclass(frozen=True)
class OperatingPoint:
    """A fitted decision rule for the classes of one model."""

    class_names: list[str]
    defect_classes: list[str]
    accept_below: float
    reject_from: float
    #: how it was fitted: limits, costs, the fit split's rates
    fit: dict[str, Any] = field(default_factory=dict)

    def defect_mask(self) -> np.ndarray:
        return np.array([c in self.defect_classes for c in self.class_names])

    def defect_score(self, probabilities: np.ndarray) -> np.ndarray:
        """P(defect) per row of an ``N x K`` probability matrix."""
        p = np.atleast_2d(np.asarray(probabilities, dtype=np.float64))
        return p[:, self.defect_mask()].sum(axis=1)

    def decide(self, probabilities: np.ndarray) -> list[str]:
        """accept | review | reject per image, from its calibrated class probabilities."""
        s = self.defect_score(probabilities)
        out = np.where(s < self.accept_below, ACCEPT, np.where(s >= self.reject_from, REJECT, REVIEW))
        return [str(x) for x in out]

    def to_dict(self) -> dict[str, Any]:
        return {
            "class_names": list(self.class_names),
            "defect_classes": list(self.defect_classes),
            "accept_below": self.accept_below,
            "reject_from": self.reject_from,
            "fit": self.fit,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], class_names: Sequence[str] | None = None) -> OperatingPoint:
        """Read a stored point; ValueError (one line) when it is malformed or was stored for
        other classes than ``class_names`` (the model's)."""
        if not isinstance(data, Mapping):
            raise ValueError("the operating point is not a JSON object")
        try:
            names = list(data["class_names"])
            defects = list(data["defect_classes"])
            accept_below = float(data["accept_below"])
            reject_from = float(data["reject_from"])
        except (KeyError, TypeError, ValueError) as exc:
            what = f"no {exc}" if isinstance(exc, KeyError) else str(exc)
            raise ValueError(f"the operating point is malformed: {what}") from None
        if class_names is not None and names != list(class_names):
            raise ValueError(
                f"the operating point was stored for classes {', '.join(names)}, the model has "
                f"{', '.join(class_names)}: re-run the evaluate stage for this model"
            )
        unknown_defects = [c for c in defects if c not in names]
        if unknown_defects or not defects:
            raise ValueError(
                f"the operating point's defect classes {defects} are not among its classes {names}"
            )
        if not (0.0 <= accept_below <= reject_from <= ABOVE_ONE):
            raise ValueError(
                f"the operating point's thresholds accept_below {accept_below} and reject_from "
                f"{reject_from} are not 0 <= accept_below <= reject_from <= 1"
            )
        fit = data.get("fit") if isinstance(data.get("fit"), Mapping) else {}
        return cls(names, defects, accept_below, reject_from, dict(fit))


def decide(
    point: OperatingPoint | None,
    unknown_above: float | None,
    probabilities: np.ndarray,
    distances: np.ndarray | None,
) -> list[str]:
    """The decision per image: ``unknown`` when its feature distance is above ``unknown_above``
    (a distance that is not finite is near no class either), else the operating point's
    accept | review | reject; ``""`` where neither is set (no decision, a class label only)."""
    n = len(np.atleast_2d(probabilities))
    out = point.decide(probabilities) if point is not None else [""] * n
    if unknown_above is not None and distances is not None:
        d = np.asarray(distances, dtype=np.float64).reshape(-1)
        out = [UNKNOWN if not (x <= unknown_above) else o for x, o in zip(d, out, strict=True)]
    return out


def check_unknown_above(value: Any) -> float | None:
    """A stored unknown-part threshold: None or a finite distance >= 0; ValueError otherwise."""
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not (math.isfinite(value) and value >= 0)
    ):
        raise ValueError(f"the unknown-part threshold {value!r} is not a distance")
    return float(value)


def check_defect_classes(defect_classes: Sequence[str], class_names: Sequence[str], where: str) -> None:
    """ValueError (one line) when a defect class is not a class of the model, or every class is."""
    missing = [c for c in defect_classes if c not in class_names]
    if missing:
        raise ValueError(
            f"{where} names {', '.join(repr(c) for c in missing)}, not a class of this model "
            f"(classes: {', '.join(class_names)}): fix {where}"
        )
    if set(defect_classes) >= set(class_names):
        raise ValueError(
            f"{where} lists every class ({', '.join(class_names)}): at least one class must be a good "
            "part, or there is nothing to accept"
        )


def _cut_points(scores: np.ndarray) -> np.ndarray:
    """0, the midpoints between consecutive distinct scores, and just above 1: every way a
    threshold can split the scores, each as far from the scores next to it as possible."""
    u = np.unique(np.clip(scores, 0.0, 1.0))
    mids = (u[:-1] + u[1:]) / 2 if len(u) > 1 else np.array([])
    return np.concatenate([[0.0], mids, [ABOVE_ONE]])


def _below(sorted_scores: np.ndarray, cuts: np.ndarray) -> np.ndarray:
    """How many scores lie strictly below each cut."""
    return np.searchsorted(sorted_scores, cuts, side="left")


def fit_operating_point(
    probabilities: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    defect_classes: Sequence[str],
    *,
    max_escape_rate: float | None,
    max_overkill_rate: float | None,
    max_review_rate: float | None,
    review: bool,
    costs: Sequence[Sequence[float]],
    split: str = "val",
) -> OperatingPoint:
    """The thresholds that meet the limits on these images at the lowest mean cost.

    ``probabilities``: ``N x K`` calibrated probabilities; ``labels``: true class indices.
    ``review`` false: one threshold (no review band). Raises :class:`Infeasible` when no
    thresholds meet the limits, naming the best rates reached.
    """
    check_defect_classes(defect_classes, class_names, "decision.defect_classes")
    point = OperatingPoint(list(class_names), list(defect_classes), 0.0, 0.0)
    s = point.defect_score(probabilities)
    y = np.asarray(labels, dtype=np.int64)
    is_defect = point.defect_mask()[y] if len(y) else np.zeros(0, dtype=bool)
    n_defect, n_good = int(is_defect.sum()), int((~is_defect).sum())
    if not n_defect or not n_good:
        missing = "defective" if not n_defect else "good"
        raise Infeasible(
            f"the {split} split has no {missing} image ({n_defect} defective, {n_good} good): "
            "the operating point cannot be fitted; give every class images in val (data.split)"
        )
    cuts = _cut_points(s)
    d_below = _below(np.sort(s[is_defect]), cuts)  # defects accepted when cut is accept_below
    g_below = _below(np.sort(s[~is_defect]), cuts)
    # all pairs (a, r), a <= r: rows index accept_below, columns reject_from
    escapes = d_below[:, None].astype(np.float64)
    overkill = (n_good - g_below)[None, :].astype(np.float64)
    reviewed_defects = d_below[None, :] - d_below[:, None]
    reviewed_good = g_below[None, :] - g_below[:, None]
    n = n_defect + n_good
    escape_rate = np.broadcast_to(escapes / n_defect, (len(cuts), len(cuts)))
    overkill_rate = np.broadcast_to(overkill / n_good, (len(cuts), len(cuts)))
    review_rate = (reviewed_defects + reviewed_good) / n
    ok = np.triu(np.ones((len(cuts), len(cuts)), dtype=bool))
    if not review:
        ok &= np.eye(len(cuts), dtype=bool)
    shape_ok = ok.copy()
    for rate, limit in (
        (escape_rate, max_escape_rate),
        (overkill_rate, max_overkill_rate),
        (review_rate, max_review_rate),
    ):
        if limit is not None:
            ok &= rate <= limit + 1e-12
    if not ok.any():
        raise Infeasible(
            _infeasible_message(
                split,
                shape_ok,
                escape_rate,
                overkill_rate,
                review_rate,
                max_escape_rate,
                max_overkill_rate,
                max_review_rate,
                review,
            )
        )
    c = np.asarray(costs, dtype=np.float64)
    accepted_good = g_below[:, None]
    rejected_defects = (n_defect - d_below)[None, :]
    cost = (
        c[0, 0] * accepted_good
        + c[0, 1] * reviewed_good
        + c[0, 2] * overkill
        + c[1, 0] * escapes
        + c[1, 1] * reviewed_defects
        + c[1, 2] * rejected_defects
    ) / n
    # ties in cost: the least review, then the lower (stricter) thresholds
    key = np.where(ok, cost, np.inf)
    best = np.flatnonzero(key == key.min())
    best = best[np.argmin(review_rate.reshape(-1)[best])]  # first minimum: stable
    i, j = np.unravel_index(best, key.shape)
    fit = {
        "fitted_on": split,
        "images": n,
        "defective_images": n_defect,
        "good_images": n_good,
        "limits": {
            "max_escape_rate": max_escape_rate,
            "max_overkill_rate": max_overkill_rate,
            "max_review_rate": max_review_rate,
            "review": review,
        },
        "costs": c.tolist(),
        "mean_cost": float(cost[i, j]),
        "escape_rate": float(escape_rate[i, j]),
        "overkill_rate": float(overkill_rate[i, j]),
        "review_rate": float(review_rate[i, j]),
    }
    return OperatingPoint(list(class_names), list(defect_classes), float(cuts[i]), float(cuts[j]), fit=fit)


def _infeasible_message(
    split, shape_ok, escape_rate, overkill_rate, review_rate, max_escape, max_overkill, max_review, review
) -> str:
    """One line: which limit cannot be met, and the best rate reached within the others."""
    limits = {"max_escape_rate": max_escape, "max_overkill_rate": max_overkill, "max_review_rate": max_review}
    rates = {
        "max_escape_rate": escape_rate,
        "max_overkill_rate": overkill_rate,
        "max_review_rate": review_rate,
    }
    parts = []
    for key, limit in limits.items():
        if limit is None:
            continue
        others = shape_ok.copy()
        for other, other_limit in limits.items():
            if other != key and other_limit is not None:
                others &= rates[other] <= other_limit + 1e-12
        if not others.any():
            continue
        best = float(rates[key][others].min())
        if best > limit + 1e-12:
            within = [f"{o} {v:g}" for o, v in limits.items() if o != key and v is not None]
            parts.append(
                f"the lowest {key[4:]} reached on {split} is {best:.4f} (limit {limit:g})"
                + (f" within {' and '.join(within)}" if within else "")
            )
    if not parts:  # each limit alone is reachable, but not all at once
        parts.append("each limit can be met, but not all at once")
    band = "" if review else " with no review band (decision.review: false)"
    return (
        f"decision limits cannot be met on the {split} split{band}: {'; '.join(parts)}. "
        + (
            "Loosen decision.max_*_rate, allow a review band (decision.review: true)"
            if not review
            else "Loosen decision.max_*_rate"
        )
        + ", or improve the model"
    )


def _rate(count: int, total: int) -> dict[str, Any]:
    low, high = wilson_interval(count, total)
    return {
        "rate": count / total if total else math.nan,
        "count": count,
        "of": total,
        "ci95_low": low,
        "ci95_high": high,
    }


def decision_rates(point: OperatingPoint, decisions: Sequence[str], labels: np.ndarray) -> dict[str, Any]:
    """Escape, overkill, review and unknown rates of ``decisions`` against the true ``labels``,
    each with its count and 95 % Wilson interval, overall and per class.

    escape: defective images accepted / defective images; overkill: good images rejected /
    good images; review, unknown: images so decided / all images. Per class: the share of
    that class's images given each decision, and its escape (defect class) or overkill (good
    class) rate.
    """
    dec = np.asarray(decisions)
    y = np.asarray(labels, dtype=np.int64)
    defect = point.defect_mask()[y] if len(y) else np.zeros(0, dtype=bool)
    n = len(y)
    out: dict[str, Any] = {
        "images": n,
        "escape": _rate(int(((dec == ACCEPT) & defect).sum()), int(defect.sum())),
        "overkill": _rate(int(((dec == REJECT) & ~defect).sum()), int((~defect).sum())),
        "review": _rate(int((dec == REVIEW).sum()), n),
        "unknown": _rate(int((dec == UNKNOWN).sum()), n),
        "per_class": {},
    }
    for c, name in enumerate(point.class_names):
        mine = y == c
        total = int(mine.sum())
        row: dict[str, Any] = {"defect": name in point.defect_classes, "images": total}
        for d in DECISIONS:
            row[d] = _rate(int((mine & (dec == d)).sum()), total)
        row["error"] = row[ACCEPT] if row["defect"] else row[REJECT]
        row["error_kind"] = "escape" if row["defect"] else "overkill"
        out["per_class"][name] = row
    return out


def rate_metrics(rates: Mapping[str, Any]) -> dict[str, float | None]:
    """The headline numbers of :func:`decision_rates` (what the gates and dvc metrics see)."""

    def num(x: float) -> float | None:
        return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)

    out = {}
    for key in ("escape", "overkill", "review", "unknown"):
        out[f"{key}_rate"] = num(rates[key]["rate"])
        out[f"{key}_rate_ci95_high"] = num(rates[key]["ci95_high"])
    return out
