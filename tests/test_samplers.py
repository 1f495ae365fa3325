from collections import Counter

import pytest

from synermix.data.samplers import ClassPairBatchSampler

LABELS = [0] * 23 + [1] * 9 + [2] * 3 + [3] * 1  # class 3 has one sample in the whole set


def batches(sampler):
    return [list(b) for b in sampler]


def test_every_class_present_has_two_samples():
    sampler = ClassPairBatchSampler(LABELS, batch_size=5, seed=0)
    for _ in range(10):  # several epochs
        for batch in batches(sampler):
            counts = Counter(LABELS[i] for i in batch)
            for label, count in counts.items():
                assert count >= 2 or label == 3, (batch, counts)


def test_each_epoch_covers_every_sample_once_before_additions():
    sampler = ClassPairBatchSampler(LABELS, batch_size=8, seed=1)
    epoch = batches(sampler)
    assert len(epoch) == len(sampler) == 5
    base = []
    for batch in epoch:
        base += batch[:8] if len(base) + 8 <= len(LABELS) else batch[: len(LABELS) - len(base)]
    assert sorted(base) == list(range(len(LABELS)))


def test_added_partner_is_distinct_and_of_the_same_class():
    sampler = ClassPairBatchSampler(LABELS, batch_size=4, seed=2)
    for batch in batches(sampler):
        head, extra = batch[:4], batch[4:]
        for partner in extra:
            assert LABELS[partner] in {LABELS[i] for i in head}
        assert len(set(batch)) == len(batch)


def test_seeded_and_resumable():
    a = ClassPairBatchSampler(LABELS, 6, seed=3)
    b = ClassPairBatchSampler(LABELS, 6, seed=3)
    assert batches(a) == batches(b)
    state = a.state_dict()
    next_epoch = batches(a)
    c = ClassPairBatchSampler(LABELS, 6, seed=99)
    c.load_state_dict(state)
    assert batches(c) == next_epoch
    assert batches(ClassPairBatchSampler(LABELS, 6, seed=4)) != batches(
        ClassPairBatchSampler(LABELS, 6, seed=3)
    )


def test_batch_size_must_allow_pairs():
    with pytest.raises(ValueError):
        ClassPairBatchSampler(LABELS, 1, seed=0)
