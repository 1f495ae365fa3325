import pytest
import torch
import torchvision.models as tvm

from synermix.config import TrainParams
from synermix.models import ARCHITECTURES, build_model


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_split_network_computes_what_torchvision_computes(arch):
    """Same seed, same parameters: features + classifier must equal torchvision's forward."""
    torch.manual_seed(0)
    ours = build_model(arch, 5, 3).eval()
    torch.manual_seed(0)
    reference = getattr(tvm, arch)(weights=None, num_classes=5).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x), rtol=0, atol=0)
        seen = {}
        final = reference.fc if arch.startswith("resnet") else reference.classifier[-1]
        handle = final.register_forward_hook(lambda m, inputs, out: seen.setdefault("x", inputs[0]))
        reference(x)
        handle.remove()
        torch.testing.assert_close(ours.features(x), seen["x"], rtol=0, atol=0)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_architecture_splits_into_features_and_classifier(arch):
    torch.manual_seed(0)
    for in_channels, small in ((1, False), (3, True)):
        model = build_model(arch, 5, in_channels, small_input_stem=small).eval()
        x = torch.randn(2, in_channels, 32, 32)
        with torch.no_grad():
            assert model.features(x).shape == (2, model.feature_dim)
            assert model(x).shape == (2, 5)
            assert model.mix_points[0] == 0 and len(model.mix_points) == 3
            for point in model.mix_points:
                assert model.forward_mixed(x, point, 0.5, torch.tensor([1, 0])).shape == (2, 5)
        assert isinstance(model.classifier, torch.nn.Linear)


def test_small_input_stem_keeps_resolution():
    big = build_model("resnet18", 3, 1, small_input_stem=False)
    small = build_model("resnet18", 3, 1, small_input_stem=True)
    x = torch.randn(1, 1, 32, 32)
    assert big.stages[0](x).shape[-1] == 8  # stride-2 conv + max-pool
    assert small.stages[0](x).shape[-1] == 32
    assert small.stages[0][0].kernel_size == (3, 3) and small.stages[0][0].in_channels == 1


def test_grey_models_take_one_channel():
    for arch in ("mobilenet_v3_small", "efficientnet_b0", "convnext_tiny", "resnet50"):
        model = build_model(arch, 2, in_channels=1)
        first = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
        assert first.in_channels == 1


@pytest.mark.parametrize(
    ("args", "match"), [(("vgg16", 3), "unknown architecture"), (("resnet18", 1), "two classes")]
)
def test_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        build_model(*args)


# marked integration as it was (module-wide) before the tests were split by module, so
# `make test-unit` runs the same tests as before
@pytest.mark.integration
def test_width_narrows_a_resnet():
    wide, narrow = build_model("resnet18", 4, 1), build_model("resnet18", 4, 1, width=16)
    assert narrow.feature_dim == 128 and wide.feature_dim == 512
    assert sum(p.numel() for p in narrow.parameters()) < sum(p.numel() for p in wide.parameters()) / 10
    assert narrow(torch.randn(2, 1, 64, 64)).shape == (2, 4)
    with pytest.raises(ValueError, match="ResNets only"):
        TrainParams(arch="mobilenet_v3_small", width=16)


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2"])
def test_frozen_stages_keep_their_weights_and_batchnorm_statistics(arch):
    torch.manual_seed(0)
    model = build_model(arch, 3, 1, width=8 if arch == "resnet18" else None)
    model.freeze_stages(1)
    model.train()
    frozen_bn = [m for m in model.stages[0].modules() if isinstance(m, torch.nn.BatchNorm2d)]
    trained_bn = [m for m in model.stages[1].modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert frozen_bn and all(not m.training for m in frozen_bn) and all(m.training for m in trained_bn)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loss = model(torch.randn(6, 1, 64, 64)).logsumexp(1).mean()
    loss.backward()
    optimizer.step()
    after = model.state_dict()
    for key, value in before.items():
        same = torch.equal(after[key], value)
        assert same == key.startswith("stages.0."), key  # frozen unchanged, everything else moved
    assert all(p.grad is None for p in model.stages[0].parameters())
    model.eval()
    model.train()  # back to training: the frozen stage stays in eval mode
    assert all(not m.training for m in frozen_bn)


def test_freezing_every_stage_or_a_scratch_model_is_refused():
    model = build_model("mobilenet_v2", 3, 1)
    with pytest.raises(ValueError, match="has 3 stages: freeze 0 to 2"):
        model.freeze_stages(3)
    with pytest.raises(ValueError, match="freezing is for a pretrained or warm-started init"):
        TrainParams(arch="mobilenet_v2", width=None, freeze_stages=1)
    assert TrainParams(arch="mobilenet_v2", width=None, init="imagenet", freeze_stages=1).freeze_stages == 1
