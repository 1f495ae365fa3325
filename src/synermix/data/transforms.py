"""The production preprocessing in torch (its contract: :mod:`synermix.preprocessing`,
recorded next to every model so a model file is self-describing) and the training views.

Training gives two views of each image (see SYNERMIX.md): the un-augmented *eval* view
for the intra-class pass and an *augmented* view for the inter-class pass. The default
augmentations suit inspection images whose label does not depend on orientation:
flips, 90-degree rotations, a mild random crop, brightness and contrast.
"""

from __future__ import annotations

import torch
from PIL import Image
from torchvision.transforms import v2

from synermix.data.images import fit_square
from synermix.preprocessing import RESIZE_POLICY, Preprocessing

__all__ = ["RESIZE_POLICY", "Preprocessing", "build_augmentation", "load_resized", "normalize"]


def load_resized(path, image_size: int, channels: int) -> torch.Tensor:
    """Decode a file to a ``channels x image_size x image_size`` uint8 tensor."""
    with Image.open(path) as image:
        pixels = fit_square(image, image_size, channels)
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1).contiguous()


def normalize(x: torch.Tensor, pre: Preprocessing) -> torch.Tensor:
    """uint8 ``C x H x W`` (or a batch) to the normalised float input of the model."""
    mean = torch.tensor(pre.mean).view(-1, 1, 1)
    std = torch.tensor(pre.std).view(-1, 1, 1)
    return (x.float() / 255.0 - mean) / std


class RandomRot90(torch.nn.Module):
    """Rotate by a random multiple of 90 degrees (labels of inspection cells allow it)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = int(torch.randint(4, (1,)))
        return torch.rot90(x, k, dims=(-2, -1)) if k else x


def build_augmentation(image_size: int, augment) -> v2.Compose:
    """The augmented view from ``train.augment`` params (on uint8 tensors)."""
    steps: list[torch.nn.Module] = []
    if augment.crop_scale < 1.0:
        steps.append(v2.RandomResizedCrop(image_size, scale=(augment.crop_scale, 1.0), ratio=(0.9, 1.1)))
    if augment.hflip:
        steps.append(v2.RandomHorizontalFlip())
    if augment.vflip:
        steps.append(v2.RandomVerticalFlip())
    if augment.rotate90:
        steps.append(RandomRot90())
    if augment.brightness > 0 or augment.contrast > 0:
        steps.append(v2.ColorJitter(brightness=augment.brightness, contrast=augment.contrast))
    return v2.Compose(steps)
