"""Batch sampling that keeps SynerMix's intra-class term meaningful.

A class with a single sample in a batch gives a trivial synthetic feature (its weight is
1). :class:`ClassPairBatchSampler` follows the reference code: it shuffles the training
set, cuts it into batches, and for every class that appears exactly once in a batch
appends one more, distinct, randomly chosen sample of that class (so a batch may grow
beyond ``batch_size``). Every training method uses it, baselines included, so
comparisons stay fair.

Class-balanced sampling (``train.sampling: balanced``) changes only which images make up
an epoch: as many draws as there are images, the class of each draw chosen with
probability ``p_c = n_c**(1 - power) / sum_k n_k**(1 - power)`` (``power`` 1: every class
equally often; 0: as in the data), the image within its class taken from a reshuffled
cycle through the class so repeats are spread out. The pair guarantee is applied after,
exactly as for the plain shuffle.

Under ``torchrun`` (several processes, one model replica each), :class:`RankBatchSampler`
gives each rank its share of the same global batches: every rank draws the whole epoch
with the same seeded generator, so the global batch is the single-process one, and keeps
the part :func:`share_batch` assigns to it. Each class's images are split evenly across the
ranks in runs of at least two, so every rank's batch has about the whole batch's class mix
(its BatchNorm statistics and MixUp partners look like one process's) and keeps the pair
guarantee, and SynerMix-Intra synthesises each class per rank from that rank's images.
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

    def __init__(
        self, labels: Sequence[int], batch_size: int, seed: int, balance_power: float | None = None
    ) -> None:
        if batch_size < 2:
            raise ValueError("batch_size must be at least 2")
        if balance_power is not None and not 0.0 <= balance_power <= 1.0:
            raise ValueError("balance_power must be in [0, 1]")
        self.labels = [int(y) for y in labels]
        self.batch_size = batch_size
        self.balance_power = balance_power
        self.generator = torch.Generator().manual_seed(seed)
        self.by_class: dict[int, list[int]] = {}
        for index, label in enumerate(self.labels):
            self.by_class.setdefault(label, []).append(index)
        self.classes = sorted(self.by_class)

    def class_probabilities(self) -> dict[int, float]:
        """The probability of each class per draw (the data's frequencies when not balanced)."""
        counts = {c: len(self.by_class[c]) for c in self.classes}
        power = 0.0 if self.balance_power is None else self.balance_power
        mass = {c: n ** (1.0 - power) for c, n in counts.items()}
        total = sum(mass.values())
        return {c: m / total for c, m in mass.items()}

    def epoch_order(self) -> list[int]:
        """One epoch's order of image indices (drawn from the sampler's generator)."""
        if self.balance_power is None:
            return torch.randperm(len(self.labels), generator=self.generator).tolist()
        probs = self.class_probabilities()
        weights = torch.tensor([probs[c] for c in self.classes], dtype=torch.float64)
        draws = torch.multinomial(weights, len(self.labels), replacement=True, generator=self.generator)
        cycles: dict[int, list[int]] = {c: [] for c in self.classes}
        order = []
        for k in draws.tolist():
            c = self.classes[k]
            if not cycles[c]:
                members = self.by_class[c]
                cycles[c] = [members[i] for i in torch.randperm(len(members), generator=self.generator)]
            order.append(cycles[c].pop())
        return order

    def __len__(self) -> int:
        return (len(self.labels) + self.batch_size - 1) // self.batch_size

    def _partner(self, index: int) -> int | None:
        members = self.by_class[self.labels[index]]
        if len(members) < 2:
            return None
        pick = int(torch.randint(len(members) - 1, (1,), generator=self.generator))
        position = members.index(index)
        return members[pick + 1 if pick >= position else pick]

    def with_pairs(self, batch: list[int]) -> list[int]:
        """``batch`` and, for every class in it with a single distinct image, one more
        image of that class (drawn from the sampler's generator)."""
        # distinct images per class: a balanced epoch may draw one image twice
        members: dict[int, set[int]] = {}
        for index in batch:
            members.setdefault(self.labels[index], set()).add(index)
        extra = []
        for index in batch:
            if members[self.labels[index]] == {index}:
                partner = self._partner(index)
                if partner is not None:
                    extra.append(partner)
                    members[self.labels[index]].add(partner)
        return batch + extra

    def __iter__(self) -> Iterator[list[int]]:
        order = self.epoch_order()
        for start in range(0, len(order), self.batch_size):
            yield self.with_pairs(order[start : start + self.batch_size])

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])


def share_batch(batch: Sequence[int], labels: Sequence[int], world_size: int) -> list[list[int]]:
    """``batch`` cut into ``world_size`` disjoint, non-empty shares with the same class mix.

    Each class's images in ``batch`` are split into ``min(world_size, n // 2)`` near-equal
    runs (so every run has at least two images; a class with one image in the whole
    dataset is a run of one), and the runs go, largest first, to the share with the fewest
    images that has none of that class yet (ties: the lower rank). Deterministic: every
    rank computes the same cut. A batch with fewer runs than ranks is a ``ValueError``
    (three images per rank always give enough)."""
    groups: dict[int, list[int]] = {}
    for index in batch:
        groups.setdefault(int(labels[index]), []).append(index)
    runs: list[tuple[int, list[int]]] = []
    for label, members in groups.items():
        count = max(1, min(world_size, len(members) // 2))
        size, extra = divmod(len(members), count)
        start = 0
        for k in range(count):
            stop = start + size + (k < extra)
            runs.append((label, members[start:stop]))
            start = stop
    if len(runs) < world_size:
        raise ValueError(
            f"a batch of {len(batch)} images in {len(groups)} class(es) cannot give each of "
            f"{world_size} ranks two images of a class"
        )
    shares: list[list[int]] = [[] for _ in range(world_size)]
    held: list[set[int]] = [set() for _ in range(world_size)]
    for label, run in sorted(runs, key=lambda item: len(item[1]), reverse=True):  # stable
        target = min(
            (r for r in range(world_size) if label not in held[r]), key=lambda r: (len(shares[r]), r)
        )
        shares[target].extend(run)
        held[target].add(label)
    return shares


class RankBatchSampler(Sampler[list[int]]):
    """Rank ``rank`` of ``world_size``'s shares of :class:`ClassPairBatchSampler`'s batches.

    Every rank runs the same seeded sampler, so all agree on each global batch and the
    shares of one batch are disjoint and cover it. A last, short batch of fewer than
    ``3 * world_size`` images (which may not split into ``world_size`` shares) is joined
    to the one before, so every rank takes the same number of steps: :meth:`__len__`."""

    def __init__(
        self,
        labels: Sequence[int],
        batch_size: int,
        seed: int,
        rank: int,
        world_size: int,
        balance_power: float | None = None,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        if batch_size < 3 * world_size:
            raise ValueError(
                f"batch_size {batch_size} is too small for {world_size} processes: at least "
                f"{3 * world_size} (three images per process) are needed"
            )
        self.inner = ClassPairBatchSampler(labels, batch_size, seed, balance_power)
        self.rank, self.world_size = rank, world_size

    def _cuts(self) -> list[tuple[int, int]]:
        n, size = len(self.inner.labels), self.inner.batch_size
        cuts = [(start, min(start + size, n)) for start in range(0, n, size)]
        if len(cuts) > 1 and cuts[-1][1] - cuts[-1][0] < 3 * self.world_size:
            cuts[-2:] = [(cuts[-2][0], n)]
        return cuts

    def __len__(self) -> int:
        return len(self._cuts())

    def __iter__(self) -> Iterator[list[int]]:
        order = self.inner.epoch_order()
        for start, stop in self._cuts():
            batch = self.inner.with_pairs(order[start:stop])
            yield share_batch(batch, self.inner.labels, self.world_size)[self.rank]

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state)
