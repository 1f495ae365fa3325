"""The drift statistics on constructed data: no drift gives high p-values, a shift low ones;
the MMD estimate equals its formula written out; the window check's Bonferroni threshold,
slices and refusals."""

from __future__ import annotations

import numpy as np
import pytest

from synermix import drift
from synermix.config import MonitorParams
from synermix.errors import UserError
from synermix.monitor import Window, check_window, select_window
from synermix.profile import ReferenceProfile

CLASSES = ["crack", "ok", "scratch"]


def test_ks_and_psi_tell_a_shift_from_another_sample_of_the_same():
    rng = np.random.default_rng(0)
    ref = rng.normal(100, 10, 2000)
    same = rng.normal(100, 10, 200)
    darker = rng.normal(80, 10, 200)
    assert drift.ks_test(ref, same)[1] > 0.05
    assert drift.ks_test(ref, darker)[1] < 1e-6
    assert drift.psi(ref, same) < 0.1 < 0.25 < drift.psi(ref, darker)
    # one camera's fixed size: two constant samples of one value are the same
    assert drift.ks_test(np.full(10, 300.0), np.full(5, 300.0)) == (0.0, 1.0)
    assert drift.ks_test(np.full(10, 300.0), np.full(5, 240.0))[1] < 0.01


def test_prediction_mix_test_counts_the_reference_as_a_sample():
    _, p, tvd = drift.mix_test(np.array([200, 100, 100]), np.array([100, 50, 50]))
    assert p > 0.99 and tvd == pytest.approx(0.0)
    _, p, tvd = drift.mix_test(np.array([200, 100, 100]), np.array([20, 130, 50]))
    assert p < 1e-6 and tvd > 0.3
    # a class nobody predicted is left out; one class in all is no evidence either way
    assert drift.mix_test(np.array([10, 0, 0]), np.array([5, 0, 0]))[1] == 1.0


def _mmd2_by_loops(x: np.ndarray, y: np.ndarray, bandwidth: float) -> float:
    def k(a, b):
        return np.exp(-((a - b) ** 2).sum() / (2 * bandwidth**2))

    n, m = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(n) for j in range(m)) / (n * m)
    return xx + yy - 2 * xy


def test_mmd_is_the_unbiased_estimate_and_its_permutation_test_separates():
    rng = np.random.default_rng(1)
    x = rng.normal(0, 1, (30, 4))
    y = rng.normal(0.5, 1, (20, 4))
    observed, _ = drift.mmd_test(x, y, 1.7, permutations=19)
    assert observed == pytest.approx(_mmd2_by_loops(x, y, 1.7), rel=1e-9)

    ref = rng.normal(0, 1, (300, 8))
    bandwidth = drift.median_bandwidth(ref)
    same = rng.normal(0, 1, (150, 8))
    moved = rng.normal(0, 1, (150, 8)) + np.r_[0.6, np.zeros(7)]
    assert drift.mmd_test(ref, same, bandwidth, 200, seed=3)[1] > 0.05
    assert drift.mmd_test(ref, moved, bandwidth, 200, seed=3)[1] <= 1 / 201 + 1e-12
    # seeded: the same call gives the same p-value
    assert drift.mmd_test(ref, same, bandwidth, 200, seed=3) == drift.mmd_test(
        ref, same, bandwidth, 200, seed=3
    )


def test_image_statistics_see_darkening_and_blur():
    from PIL import Image, ImageFilter

    rng = np.random.default_rng(2)
    pixels = rng.integers(30, 220, (64, 64), dtype=np.uint8)
    base = drift.image_statistics(pixels[:, :, None], 300, 200)
    dark = drift.image_statistics((pixels * 0.7).astype(np.uint8)[:, :, None], 300, 200)
    blurred = np.asarray(Image.fromarray(pixels).filter(ImageFilter.GaussianBlur(2)))[:, :, None]
    blur = drift.image_statistics(blurred, 300, 200)
    assert set(base) == set(drift.IMAGE_STATISTICS)
    assert dark["mean"] == pytest.approx(base["mean"] * 0.7, rel=0.02)
    assert blur["sharpness"] < base["sharpness"] / 10
    assert (base["width"], base["height"]) == (300.0, 200.0)


def test_class_shift_is_in_units_of_the_reference_spread():
    rng = np.random.default_rng(4)
    ref = np.concatenate([rng.normal(0, 1, (100, 3)), rng.normal(5, 1, (100, 3))])
    ref_y = np.r_[np.zeros(100, int), np.ones(100, int)]
    win = np.concatenate([rng.normal(0, 1, (50, 3)), rng.normal(5, 1, (50, 3)) + np.array([3.0, 0, 0])])
    shift = drift.class_shift(ref, ref_y, win, ref_y[::2], ["a", "b", "c"], min_images=20)
    assert set(shift) == {"a", "b"}  # c: no window image
    assert shift["a"]["centroid_shift"] < 0.5
    # a class spread of sqrt(3) (3 unit-variance dimensions): a move of 3 is about 1.7 spreads
    assert shift["b"]["centroid_shift"] == pytest.approx(3 / np.sqrt(3), rel=0.25)


def synthetic_profile(rng: np.random.Generator, n: int = 300) -> ReferenceProfile:
    predicted = rng.integers(0, 3, n)
    return ReferenceProfile(
        weights_sha256="ab" * 32,
        class_names=CLASSES,
        statistics={
            "mean": rng.normal(120, 8, 2 * n),
            "std": rng.normal(30, 3, 2 * n),
            "sharpness": rng.gamma(5, 20, 2 * n),
            "width": np.full(2 * n, 300.0),
            "height": np.full(2 * n, 300.0),
        },
        embeddings=rng.normal(0, 1, (n, 4)) + predicted[:, None],
        predicted=predicted,
        decisions={"accept": n},
        bandwidth=2.0,
    )


def records(rng: np.random.Generator, n: int, dark: float = 1.0, camera: str | None = None) -> list[dict]:
    out = []
    for i in range(n):
        c = int(rng.integers(0, 3))
        out.append(
            {
                "at": f"2026-12-04T00:00:{i:05d}",
                "weights_sha256": "ab" * 32,
                "class": CLASSES[c],
                "decision": "accept",
                "stats": {
                    "mean": float(rng.normal(120, 8) * dark),
                    "std": float(rng.normal(30, 3)),
                    "sharpness": float(rng.gamma(5, 20)),
                    "width": 300.0,
                    "height": 300.0,
                },
                "embedding": list(rng.normal(0, 1, 4) + c),
                "slices": {"camera": camera} if camera else {},
            }
        )
    return out


def test_window_check_bonferroni_slices_and_alarms():
    rng = np.random.default_rng(5)
    profile = synthetic_profile(rng)
    settings = MonitorParams(min_records=40, window=400)
    calm = check_window(
        profile, Window(records(rng, 60, camera="A") + records(rng, 20, camera="B")), settings
    )
    assert calm["drift"] is False and calm["alarms"] == []
    assert [s["slice"] for s in calm["slices"]] == ["all", "camera=A"]  # B: 20 records, under 40
    assert any("camera=B" in n for n in calm["notes"])
    # width and height are one constant in both: not tested (nor counted)
    per_slice = {t["test"] for t in calm["slices"][0]["tests"]}
    assert not any("width" in t or "height" in t for t in per_slice) and len(per_slice) == 5
    assert calm["tests"] == 10 and calm["threshold"] == pytest.approx(0.05 / 10)

    shifted = check_window(profile, Window(records(rng, 100, dark=0.7)), settings)
    assert shifted["drift"] is True
    assert any("image mean" in a for a in shifted["alarms"])


def test_constructed_unchanged_windows_rarely_alarm():
    rng = np.random.default_rng(6)
    profile = synthetic_profile(rng)
    settings = MonitorParams(min_records=50, window=200, permutations=99)
    alarms = sum(
        check_window(profile, Window(records(rng, 100)), settings, seed=i)["drift"] for i in range(30)
    )
    assert alarms <= 3  # alpha 0.05 over 30 windows: 1.5 expected, Bonferroni makes it fewer


def test_window_refusals_name_the_fix():
    rng = np.random.default_rng(7)
    profile = synthetic_profile(rng)
    with pytest.raises(UserError, match="at least 50"):
        check_window(profile, Window(records(rng, 10)), MonitorParams())
    others = records(rng, 60)
    for r in others:
        r["weights_sha256"] = "cd" * 32
    with pytest.raises(UserError, match="give the profile of the model that served them"):
        select_window(others, profile, 200)
    mixed = select_window(others + records(rng, 70), profile, 50)
    assert len(mixed.records) == 50 and mixed.other_model == 60


def test_an_image_statistic_alarms_only_when_its_shift_also_matters():
    rng = np.random.default_rng(8)
    profile = synthetic_profile(rng, n=1000)
    window = records(rng, 1000)
    for r in window:
        r["stats"]["mean"] += 1.5  # a fifth of a standard deviation: significant, small
    strict = check_window(profile, Window(window), MonitorParams(window=1000, min_psi=0.0, permutations=99))
    [mean] = [t for t in strict["slices"][0]["tests"] if t["test"] == "image mean (KS)"]
    assert mean["p_value"] < strict["threshold"] and mean["effect"] < 0.1 and mean["alarm"]
    default = check_window(profile, Window(window), MonitorParams(window=1000, permutations=99))
    [mean] = [t for t in default["slices"][0]["tests"] if t["test"] == "image mean (KS)"]
    assert not mean["alarm"] and not default["drift"]
