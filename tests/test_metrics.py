"""Every metric of synermix.metrics against values worked out by hand on small arrays."""

import math

import numpy as np
import pytest

from synermix import metrics as m

# true    0 0 1 1 2
# pred    0 1 1 1 0
Y_TRUE = np.array([0, 0, 1, 1, 2])
Y_PRED = np.array([0, 1, 1, 1, 0])


def test_confusion_matrix_rows_are_true_classes():
    assert m.confusion_matrix(Y_TRUE, Y_PRED, 3).tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]


def test_confusion_matrix_refuses_out_of_range_labels():
    with pytest.raises(ValueError, match="labels must lie in"):
        m.confusion_matrix(np.array([0, 3]), np.array([0, 1]), 3)
    with pytest.raises(ValueError, match="2 labels but 1 predictions"):
        m.confusion_matrix(np.array([0, 1]), np.array([0]), 3)


def test_classification_scores_by_hand():
    s = m.classification_scores(m.confusion_matrix(Y_TRUE, Y_PRED, 3))
    assert s["images"] == 5
    assert s["accuracy"] == pytest.approx(3 / 5)
    # recall: 1/2, 2/2, 0/1; precision: 1/2, 2/3, 0 (nothing predicted as 2)
    assert s["per_class"]["recall"] == pytest.approx([0.5, 1.0, 0.0])
    assert s["per_class"]["precision"] == pytest.approx([0.5, 2 / 3, 0.0])
    # F1: 2*.5*.5/1 = .5; 2*(2/3)*1/(5/3) = .8; 0
    assert s["per_class"]["f1"] == pytest.approx([0.5, 0.8, 0.0])
    assert s["macro_recall"] == pytest.approx(0.5)
    assert s["macro_precision"] == pytest.approx((0.5 + 2 / 3) / 3)
    assert s["macro_f1"] == pytest.approx(1.3 / 3)
    # population std of (.5, 1, 0): sqrt(((0)^2 + .5^2 + .5^2) / 3)
    assert s["recall_std"] == pytest.approx(math.sqrt(1 / 6))
    assert (s["recall_min"], s["recall_max"], s["recall_spread"]) == (0.0, 1.0, 1.0)
    assert s["worst_class"] == 2 and s["per_class"]["support"] == [2, 2, 1]


def test_a_class_absent_from_the_split_is_not_scored_as_zero():
    s = m.classification_scores(m.confusion_matrix(Y_TRUE, Y_PRED, 4))
    assert math.isnan(s["per_class"]["recall"][3]) and math.isnan(s["per_class"]["f1"][3])
    assert s["macro_recall"] == pytest.approx(0.5) and s["classes_measured"] == 3
    assert s["recall_min"] == 0.0 and s["worst_class"] == 2


def test_calibration_error_by_hand():
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4], [0.5, 0.5]])
    y = np.array([0, 1, 1, 0, 1])
    # 2 bins. (0, .5]: the last sample, confidence .5, predicted 0, wrong -> |0 - .5| * 1/5
    # (.5, 1]: confidences .9 .8 .7 .6 (mean .75), 3 of 4 right (.75) -> 0
    ece, table = m.calibration(probs, y, bins=2)
    assert ece == pytest.approx(0.1)
    assert [row["images"] for row in table] == [1, 4]
    assert table[1]["confidence"] == pytest.approx(0.75) and table[1]["accuracy"] == pytest.approx(0.75)


def test_calibration_of_a_perfectly_calibrated_and_an_overconfident_model():
    sure_and_right = np.eye(3)[[0, 1, 2, 0]]
    assert m.calibration(sure_and_right, np.array([0, 1, 2, 0]), bins=10)[0] == pytest.approx(0.0)
    sure_and_wrong = np.eye(3)[[1, 2, 0, 1]]
    assert m.calibration(sure_and_wrong, np.array([0, 1, 2, 0]), bins=10)[0] == pytest.approx(1.0)


def test_softmax_rows_sum_to_one_and_survive_large_logits():
    p = m.softmax(np.array([[1000.0, 1000.0], [0.0, math.log(3.0)]]))
    assert p == pytest.approx(np.array([[0.5, 0.5], [0.25, 0.75]]))


# two classes on a line: class 0 at 0 and 2, class 1 at 10 and 12
LINE = np.array([[0.0], [2.0], [10.0], [12.0]])
LINE_Y = np.array([0, 0, 1, 1])


def test_feature_geometry_by_hand():
    g = m.feature_geometry(LINE, LINE_Y, 2)
    # mu_0 = 1, mu_1 = 11, mu = 6; T = (36 + 16 + 16 + 36) / 4 = 26; W_0 = W_1 = 1
    assert g["total_variance"] == pytest.approx(26.0)
    assert g["per_class"]["cohesion"] == pytest.approx([1.0, 1.0])
    assert g["per_class"]["cohesion_normalised"] == pytest.approx([1 / 26, 1 / 26])
    assert g["intra_class_variance"] == pytest.approx(1 / 26)
    # S_W = (2*1 + 2*1) / 4 = 1; S_B = (2*25 + 2*25) / 4 = 25; S_W + S_B = T
    assert g["within_fraction"] == pytest.approx(1 / 26)
    assert g["fisher_ratio"] == pytest.approx(25.0)
    assert g["centroid_distance_min"] == pytest.approx(10.0)
    assert g["centroid_distance_min_normalised"] == pytest.approx(10 / math.sqrt(26))
    assert np.asarray(g["centroid_distances"]) == pytest.approx(np.array([[0.0, 10.0], [10.0, 0.0]]))
    # silhouettes: x=0: a=2, b=11 -> 9/11; x=2: a=2, b=9 -> 7/9; symmetric for class 1
    assert g["silhouette"] == pytest.approx((9 / 11 + 7 / 9) / 2)
    assert g["per_class"]["silhouette"] == pytest.approx([(9 / 11 + 7 / 9) / 2] * 2)


def test_cohesion_is_averaged_per_class_not_per_image():
    # class 0: 4 points at 0 (W = 0); class 1: two points at 9 and 11 (W = 1)
    x = np.array([[0.0], [0.0], [0.0], [0.0], [9.0], [11.0]])
    y = np.array([0, 0, 0, 0, 1, 1])
    g = m.feature_geometry(x, y, 2)
    total = np.mean((x[:, 0] - x[:, 0].mean()) ** 2)
    assert g["intra_class_variance"] == pytest.approx((0 + 1 / total) / 2)
    assert g["within_fraction"] == pytest.approx((2 * 1 / 6) / total)


def test_geometry_of_identical_features_is_not_measurable():
    g = m.feature_geometry(np.ones((4, 3)), np.array([0, 0, 1, 1]), 2)
    assert g["total_variance"] == 0.0
    assert math.isnan(g["intra_class_variance"]) and math.isnan(g["within_fraction"])
    assert math.isnan(g["fisher_ratio"])


def test_silhouette_of_a_lone_sample_is_zero_and_one_class_is_undefined():
    x = np.array([[0.0, 0.0], [0.0, 1.0], [5.0, 5.0]])
    s = m.silhouette(x, np.array([0, 0, 1]), 2)
    # x0: a = 1, b = sqrt(50); x1: a = 1, b = sqrt(41)
    assert s == pytest.approx([1 - 1 / math.sqrt(50), 1 - 1 / math.sqrt(41), 0.0])
    assert np.isnan(m.silhouette(x, np.array([0, 0, 0]), 2)).all()


def test_silhouette_in_chunks_equals_one_pass_and_scikit_learn():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(57, 5)) + np.repeat(np.eye(3, 5) * 3, 19, axis=0)
    y = np.repeat([0, 1, 2], 19)
    whole = m.silhouette(x, y, 3, chunk=1000)
    assert m.silhouette(x, y, 3, chunk=4) == pytest.approx(whole)
    sklearn = pytest.importorskip("sklearn.metrics")
    assert whole == pytest.approx(sklearn.silhouette_samples(x, y))


def test_mcnemar_exact_by_hand():
    a = np.array([True, True, True, False, False])
    b = np.array([False, False, True, True, False])
    result = m.mcnemar_exact(a, b)
    # 2 right only by a, 1 only by b: p = 2 * (C(3,0) + C(3,1)) / 2^3 = 1
    assert (result.images, result.only_a_right, result.only_b_right) == (5, 2, 1)
    assert result.p_value == pytest.approx(1.0)
    five_to_none = m.mcnemar_exact(np.ones(8, bool), np.array([False] * 5 + [True] * 3))
    assert five_to_none.p_value == pytest.approx(2 / 32)
    assert m.mcnemar_exact(np.ones(3, bool), np.ones(3, bool)).p_value == 1.0


def test_projection_keeps_the_main_axis_and_is_deterministic():
    x = np.array([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0], [3.0, 0.0]])
    points, share = m.project_2d(x)
    assert share == pytest.approx((1.0, 0.0))
    assert points[:, 0] == pytest.approx([-1.5, -0.5, 0.5, 1.5])  # sign fixed: loading positive
    again, _ = m.project_2d(-x)
    assert again[:, 0] == pytest.approx(-points[:, 0])  # mirrored data, same axis orientation


def test_wilson_interval_by_hand():
    # 8 of 10, z = 1.96: centre (0.8 + 0.19208) / 1.38416 = 0.716776; half 0.226737... / 1.38416
    low, high = m.wilson_interval(8, 10, z=1.96)
    centre = (0.8 + 1.96**2 / 20) / (1 + 1.96**2 / 10)
    half = 1.96 * math.sqrt(0.8 * 0.2 / 10 + 1.96**2 / 400) / (1 + 1.96**2 / 10)
    assert (low, high) == pytest.approx((centre - half, centre + half))
    assert (low, high) == pytest.approx((0.4902, 0.9433), abs=1e-4)  # the textbook values
    assert m.wilson_interval(10, 10)[1] == pytest.approx(1.0) and m.wilson_interval(0, 10)[
        0
    ] == pytest.approx(0.0)
    assert all(math.isnan(v) for v in m.wilson_interval(0, 0))
    s = m.classification_scores(m.confusion_matrix(Y_TRUE, Y_PRED, 3))
    assert (s["accuracy_ci95_low"], s["accuracy_ci95_high"]) == pytest.approx(m.wilson_interval(3, 5))


def test_confusion_figure_is_row_normalised_in_the_classes_own_order():
    """The confusion PNG shows each actual class's row as shares (a class without test images
    stays 0, not NaN), in data.classes' order, ELPV's from sound to defective, else the model's."""
    from synermix.eval_report import display_order, row_shares

    shares = row_shares(np.array([[3, 1], [0, 0]]))
    assert shares.tolist() == [[0.75, 0.25], [0.0, 0.0]]
    model = ["defective", "functional", "likely_defective", "possibly_defective"]
    assert display_order(model, [], "elpv") == [
        "functional",
        "possibly_defective",
        "likely_defective",
        "defective",
    ]
    assert display_order(["a", "b"], ["b", "a"], "folder") == ["b", "a"]
    assert display_order(["a", "b"], [], "folder") == ["a", "b"]
    assert display_order(["a", "b"], [], "elpv") == ["a", "b"]  # not ELPV's classes: the model's
