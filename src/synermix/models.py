"""torchvision backbones split into *features* and a final linear *classifier*.

SynerMix needs the penultimate features (the input of the final linear layer) of a
batch, and Manifold MixUp needs to mix hidden states at a chosen depth. Every model here
is a :class:`SplitNet`: a list of ``stages`` run in order, a ``neck`` that turns the last
feature map into the penultimate vector (pooling, flatten, and for MobileNet the hidden
linear layer), and ``classifier``, the final ``nn.Linear``.

Mixing points are stage indices: ``k`` mixes the input of stage ``k`` (``0`` = the image).
Per family, following the reference (input, after ResNet layer1, after layer2):

* ResNet: input, after layer1, after layer2
* MobileNetV2 / V3 / EfficientNet: input, after the first and the second quarter of blocks
* ConvNeXt: input, after stage 1, after stage 2

All models are built with ``weights=None`` (nothing is downloaded). ResNets take a
``width`` (channels of the first stage; torchvision's is 64). ``small_input_stem``
swaps the stem for a stride-1 3x3 convolution without max-pool (CIFAR-style, for inputs
of 32-84 px). ``in_channels=1`` builds a grey-level first convolution. No MLflow, DVC,
Optuna or GX imports here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torchvision.models as tvm
from torch import nn

from synermix.choices import ARCHITECTURES


class SplitNet(nn.Module):
    """``classifier(neck(stages(x)))`` with access to the penultimate features."""

    def __init__(
        self,
        stages: Sequence[nn.Module],
        neck: nn.Module,
        classifier: nn.Linear,
        mix_points: Sequence[int],
        arch: str,
    ) -> None:
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.neck = neck
        self.classifier = classifier
        self.mix_points = tuple(mix_points)
        self.arch = arch
        self.frozen_stages = 0

    def freeze_stages(self, count: int) -> None:
        """Fine-tuning: the first ``count`` stages keep their weights (no gradients) and their
        BatchNorm statistics (eval mode, also while the rest trains). Backpropagation then
        stops at the first trained stage, which on a CPU is most of a step's cost: the
        earliest stages run at the highest resolution."""
        if not 0 <= count < len(self.stages):
            raise ValueError(f"{self.arch} has {len(self.stages)} stages: freeze 0 to {len(self.stages) - 1}")
        self.frozen_stages = count
        for index, stage in enumerate(self.stages):
            stage.requires_grad_(index >= count)
        self.train(self.training)

    def train(self, mode: bool = True) -> SplitNet:
        super().train(mode)
        for stage in self.stages[: self.frozen_stages]:
            stage.eval()
        return self

    @property
    def feature_dim(self) -> int:
        return self.classifier.in_features

    def run_stages(self, x: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        for stage in self.stages[start:stop]:
            x = stage(x)
        return x

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features: the input of the final linear layer."""
        return self.neck(self.run_stages(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))

    def forward_mixed(self, x: torch.Tensor, point: int, lam: float, perm: torch.Tensor) -> torch.Tensor:
        """Logits with the hidden state at mixing ``point`` replaced by ``lam*h + (1-lam)*h[perm]``."""
        if point not in self.mix_points:
            raise ValueError(f"{self.arch} mixes at {self.mix_points}, not at {point}")
        h = self.run_stages(x, 0, point)
        h = lam * h + (1.0 - lam) * h[perm]
        return self.classifier(self.neck(self.run_stages(h, point)))


def _conv_like(conv: nn.Conv2d, in_channels: int, kernel: int, stride: int) -> nn.Conv2d:
    return nn.Conv2d(
        in_channels,
        conv.out_channels,
        kernel_size=kernel,
        stride=stride,
        padding=kernel // 2 if kernel % 2 else 0,
        bias=conv.bias is not None,
    )


def _narrow_resnet(net: tvm.ResNet, width: int, num_classes: int) -> None:
    """Rebuild ``net``'s stem and four stages with ``width, 2w, 4w, 8w`` channels (in place).

    torchvision fixes ResNet widths at 64-512; on 2 CPU cores a narrower network at a
    higher input resolution sees thin cracks that a full-width one at 64 px cannot afford.
    """
    block = type(net.layer1[0])
    depths = [len(layer) for layer in (net.layer1, net.layer2, net.layer3, net.layer4)]
    net.inplanes = width
    net.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
    net.bn1 = nn.BatchNorm2d(width)
    net.layer1 = net._make_layer(block, width, depths[0])
    net.layer2 = net._make_layer(block, width * 2, depths[1], stride=2)
    net.layer3 = net._make_layer(block, width * 4, depths[2], stride=2)
    net.layer4 = net._make_layer(block, width * 8, depths[3], stride=2)
    net.fc = nn.Linear(width * 8 * block.expansion, num_classes)
    for module in net.modules():  # torchvision's own initialisation
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def _resnet(
    name: str,
    num_classes: int,
    in_channels: int,
    small: bool,
    width: int | None = None,
    net: tvm.ResNet | None = None,
) -> SplitNet:
    if net is None:
        net = getattr(tvm, name)(weights=None, num_classes=num_classes)
        if width is not None and width != 64:
            _narrow_resnet(net, width, num_classes)
    if small:
        stem = nn.Sequential(_conv_like(net.conv1, in_channels, 3, 1), net.bn1, net.relu)
    else:
        if in_channels != 3:
            net.conv1 = _conv_like(net.conv1, in_channels, 7, 2)
        stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
    stages = [stem, net.layer1, net.layer2, net.layer3, net.layer4]
    neck = nn.Sequential(net.avgpool, nn.Flatten(1))
    return SplitNet(stages, neck, net.fc, mix_points=(0, 2, 3), arch=name)


def _replace_first_conv(block: nn.Sequential, in_channels: int, small: bool) -> None:
    conv: nn.Conv2d = block[0]
    if small and conv.kernel_size == (4, 4):  # ConvNeXt patchify stem
        block[0] = _conv_like(conv, in_channels, 3, 1)
    elif small:
        block[0] = _conv_like(conv, in_channels, conv.kernel_size[0], 1)
    elif in_channels != conv.in_channels:
        new = _conv_like(conv, in_channels, conv.kernel_size[0], conv.stride[0])
        new.padding = conv.padding
        block[0] = new


def _sequential_family(
    name: str,
    num_classes: int,
    in_channels: int,
    small: bool,
    width: int | None = None,
    net: nn.Module | None = None,
) -> SplitNet:
    if width is not None:
        raise ValueError(f"train.width applies to ResNets only, not {name}; set train.width: null")
    if net is None:
        net = getattr(tvm, name)(weights=None, num_classes=num_classes)
    blocks = list(net.features)
    _replace_first_conv(blocks[0], in_channels, small)
    head = list(net.classifier)
    classifier = head.pop()
    assert isinstance(classifier, nn.Linear)
    if name.startswith("convnext"):
        # features = [stem, stage1, down, stage2, down, stage3, down, stage4]
        stages = [nn.Sequential(*blocks[0:2]), nn.Sequential(*blocks[2:4]), nn.Sequential(*blocks[4:])]
        mix_points = (0, 1, 2)
        neck = nn.Sequential(net.avgpool, *head)  # LayerNorm2d, Flatten
    else:
        quarter = max(1, len(blocks) // 4)
        stages = [
            nn.Sequential(*blocks[:quarter]),
            nn.Sequential(*blocks[quarter : 2 * quarter]),
            nn.Sequential(*blocks[2 * quarter :]),
        ]
        mix_points = (0, 1, 2)
        # MobileNetV2 pools in forward() (no avgpool module); V3 and EfficientNet have one.
        # MobileNetV3's head keeps its hidden Linear+act+dropout; V2's only a dropout
        pool = getattr(net, "avgpool", None) or nn.AdaptiveAvgPool2d(1)
        neck = nn.Sequential(pool, nn.Flatten(1), *head)
    return SplitNet(stages, neck, classifier, mix_points=mix_points, arch=name)


_BUILDERS: dict[str, Callable[..., SplitNet]] = {
    **{name: _resnet for name in ARCHITECTURES if name.startswith("resnet")},
    **{name: _sequential_family for name in ARCHITECTURES if not name.startswith("resnet")},
}


def build_model(
    arch: str,
    num_classes: int,
    in_channels: int = 3,
    small_input_stem: bool = False,
    width: int | None = None,
) -> SplitNet:
    """A randomly initialised :class:`SplitNet` (``weights=None``: nothing is downloaded).

    ``width`` (ResNets only): channels of the first stage, doubled at each later stage;
    None keeps torchvision's 64."""
    if arch not in _BUILDERS:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    if num_classes < 2:
        raise ValueError("a classifier needs at least two classes")
    if in_channels not in (1, 3):
        raise ValueError("in_channels must be 1 (grey) or 3 (RGB)")
    if width is not None and not 4 <= width <= 256:
        raise ValueError("width must be between 4 and 256 channels")
    return _BUILDERS[arch](arch, num_classes, in_channels, small_input_stem, width)


def torchvision_key_map(arch: str) -> dict[str, str]:
    """torchvision's ``state_dict`` names for ``arch`` -> the :class:`SplitNet`'s names.

    Found by splitting a torchvision network with the same code as :func:`build_model`
    and matching tensors by identity, so the map follows any change to the split. Built
    on the meta device: no memory for the weights, nothing initialised for real.
    """
    if arch not in _BUILDERS:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    with torch.device("meta"):
        net = getattr(tvm, arch)(weights=None)
        split = _BUILDERS[arch](arch, 1000, 3, False, None, net=net)
    split_names = {id(t): k for k, t in split.state_dict(keep_vars=True).items()}
    mapping = {name: split_names.get(id(t), "") for name, t in net.state_dict(keep_vars=True).items()}
    unmapped = [name for name, target in mapping.items() if not target]
    if unmapped:  # the split dropped a tensor: a bug in the builders, not the user's file
        raise RuntimeError(f"{arch}: torchvision tensors missing from the SplitNet: {unmapped[:3]}")
    return mapping
