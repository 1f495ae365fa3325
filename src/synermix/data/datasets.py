"""Torch datasets over the manifest's prepared images."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from synermix.data.images import is_grey_mode
from synermix.data.transforms import Preprocessing, load_resized, normalize

log = logging.getLogger(__name__)


def infer_channels(frame: pd.DataFrame) -> int:
    """1 when every image is grey-level at the source, else 3."""
    return 1 if all(is_grey_mode(mode) for mode in frame["mode"]) else 3


def channel_stats(images: Sequence[torch.Tensor]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images, in [0, 1] units."""
    channels = images[0].shape[0]
    total = torch.zeros(channels, dtype=torch.float64)
    total_sq = torch.zeros(channels, dtype=torch.float64)
    count = 0
    for image in images:
        flat = image.reshape(channels, -1).to(torch.float64) / 255.0
        total += flat.sum(1)
        total_sq += (flat * flat).sum(1)
        count += flat.shape[1]
    mean = total / count
    std = (total_sq / count - mean * mean).clamp_min(1e-12).sqrt()
    return tuple(round(float(v), 6) for v in mean), tuple(round(float(v), 6) for v in std.clamp_min(1e-3))


class InspectionImages(Dataset):
    """Images of one split. ``two_views`` yields ``(eval_view, aug_view, label)``.

    With ``cache=True`` the resized uint8 images are decoded once and kept in memory
    (2,624 ELPV cells at 64 px take 11 MB), which matters on CPU where PNG decoding would
    otherwise cost more than the training step.
    """

    def __init__(
        self,
        frame: pd.DataFrame,
        root: Path,
        class_names: Sequence[str],
        pre: Preprocessing | None,
        image_size: int,
        channels: int,
        augmentation=None,
        two_views: bool = False,
        cache: bool = True,
        desc: str = "load",
    ) -> None:
        index = {name: i for i, name in enumerate(class_names)}
        self.paths = [root / p for p in frame["path"]]
        self.labels = [index[label] for label in frame["label"]]
        self.pre = pre
        self.image_size = image_size
        self.channels = channels
        self.augmentation = augmentation
        self.two_views = two_views
        self.cache: list[torch.Tensor] | None = None
        if cache:
            self.cache = [
                load_resized(p, image_size, channels)
                for p in tqdm(self.paths, desc=desc, unit="img", disable=None, leave=False)
            ]

    def __len__(self) -> int:
        return len(self.paths)

    def update_digest(self, digest) -> None:
        """Feed what training sees into ``digest``: each label and image (the cached
        pixels when cached, so the files are not read a second time; else file bytes)."""
        for i, (path, label) in enumerate(zip(self.paths, self.labels, strict=True)):
            digest.update(f"{label}:".encode())
            if self.cache is not None:
                digest.update(self.cache[i].numpy().tobytes())
            else:
                digest.update(hashlib.sha256(path.read_bytes()).digest())

    def raw(self, i: int) -> torch.Tensor:
        if self.cache is not None:
            return self.cache[i]
        return load_resized(self.paths[i], self.image_size, self.channels)

    def __getitem__(self, i: int):
        if self.pre is None:
            raise RuntimeError("set .pre (the preprocessing) before reading samples")
        image = self.raw(i)
        x = normalize(image, self.pre)
        if not self.two_views:
            return x, self.labels[i]
        aug = normalize(self.augmentation(image), self.pre) if self.augmentation is not None else x
        return x, aug, self.labels[i]
