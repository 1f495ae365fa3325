from collections import Counter

import pytest

from synermix.data.samplers import ClassPairBatchSampler, RankBatchSampler, share_batch

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


# -- class-balanced sampling ------------------------------------------------------------
BALANCE_LABELS = [0] * 200 + [1] * 50 + [2] * 10 + [3] * 4


@pytest.mark.parametrize("power", [1.0, 0.5])
def test_balanced_sampling_keeps_two_distinct_images_per_class(power):
    sampler = ClassPairBatchSampler(BALANCE_LABELS, batch_size=16, seed=5, balance_power=power)
    for _ in range(5):
        for batch in batches(sampler):
            distinct: dict[int, set[int]] = {}
            for i in batch:
                distinct.setdefault(BALANCE_LABELS[i], set()).add(i)
            for label, images in distinct.items():
                assert len(images) >= 2, (label, batch)


@pytest.mark.parametrize("power", [1.0, 0.5, 0.0])
def test_balanced_sampling_draws_the_expected_class_frequencies(power):
    sampler = ClassPairBatchSampler(BALANCE_LABELS, batch_size=32, seed=6, balance_power=power)
    sizes = [200, 50, 10, 4]
    draws = Counter()
    for _ in range(40):
        # the first batch_size entries of each batch are the epoch's draws; the rest are
        # pair partners
        seen = 0
        for batch in batches(sampler):
            head = batch[: min(32, len(BALANCE_LABELS) - seen)]
            seen += len(head)
            draws.update(BALANCE_LABELS[i] for i in head)
    total = sum(draws.values())
    mass = [n ** (1 - power) for n in sizes]
    for label, n in enumerate(sizes):
        expected = mass[label] / sum(mass)
        assert draws[label] / total == pytest.approx(expected, abs=0.015), (label, n, draws)
    probs = sampler.class_probabilities()
    assert sum(probs.values()) == pytest.approx(1.0)
    assert probs[3] == pytest.approx(mass[3] / sum(mass))


def test_balanced_epoch_has_the_dataset_length_and_spreads_repeats():
    sampler = ClassPairBatchSampler(BALANCE_LABELS, batch_size=16, seed=7, balance_power=1.0)
    epoch = batches(sampler)
    assert len(epoch) == len(sampler)
    drawn: list[int] = []
    for batch in epoch:  # the draws, without the pair partners appended after them
        drawn += batch[: min(16, len(BALANCE_LABELS) - len(drawn))]
    assert len(drawn) == len(BALANCE_LABELS)
    # class 3 (4 images) is drawn ~66 times: a reshuffled cycle uses each image 16-17 times
    use = Counter(i for i in drawn if BALANCE_LABELS[i] == 3)
    assert max(use.values()) - min(use.values()) <= 1


def test_balanced_sampling_is_seeded_and_resumable():
    a = ClassPairBatchSampler(BALANCE_LABELS, 16, seed=8, balance_power=0.5)
    b = ClassPairBatchSampler(BALANCE_LABELS, 16, seed=8, balance_power=0.5)
    assert batches(a) == batches(b)
    state = a.state_dict()
    following = batches(a)
    c = ClassPairBatchSampler(BALANCE_LABELS, 16, seed=0, balance_power=0.5)
    c.load_state_dict(state)
    assert batches(c) == following


def test_balance_power_out_of_range():
    with pytest.raises(ValueError):
        ClassPairBatchSampler(BALANCE_LABELS, 16, seed=0, balance_power=1.5)


# -- several processes (torchrun): each rank's share of the same global batches ---------


def rank_epochs(labels, batch_size, seed, world_size, epochs, balance_power=None):
    """Per epoch, per step: the shares of every rank (one sampler per rank, as under torchrun)."""
    samplers = [
        RankBatchSampler(labels, batch_size, seed, rank, world_size, balance_power)
        for rank in range(world_size)
    ]
    assert len({len(s) for s in samplers}) == 1
    out = []
    for _ in range(epochs):
        per_rank = [batches(s) for s in samplers]
        assert all(len(steps) == len(samplers[0]) for steps in per_rank)
        out.append(list(zip(*per_rank, strict=True)))
    return out


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("balance_power", [None, 1.0])
def test_ranks_share_the_single_process_batches_disjointly_and_keep_pairs(world_size, balance_power):
    # 36 images in batches of 9 (no short last batch): the global batches are the
    # single-process ones, epoch after epoch
    single = ClassPairBatchSampler(LABELS, 9, seed=5, balance_power=balance_power)
    for epoch in rank_epochs(LABELS, 9, 5, world_size, epochs=4, balance_power=balance_power):
        for shares, expected in zip(epoch, batches(single), strict=True):
            joined = [i for share in shares for i in share]
            assert sorted(joined) == sorted(expected)  # disjoint, and the whole global batch
            for share in shares:
                assert share, shares  # every rank steps
                for label, count in Counter(LABELS[i] for i in share).items():
                    assert count >= 2 or label == 3, (shares, expected)
            # a class with two images per rank is on every rank (the same class mix)
            for label, count in Counter(LABELS[i] for i in expected).items():
                if count >= 2 * world_size:
                    assert all(label in {LABELS[i] for i in share} for share in shares), shares


def test_each_rank_gets_the_class_mix_in_runs_of_two_or_more():
    # 8 of class 0, 4 of class 1, 2 of class 2: two ranks get 4 + 2 and 4 + 2 + 2 images
    batch = [*range(8), 23, 24, 25, 26, 32, 33]
    shares = share_batch(batch, LABELS, 2)
    assert shares == [[0, 1, 2, 3, 23, 24, 32, 33], [4, 5, 6, 7, 25, 26]]
    # one class, three ranks: runs of 3
    assert share_batch(list(range(9)), LABELS, 3) == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    # 5 images of one class for two ranks: 2 and 3, never a lone image
    assert sorted(map(len, share_batch(list(range(5)), LABELS, 2))) == [2, 3]
    with pytest.raises(ValueError, match="cannot give each of 2 ranks"):
        share_batch([0, 1, 2], LABELS, 2)


def test_a_short_last_batch_joins_the_one_before():
    # 36 images, batches of 10: the last has 6 < 3 * 3 images, so 3 ranks take 3 steps
    samplers = [RankBatchSampler(LABELS, 10, 0, rank, 3) for rank in range(3)]
    assert [len(s) for s in samplers] == [3, 3, 3] and len(ClassPairBatchSampler(LABELS, 10, 0)) == 4
    steps = list(zip(*(batches(s) for s in samplers), strict=True))
    covered = sorted({i for shares in steps for share in shares for i in share})
    assert covered == list(range(len(LABELS)))  # every image of the epoch is used
    # with two ranks the last batch (6 >= 3 * 2) stays a step of its own
    assert len(RankBatchSampler(LABELS, 10, 0, 0, 2)) == 4


def test_rank_sampler_refusals_and_resume():
    with pytest.raises(ValueError, match="at least 6"):
        RankBatchSampler(LABELS, 5, 0, 0, 2)
    with pytest.raises(ValueError, match="rank 2"):
        RankBatchSampler(LABELS, 8, 0, 2, 2)
    sampler = RankBatchSampler(LABELS, 8, 3, 1, 2)
    batches(sampler)
    state = sampler.state_dict()
    second = batches(sampler)
    again = RankBatchSampler(LABELS, 8, 3, 1, 2)
    again.load_state_dict(state)
    assert batches(again) == second
