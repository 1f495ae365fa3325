"""torchvision backbones split into *features* and a final linear *classifier*.

SynerMix needs the penultimate features (the input of the final linear layer) of a
batch, and Manifold MixUp needs to mix hidden states at a chosen depth. Every model here
is a :class:`SplitNet`: a list of ``stages`` run in order, a ``neck`` that turns the last
feature map into the penultimate vector (pooling, flatten, and for MobileNet the hidden
linear layer), and ``classifier``, the final ``nn.Linear``.

Mixing points are stage indices: ``k`` mixes the input of stage ``k`` (``0`` = the image).
Per family, following the reference (input, after ResNet layer1, after layer2):

* ResNet: input, after layer1, after layer2
* MobileNetV3 / EfficientNet: input, after the first and the second quarter of blocks
* ConvNeXt: input, after stage 1, after stage 2

All models are built with ``weights=None`` (nothing is downloaded). ``small_input_stem``
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


def _resnet(name: str, num_classes: int, in_channels: int, small: bool) -> SplitNet:
    net = getattr(tvm, name)(weights=None, num_classes=num_classes)
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


def _sequential_family(name: str, num_classes: int, in_channels: int, small: bool) -> SplitNet:
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
        neck = nn.Sequential(net.avgpool, nn.Flatten(1), *head)  # MobileNet: Linear+act+dropout
    return SplitNet(stages, neck, classifier, mix_points=mix_points, arch=name)


_BUILDERS: dict[str, Callable[[str, int, int, bool], SplitNet]] = {
    **{name: _resnet for name in ARCHITECTURES if name.startswith("resnet")},
    **{name: _sequential_family for name in ARCHITECTURES if not name.startswith("resnet")},
}


def build_model(
    arch: str, num_classes: int, in_channels: int = 3, small_input_stem: bool = False
) -> SplitNet:
    """A randomly initialised :class:`SplitNet` (``weights=None``: nothing is downloaded)."""
    if arch not in _BUILDERS:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    if num_classes < 2:
        raise ValueError("a classifier needs at least two classes")
    if in_channels not in (1, 3):
        raise ValueError("in_channels must be 1 (grey) or 3 (RGB)")
    return _BUILDERS[arch](arch, num_classes, in_channels, small_input_stem)
