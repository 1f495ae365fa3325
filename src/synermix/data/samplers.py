"""Batch sampling that keeps SynerMix's intra-class term meaningful.

A class with a single sample in a batch gives a trivial synthetic feature (its weight is
1). :class:`ClassPairBatchSampler` follows the reference code: it shuffles the training
set, cuts it into batches, and for every class that appears exactly once in a batch
appends one more, distinct, randomly chosen sample of that class (so a batch may grow
beyond ``batch_size``). Every training method uses it, baselines included, so
comparisons stay fair.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import Sampler


class ClassPairBatchSampler(Sampler[list[int]]):
    """Shuffled batches in which every class present has at least two samples.

    (Unless the class has a single sample in the whole dataset.) The random source is an
    explicit, seeded ``torch.Generator`` whose state is part of :meth:`state_dict`.
    """

    def __init__(self, labels: Sequence[int], batch_size: int, seed: int) -> None:
        if batch_size < 2:
            raise ValueError("batch_size must be at least 2")
        self.labels = [int(y) for y in labels]
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.by_class: dict[int, list[int]] = {}
        for index, label in enumerate(self.labels):
            self.by_class.setdefault(label, []).append(index)

    def __len__(self) -> int:
        return (len(self.labels) + self.batch_size - 1) // self.batch_size

    def _partner(self, index: int) -> int | None:
        members = self.by_class[self.labels[index]]
        if len(members) < 2:
            return None
        pick = int(torch.randint(len(members) - 1, (1,), generator=self.generator))
        position = members.index(index)
        return members[pick + 1 if pick >= position else pick]

    def __iter__(self) -> Iterator[list[int]]:
        order = torch.randperm(len(self.labels), generator=self.generator).tolist()
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            counts: dict[int, int] = {}
            for index in batch:
                counts[self.labels[index]] = counts.get(self.labels[index], 0) + 1
            extra = []
            for index in batch:
                if counts[self.labels[index]] == 1:
                    partner = self._partner(index)
                    if partner is not None:
                        extra.append(partner)
            yield batch + extra

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
