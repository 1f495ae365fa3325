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
