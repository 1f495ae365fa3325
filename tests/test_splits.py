from collections import Counter

import pytest

from synermix.data.splits import assign_splits, split_targets

RATIOS = {"train": 0.7, "val": 0.15, "test": 0.15}


def dataset(counts: dict[str, int]):
    labels, keys = [], []
    for label, n in counts.items():
        for i in range(n):
            labels.append(label)
            keys.append(f"{label}-{i}")
    return labels, keys


def test_same_seed_same_split_and_other_seed_differs():
    labels, keys = dataset({"a": 100, "b": 40})
    first = assign_splits(labels, keys, RATIOS, seed=1)
    assert first == assign_splits(labels, keys, RATIOS, seed=1)
    assert first != assign_splits(labels, keys, RATIOS, seed=2)


def test_stratified_counts_per_class():
    labels, keys = dataset({"a": 100, "b": 40, "c": 7})
    splits = assign_splits(labels, keys, RATIOS, seed=3)
    counts = Counter(zip(labels, splits, strict=True))
    assert (counts["a", "train"], counts["a", "val"], counts["a", "test"]) == (70, 15, 15)
    assert (counts["b", "train"], counts["b", "val"], counts["b", "test"]) == (28, 6, 6)
    assert (counts["c", "train"], counts["c", "val"], counts["c", "test"]) == (5, 1, 1)


def test_input_order_does_not_matter():
    labels, keys = dataset({"a": 30, "b": 30})
    splits = dict(zip(keys, assign_splits(labels, keys, RATIOS, seed=4), strict=True))
    rev = dict(zip(keys[::-1], assign_splits(labels[::-1], keys[::-1], RATIOS, seed=4), strict=True))
    assert splits == rev


def test_adding_a_class_leaves_other_classes_alone():
    labels, keys = dataset({"a": 50, "b": 30})
    before = dict(zip(keys, assign_splits(labels, keys, RATIOS, seed=5), strict=True))
    labels2, keys2 = dataset({"a": 50, "b": 30, "new": 20})
    after = dict(zip(keys2, assign_splits(labels2, keys2, RATIOS, seed=5), strict=True))
    assert all(after[k] == v for k, v in before.items())


def test_equal_content_never_straddles_splits():
    labels, keys = dataset({"a": 60, "b": 60})
    keys = [k if i % 3 else "shared-" + str(i % 9) for i, k in enumerate(keys)]  # many duplicates
    splits = assign_splits(labels, keys, RATIOS, seed=6)
    by_key: dict[str, set[str]] = {}
    for key, split in zip(keys, splits, strict=True):
        by_key.setdefault(key, set()).add(split)
    assert all(len(s) == 1 for s in by_key.values())


def test_same_picture_in_two_classes_lands_in_one_split():
    labels = ["a", "b", "a", "b"] + ["a"] * 10 + ["b"] * 10
    keys = ["dup", "dup", "x", "y"] + [f"a{i}" for i in range(10)] + [f"b{i}" for i in range(10)]
    splits = assign_splits(labels, keys, RATIOS, seed=7)
    assert splits[0] == splits[1]


@pytest.mark.parametrize(
    ("n", "expected"),
    [(0, (0, 0, 0)), (1, (1, 0, 0)), (2, (2, 0, 0)), (3, (1, 1, 1)), (10, (7, 2, 1)), (100, (70, 15, 15))],
)
def test_targets_for_small_classes(n, expected):
    t = split_targets(n, RATIOS)
    assert (t["train"], t["val"], t["test"]) == expected


def test_targets_keep_a_training_image_with_extreme_ratios():
    t = split_targets(4, {"train": 0.1, "val": 0.45, "test": 0.45})
    assert t["train"] >= 1 and sum(t.values()) == 4


def test_a_group_of_copies_never_overshoots_test_or_val():
    # 12 pictures of one class, 5 of them the same picture: test/val targets are 2 each
    labels = ["a"] * 12
    keys = ["dup"] * 5 + [f"u{i}" for i in range(7)]
    for seed in range(50):
        splits = assign_splits(labels, keys, RATIOS, seed)
        counts = Counter(splits)
        assert counts["test"] <= 2 and counts["val"] <= 2, (seed, counts)
        assert len({s for s, k in zip(splits, keys, strict=True) if k == "dup"}) == 1
