"""The preprocessing contract: how an image file becomes a model input, as one torch-free
value shared by training (:mod:`synermix.data.transforms`), export (written into the ONNX
metadata and model.json), inference and the service (:mod:`synermix.inference`), the
deploy bundle's preprocessing.json and the service's shadow check (two models take the
same input only if their contracts are equal).

decode -> grey (``channels=1``) or RGB (``channels=3``) -> resize so the shorter side is
``image_size`` (bilinear, antialiased) -> centre crop ``image_size`` -> scale to [0, 1]
-> ``(x - mean) / std`` per channel, float32, N x C x H x W.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

#: the one resize policy there is (recorded so a model file says which it needs)
RESIZE_POLICY = "shorter_side_bilinear_center_crop"


@dataclass(frozen=True)
class Preprocessing:
    image_size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize: str = RESIZE_POLICY

    def __post_init__(self) -> None:
        # read back from model files, which may come from anywhere: a bad value is one line
        if not 1 <= self.image_size <= 8192:
            raise ValueError(f"preprocessing image_size {self.image_size} is not 1-8192 pixels")
        if self.channels not in (1, 3):
            raise ValueError(f"preprocessing channels {self.channels} is not 1 or 3")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(
                f"preprocessing mean/std have {len(self.mean)}/{len(self.std)} values for "
                f"{self.channels} channel(s)"
            )
        if not all(math.isfinite(v) for v in self.mean) or not all(
            math.isfinite(v) and v > 0 for v in self.std
        ):
            raise ValueError("preprocessing mean must be finite and std finite and positive")

    def to_dict(self) -> dict:
        """JSON-ready (lists, not tuples), as stored in model.json and ONNX metadata."""
        data = asdict(self)
        data["mean"], data["std"] = list(self.mean), list(self.std)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> Preprocessing:
        return cls(
            image_size=int(data["image_size"]),
            channels=int(data["channels"]),
            mean=tuple(float(v) for v in data["mean"]),
            std=tuple(float(v) for v in data["std"]),
            resize=str(data.get("resize", RESIZE_POLICY)),
        )
