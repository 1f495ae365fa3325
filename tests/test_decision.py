"""Operating points: the fitted thresholds meet the val limits on hand-made scores, are the
cheapest that do (checked against brute force), infeasible limits say the best rate reached,
and the rates and their intervals count what they say."""

import itertools

import numpy as np
import pytest

from synermix import decision as dc
from synermix.metrics import wilson_interval

NAMES = ["defective", "functional", "scratch"]
DEFECTS = ["defective", "scratch"]
COSTS = [[0, 0.2, 1], [10, 0.2, 0]]


def probs_for(defect_scores, labels):
    """Probability rows whose P(defect) (defective + scratch) is exactly ``defect_scores``."""
    s = np.asarray(defect_scores, dtype=np.float64)
    p = np.zeros((len(s), 3))
    p[:, 0] = s / 2
    p[:, 2] = s / 2
    p[:, 1] = 1 - s
    return p, np.asarray(labels)


def fit(p, y, **limits):
    costs = limits.pop("costs", COSTS)
    kwargs = {"max_escape_rate": None, "max_overkill_rate": None, "max_review_rate": None, "review": True}
    kwargs.update(limits)
    return dc.fit_operating_point(p, y, NAMES, DEFECTS, costs=costs, **kwargs)


def noisy_scores(n=300, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.choice(3, size=n, p=[0.2, 0.6, 0.2])
    defect = np.isin(y, [0, 2])
    s = np.clip(np.where(defect, rng.beta(4, 2, n), rng.beta(2, 4, n)), 0, 1)
    return probs_for(s, y)


def rates(point, p, y):
    return dc.decision_rates(point, point.decide(p), y)


def test_decide_applies_the_thresholds():
    point = dc.OperatingPoint(NAMES, DEFECTS, 0.3, 0.7)
    p, _ = probs_for([0.0, 0.29, 0.3, 0.69, 0.7, 1.0], [1] * 6)
    assert point.decide(p) == ["accept", "accept", "review", "review", "reject", "reject"]


def test_separable_scores_need_no_review():
    p, y = probs_for([0.1, 0.2, 0.3, 0.7, 0.8, 0.9], [1, 1, 1, 0, 2, 0])
    point = fit(p, y, max_escape_rate=0.0, max_overkill_rate=0.0)
    assert point.accept_below == point.reject_from  # one cut, in the gap
    assert 0.3 < point.accept_below < 0.7
    r = rates(point, p, y)
    assert r["escape"]["count"] == r["overkill"]["count"] == r["review"]["count"] == 0


@pytest.mark.parametrize("limit", [0.0, 0.02, 0.05, 0.1, 0.3])
def test_thresholds_meet_the_escape_limit_on_the_fit_images(limit):
    p, y = noisy_scores()
    point = fit(p, y, max_escape_rate=limit, max_review_rate=0.25)
    r = rates(point, p, y)
    assert r["escape"]["rate"] <= limit + 1e-12
    assert r["review"]["rate"] <= 0.25 + 1e-12
    assert point.fit["escape_rate"] == pytest.approx(r["escape"]["rate"])
    assert point.fit["review_rate"] == pytest.approx(r["review"]["rate"])


@pytest.mark.parametrize(
    ("costs", "limits"),
    [
        ([[0, 0.3, 1], [6, 0.5, 0]], {"max_escape_rate": 0.1, "max_overkill_rate": 0.3}),
        ([[0, 0.8, 1], [3, 0.9, 0]], {"max_overkill_rate": 0.3}),  # escapes pay here
    ],
)
def test_the_fit_is_the_cheapest_pair_that_meets_the_limits(costs, limits):
    """Against a brute force over every pair of cut points (a broken cost sum or a shifted
    count would pick another pair or report another cost)."""
    p, y = noisy_scores(n=80, seed=3)
    point = fit(p, y, costs=costs, **limits)
    s = point.defect_score(p)
    defect = np.isin(y, [0, 2])

    def cost_of(a, r):
        acc, rej = s < a, s >= r
        rev = ~acc & ~rej
        escape = (acc & defect).sum() / defect.sum()
        overkill = (rej & ~defect).sum() / (~defect).sum()
        if escape > limits.get("max_escape_rate", 1) or overkill > limits.get("max_overkill_rate", 1):
            return np.inf
        return (
            costs[0][1] * (rev & ~defect).sum()
            + costs[0][2] * (rej & ~defect).sum()
            + costs[1][0] * (acc & defect).sum()
            + costs[1][1] * (rev & defect).sum()
        ) / len(y)

    cuts = dc._cut_points(s)
    best = min(cost_of(a, r) for a, r in itertools.product(cuts, cuts) if a <= r)
    assert cost_of(point.accept_below, point.reject_from) == pytest.approx(best)
    assert point.fit["mean_cost"] == pytest.approx(best)


def test_a_dearer_escape_lowers_the_accept_threshold():
    p, y = noisy_scores()
    cheap = fit(p, y, costs=[[0, 0.2, 1], [2, 0.2, 0]])
    dear = fit(p, y, costs=[[0, 0.2, 1], [50, 0.2, 0]])
    assert dear.accept_below < cheap.accept_below
    assert rates(dear, p, y)["escape"]["rate"] <= rates(cheap, p, y)["escape"]["rate"]


def test_no_review_band_means_one_threshold():
    p, y = noisy_scores()
    point = fit(p, y, max_escape_rate=0.1, review=False)
    assert point.accept_below == point.reject_from
    assert rates(point, p, y)["review"]["count"] == 0


def test_infeasible_limits_name_the_best_rate_reached():
    p, y = noisy_scores()
    with pytest.raises(dc.Infeasible) as err:
        fit(p, y, max_escape_rate=0.0, max_overkill_rate=0.0, review=False)
    message = str(err.value)
    assert "\n" not in message
    # the best escape rate within overkill 0: every good part must score below the cut
    s = dc.OperatingPoint(NAMES, DEFECTS, 0, 0).defect_score(p)
    defect = np.isin(y, [0, 2])
    cut = s[~defect].max()
    best = float((s[defect] <= cut).sum() / defect.sum())
    assert f"lowest escape_rate reached on val is {best:.4f} (limit 0)" in message
    assert "decision.review: true" in message  # the way out: allow a review band


def test_infeasible_review_limit():
    p, y = noisy_scores()
    with pytest.raises(dc.Infeasible, match="lowest review_rate reached on val is"):
        fit(p, y, max_escape_rate=0.0, max_overkill_rate=0.0, max_review_rate=0.01)


def test_a_split_without_defects_cannot_be_fitted():
    p, y = probs_for([0.1, 0.2], [1, 1])
    with pytest.raises(dc.Infeasible, match="no defective image"):
        fit(p, y)


def test_rates_count_and_interval():
    point = dc.OperatingPoint(NAMES, DEFECTS, 0.5, 0.5)
    p, y = probs_for([0.1, 0.9, 0.2, 0.8, 0.1, 0.4], [0, 0, 2, 1, 1, 1])
    r = rates(point, p, y)
    assert (r["escape"]["count"], r["escape"]["of"]) == (2, 3)  # defective 0.1, scratch 0.2
    assert (r["overkill"]["count"], r["overkill"]["of"]) == (1, 3)
    assert (r["escape"]["ci95_low"], r["escape"]["ci95_high"]) == pytest.approx(wilson_interval(2, 3))
    per = r["per_class"]
    assert per["scratch"]["error_kind"] == "escape" and per["scratch"]["error"]["rate"] == 1.0
    assert per["functional"]["error_kind"] == "overkill" and per["functional"]["error"]["count"] == 1


def test_unknown_comes_first_and_nan_distance_is_unknown():
    point = dc.OperatingPoint(NAMES, DEFECTS, 0.5, 0.5)
    p, _ = probs_for([0.1, 0.9, 0.1], [1, 1, 1])
    assert dc.decide(point, 3.0, p, np.array([1.0, 5.0, np.nan])) == ["accept", "unknown", "unknown"]
    assert dc.decide(None, None, p, None) == ["", "", ""]
    assert dc.decide(None, 3.0, p, np.array([1.0, 5.0, 2.0])) == ["", "unknown", ""]


def test_stored_point_round_trips_and_refuses_other_classes():
    point = dc.OperatingPoint(NAMES, DEFECTS, 0.25, 0.75, {"fitted_on": "val"})
    again = dc.OperatingPoint.from_dict(point.to_dict(), NAMES)
    assert again == point
    with pytest.raises(ValueError, match="stored for classes"):
        dc.OperatingPoint.from_dict(point.to_dict(), ["a", "b", "c"])
    with pytest.raises(ValueError, match="thresholds"):
        dc.OperatingPoint.from_dict({**point.to_dict(), "accept_below": 0.9}, NAMES)
    with pytest.raises(ValueError, match="malformed"):
        dc.OperatingPoint.from_dict({"class_names": NAMES}, NAMES)


def test_defect_classes_must_be_classes_of_the_model():
    with pytest.raises(ValueError, match="'crack', not a class of this model"):
        dc.check_defect_classes(["crack"], NAMES, "decision.defect_classes")
    with pytest.raises(ValueError, match="every class"):
        dc.check_defect_classes(NAMES, NAMES, "decision.defect_classes")
