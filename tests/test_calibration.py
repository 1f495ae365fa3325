"""Temperature scaling: it recovers a known over- or under-confidence, lowers NLL and ECE,
never changes the winning class, and says when there is nothing (or too little) to fit."""

import numpy as np
import pytest

from synermix.calibration import T_MAX, T_MIN, fit_temperature, nll
from synermix.metrics import calibration, softmax


def calibrated_logits(n: int = 4000, k: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits whose softmax is the true label distribution (labels drawn from it): T = 1."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 1.6, size=(n, k))
    probs = softmax(logits)
    labels = np.array([rng.choice(k, p=p) for p in probs])
    return logits, labels


def test_nll_is_the_mean_log_loss():
    logits = np.array([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    labels = np.array([0, 2])
    p = softmax(logits)
    assert nll(logits, labels) == pytest.approx(-np.mean(np.log([p[0, 0], p[1, 2]])))
    assert nll(logits, labels, 2.0) == pytest.approx(nll(logits / 2.0, labels))


@pytest.mark.parametrize("scale", [4.0, 0.5])
def test_recovers_a_known_miscalibration(scale):
    """Logits ``scale`` times the calibrated ones: over-confident (4x) or under-confident
    (0.5x); the fitted T undoes it, NLL and ECE drop, the argmax is untouched."""
    base, labels = calibrated_logits()
    logits = base * scale
    fit = fit_temperature(logits, labels)
    assert fit.temperature == pytest.approx(scale, rel=0.08)
    assert not fit.at_bound and fit.images == len(labels)
    assert fit.nll_after < fit.nll_before - 0.02
    assert fit.nll_after == pytest.approx(nll(logits, labels, fit.temperature))
    # the minimum: a step either way costs NLL
    for step in (0.97, 1.03):
        assert nll(logits, labels, fit.temperature * step) > fit.nll_after
    ece_before, _ = calibration(softmax(logits), labels)
    ece_after, _ = calibration(softmax(logits / fit.temperature), labels)
    assert ece_after < ece_before / 2
    np.testing.assert_array_equal(softmax(logits / fit.temperature).argmax(1), logits.argmax(1))


def test_calibrated_logits_stay_near_one():
    logits, labels = calibrated_logits(seed=3)
    assert fit_temperature(logits, labels).temperature == pytest.approx(1.0, rel=0.08)


def test_a_fit_on_a_held_out_split_transfers():
    """Fitted on one half (val), the NLL of the other half (test) drops too."""
    base, labels = calibrated_logits(n=6000, seed=7)
    logits = base * 3.0
    fit = fit_temperature(logits[:3000], labels[:3000])
    assert nll(logits[3000:], labels[3000:], fit.temperature) < nll(logits[3000:], labels[3000:]) - 0.05


def test_nothing_to_fit_on_leaves_t_at_one_with_a_note():
    fit = fit_temperature(np.zeros((0, 3)), np.zeros(0, dtype=int))
    assert fit.temperature == 1.0 and "no images" in fit.note
    fit = fit_temperature(np.array([[np.inf, 0.0]]), np.array([0]))
    assert fit.temperature == 1.0 and "not all finite" in fit.note


def test_a_perfectly_separated_split_is_not_calibrated_and_chance_ends_at_the_bound():
    logits = np.array([[5.0, 0.0], [0.0, 5.0]] * 20)
    labels = np.array([0, 1] * 20)
    fit = fit_temperature(logits, labels)
    assert fit.temperature == 1.0 and "every image of the fit is right" in fit.note
    chance = fit_temperature(np.array([[1.0, 0.0], [1.0, 0.0]] * 20), np.array([0, 1] * 20))
    assert chance.at_bound and chance.temperature == pytest.approx(T_MAX, rel=1e-3)
    assert "almost no information" in chance.note
    assert T_MIN < 1.0
