import pytest
import torch
import torch.nn.functional as F

from synermix.mixup import (
    MixRandom,
    SynerMixLoss,
    draw_intra_weights,
    intra_class_loss,
    mixed_cross_entropy,
    mixup_images,
    synthesize_class_features,
    synthesize_class_features_naive,
)
from synermix.models import build_model


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([3, 0, 3, 1, 0, 3, 1, 1, 0, 3])  # class 2 absent
    features = torch.randn(10, 16, generator=g, dtype=torch.float64)
    return features, labels


def test_vectorised_synthesis_equals_naive_loop(batch):
    features, labels = batch
    weights = draw_intra_weights(labels, 4, torch.Generator().manual_seed(1)).double()
    z, present = synthesize_class_features(features, labels, weights, 4)
    naive = synthesize_class_features_naive(features, labels, weights)
    assert present.tolist() == [True, True, False, True]
    assert set(naive) == {0, 1, 3}
    for c, expected in naive.items():
        torch.testing.assert_close(z[c], expected, rtol=0, atol=1e-12)
    assert torch.count_nonzero(z[2]) == 0


def test_weights_positive_and_sum_to_one_per_class(batch):
    _, labels = batch
    for seed in range(20):
        w = draw_intra_weights(labels, 4, torch.Generator().manual_seed(seed))
        assert (w > 0).all()
        for c in labels.unique():
            assert torch.isclose(w[labels == c].sum(), torch.tensor(1.0))


def test_weights_are_fresh_each_step_and_seeded(batch):
    _, labels = batch
    g = torch.Generator().manual_seed(5)
    first, second = draw_intra_weights(labels, 4, g), draw_intra_weights(labels, 4, g)
    assert not torch.equal(first, second)
    assert torch.equal(first, draw_intra_weights(labels, 4, torch.Generator().manual_seed(5)))


def test_singleton_class_gets_weight_one():
    labels = torch.tensor([0, 1, 1])
    w = draw_intra_weights(labels, 2, torch.Generator().manual_seed(0))
    assert w[0] == 1.0


def tiny_model(in_channels=1, arch="resnet18"):
    torch.manual_seed(0)
    return build_model(arch, 3, in_channels, small_input_stem=True)


def test_intra_loss_reaches_backbone_gradients():
    model = tiny_model()
    x = torch.randn(6, 1, 16, 16)
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    loss = intra_class_loss(model, x, y, 3, torch.Generator().manual_seed(0))
    loss.backward()
    first_conv = model.stages[0][0].weight
    assert first_conv.grad is not None and first_conv.grad.abs().sum() > 0
    assert model.classifier.weight.grad.abs().sum() > 0


def test_intra_loss_is_mean_over_present_classes():
    model = tiny_model().eval()
    x = torch.randn(5, 1, 16, 16)
    y = torch.tensor([0, 0, 2, 2, 2])
    g = torch.Generator().manual_seed(3)
    loss = intra_class_loss(model, x, y, 3, g)
    # by hand: the same weights, one synthetic feature per present class, plain mean
    w = draw_intra_weights(y, 3, torch.Generator().manual_seed(3))
    feats = model.features(x)
    z0 = (w[:2, None] * feats[:2]).sum(0)
    z2 = (w[2:, None] * feats[2:]).sum(0)
    expected = F.cross_entropy(model.classifier(torch.stack([z0, z2])), torch.tensor([0, 2]))
    torch.testing.assert_close(loss, expected)


class CountingNeck(torch.nn.Module):
    def __init__(self, neck):
        super().__init__()
        self.neck, self.calls = neck, 0

    def forward(self, x):
        self.calls += 1
        return self.neck(x)


@pytest.mark.parametrize("inter", ["mixup", "manifold_mixup"])
def test_beta_zero_equals_inter_loss_alone_and_skips_the_extra_pass(inter):
    x = torch.randn(6, 1, 16, 16)
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    model = tiny_model().eval()
    model.neck = CountingNeck(model.neck)
    synermix = SynerMixLoss("synermix", 3, MixRandom(7), beta=0.0, inter_method=inter)
    parts = synermix(model, x, x, y)
    assert parts.intra is None and model.neck.calls == 1  # one forward pass only
    alone = SynerMixLoss(inter, 3, MixRandom(7))(model, x, x, y)
    torch.testing.assert_close(parts.total, alone.total)


def test_synermix_combines_with_beta():
    x = torch.randn(6, 1, 16, 16)
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    model = tiny_model().eval()
    parts = SynerMixLoss("synermix", 3, MixRandom(1), beta=0.3)(model, x, x, y)
    torch.testing.assert_close(parts.total, 0.3 * parts.intra + 0.7 * parts.inter)
    intra_only = SynerMixLoss("synermix_intra", 3, MixRandom(1), beta=0.5)
    assert intra_only.inter == "erm" and intra_only.uses_intra
    assert SynerMixLoss("erm", 3, MixRandom(1), beta=0.9).beta == 0.0


def test_mixup_with_lam_one_is_cross_entropy():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 5, generator=g)
    y = torch.randint(5, (8,), generator=g)
    perm = torch.randperm(8, generator=g)
    torch.testing.assert_close(mixed_cross_entropy(logits, y, perm, 1.0), F.cross_entropy(logits, y))
    x = torch.randn(8, 3, 4, 4, generator=g)
    torch.testing.assert_close(mixup_images(x, 1.0, perm), x)
    lam = 0.3
    torch.testing.assert_close(mixup_images(x, lam, perm), lam * x + 0.7 * x[perm])


def test_manifold_mixup_at_each_point_equals_hand_computation():
    model = tiny_model(arch="resnet18").eval()
    x = torch.randn(4, 1, 16, 16)
    perm = torch.tensor([2, 3, 0, 1])
    lam = 0.35
    stem, l1, l2, l3, l4 = model.stages

    def head(h):
        return model.classifier(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(h, 1), 1))

    with torch.no_grad():
        mix = lambda h: lam * h + (1 - lam) * h[perm]  # noqa: E731
        expected = {
            0: head(l4(l3(l2(l1(stem(mix(x))))))),
            2: head(l4(l3(l2(mix(l1(stem(x))))))),
            3: head(l4(l3(mix(l2(l1(stem(x))))))),
        }
        assert model.mix_points == (0, 2, 3)
        for point, want in expected.items():
            torch.testing.assert_close(model.forward_mixed(x, point, lam, perm), want)
        with pytest.raises(ValueError, match="mixes at"):
            model.forward_mixed(x, 1, lam, perm)


def test_manifold_point_and_lambda_come_from_the_seeded_generator():
    x = torch.randn(6, 1, 16, 16)
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    model = tiny_model().eval()
    points = []
    model.forward_mixed = lambda x, point, lam, perm: (points.append((point, lam)), model(x))[1]

    def draws(seed):
        points.clear()
        loss = SynerMixLoss("manifold_mixup", 3, MixRandom(seed))
        for _ in range(30):
            loss(model, x, x, y)
        return list(points)

    first = draws(4)
    assert first == draws(4)  # same seed, same mixing points and lambdas
    assert {p for p, _ in first} == set(model.mix_points)  # every point is used
    assert len({lam for _, lam in first}) == 30
    assert first != draws(5)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"method": "cutmix"}, "unknown method"),
        ({"method": "synermix", "beta": 1.5}, "beta"),
        ({"method": "synermix", "inter_method": "cutmix"}, "inter_method"),
        ({"method": "mixup", "alpha": 0}, "alpha"),
    ],
)
def test_invalid_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SynerMixLoss(num_classes=3, rng=MixRandom(0), **kwargs)


# marked integration as it was (module-wide) before the tests were split by module, so
# `make test-unit` runs the same tests as before
@pytest.mark.integration
def test_class_weights_and_label_smoothing_reach_the_inter_loss():
    torch.manual_seed(0)
    model = build_model("resnet18", 3, 1, small_input_stem=True, width=8)
    x, y = torch.randn(6, 1, 16, 16), torch.tensor([0, 0, 1, 1, 2, 2])
    weight = torch.tensor([1.0, 2.0, 0.5])
    loss = SynerMixLoss("erm", 3, MixRandom(0), class_weights=weight, label_smoothing=0.1)
    model.eval()
    expected = torch.nn.functional.cross_entropy(model(x), y, weight=weight, label_smoothing=0.1)
    torch.testing.assert_close(loss(model, x, x, y).total, expected)
    plain = SynerMixLoss("erm", 3, MixRandom(0))(model, x, x, y).total
    assert not torch.allclose(plain, expected)
