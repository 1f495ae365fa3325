"""Deterministic, stratified, leakage-free train/val/test split.

Images are first grouped by content hash (the same picture, whatever its file name or
encoding, is one group); a group never straddles two splits. Within each class the
groups are shuffled by a generator seeded from ``(seed, class name)``, so adding a class
never reshuffles the others, and filled into test, then val, then train until each split
holds its share of the class; a group of copies that would overshoot the test or val
share goes to train. A class of at least three distinct pictures gets at least one in
every split.
"""

from __future__ import annotations

import math
import zlib
from collections import defaultdict
from collections.abc import Mapping, Sequence

import numpy as np

SPLITS = ("train", "val", "test")


def class_rng(seed: int, label: str) -> np.random.Generator:
    """A generator for one class: independent of the other classes present."""
    return np.random.default_rng([seed, zlib.crc32(label.encode("utf-8"))])


def split_targets(n: int, ratios: Mapping[str, float]) -> dict[str, int]:
    """How many of ``n`` images each split gets: largest-remainder rounding of ``n * ratio``.

    With three or more images every split gets at least one; train always keeps one.
    """
    exact = {s: n * ratios[s] for s in SPLITS}
    counts = {s: math.floor(exact[s] + 1e-9) for s in SPLITS}
    by_remainder = sorted(SPLITS, key=lambda s: (-(exact[s] - counts[s]), SPLITS.index(s)))
    for split in by_remainder[: n - sum(counts.values())]:
        counts[split] += 1
    needs_one = ("train", "val", "test") if n >= 3 else ("train",) if n else ()
    for split in needs_one:
        if counts[split] == 0:
            donor = max(SPLITS, key=lambda s: counts[s])
            counts[donor] -= 1
            counts[split] += 1
    return counts


def assign_splits(
    labels: Sequence[str],
    group_keys: Sequence[str],
    ratios: Mapping[str, float],
    seed: int,
) -> list[str]:
    """Return a split name for each row.

    ``group_keys`` ties rows that must stay together (content hashes). A group whose rows
    carry different labels is stratified under its alphabetically first label.
    """
    if len(labels) != len(group_keys):
        raise ValueError("labels and group_keys must have the same length")
    members: dict[str, list[int]] = defaultdict(list)
    for row, key in enumerate(group_keys):
        members[key].append(row)
    by_class: dict[str, list[str]] = defaultdict(list)
    for key, rows in members.items():
        by_class[min(labels[r] for r in rows)].append(key)

    result = [""] * len(labels)
    for label in sorted(by_class):
        keys = sorted(by_class[label])
        order = class_rng(seed, label).permutation(len(keys))
        n = sum(len(members[k]) for k in keys)
        targets = split_targets(n, ratios)
        filled = dict.fromkeys(SPLITS, 0)
        for index in order:
            key = keys[index]
            size = len(members[key])
            # fill test, then val; a group of copies that would overshoot goes to train
            split = next((s for s in ("test", "val") if filled[s] + size <= targets[s]), "train")
            filled[split] += len(members[key])
            for row in members[key]:
                result[row] = split
    return result
