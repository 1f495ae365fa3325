"""SynerMix-Intra, MixUp, Manifold MixUp and the combined SynerMix loss (pure torch, no I/O).

The method (Xu et al., arXiv 2403.14137, and the authors' reference code):

* **Intra-class synthesis.** For every class ``c`` present in a batch with penultimate
  features ``F_c`` (``n_c x d``, from the un-augmented view, with gradients), draw
  ``u ~ Uniform(0, 1)^{n_c}``, set ``w = u / sum(u)`` and synthesise ``z_c = w @ F_c``.
  ``L_intra = mean_c CE(classifier(z_c), c)`` over the classes present (each counts once).
* **Inter-class mixing** on the augmented view: MixUp mixes images,
  ``x' = lam*x + (1-lam)*x[perm]``, ``lam ~ Beta(alpha, alpha)`` once per batch,
  ``L_inter = lam*CE(out, y) + (1-lam)*CE(out, y[perm])``; Manifold MixUp mixes the
  hidden state at a mixing point drawn uniformly from the model's ``mix_points``.
* **SynerMix:** ``L = beta * L_intra + (1 - beta) * L_inter``; with ``beta == 0`` the
  extra forward/backward pass for the intra term is skipped.
* Optional class weights and label smoothing (``train.class_weights``,
  ``train.label_smoothing``) apply to the image-level cross-entropies of ``L_inter``
  only; ``L_intra`` stays the method's plain mean over the classes present.

The synthesis is vectorised: segment sums over the label vector with ``index_add_``
compute every class at once, in a fixed number of kernels and without host syncs (the
loss is averaged over a presence mask instead of indexing the present classes).

All random draws come from :class:`MixRandom`, seeded from params, whose state is saved
in checkpoints so a resumed run draws what an uninterrupted one would have.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from synermix.choices import INTER_METHODS, METHODS


class MixRandom:
    """The explicit random sources of mixing: a torch generator and a numpy generator.

    torch draws permutations and the intra-class weights; numpy draws ``lam`` (torch has
    no seeded Beta sampler) and the manifold mixing point.
    """

    def __init__(self, seed: int) -> None:
        self.torch = torch.Generator().manual_seed(seed)
        self.numpy = np.random.default_rng(seed)

    def state_dict(self) -> dict[str, Any]:
        return {"torch": self.torch.get_state(), "numpy": self.numpy.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.torch.set_state(state["torch"])
        self.numpy.bit_generator.state = state["numpy"]


# --------------------------------------------------------------------------- intra-class
def draw_intra_weights(labels: torch.Tensor, num_classes: int, generator: torch.Generator) -> torch.Tensor:
    """Per-sample weights ``u / (sum of u over the sample's class)``, ``u ~ U(0, 1)``.

    Weights are positive and sum to 1 within each class present; they carry no gradient.
    """
    u = torch.rand(labels.shape[0], generator=generator).to(labels.device, non_blocking=True)
    u = u.clamp_min(torch.finfo(u.dtype).tiny)  # U(0,1) may return exactly 0
    sums = torch.zeros(num_classes, dtype=u.dtype, device=u.device).index_add_(0, labels, u)
    return u / sums[labels]


def synthesize_class_features(
    features: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``z_c = sum_{i: y_i = c} w_i * F_i`` for every class at once.

    Returns ``(z, present)``: ``z`` is ``num_classes x d`` (zero rows for absent classes)
    and ``present`` a boolean mask of the classes in the batch.
    """
    weighted = features * weights.to(features.dtype).unsqueeze(1)
    z = torch.zeros(num_classes, features.shape[1], dtype=features.dtype, device=features.device)
    z = z.index_add(0, labels, weighted)
    # index_fill_, not bincount: bincount on CUDA reads the labels' range back to the host
    present = torch.zeros(num_classes, dtype=torch.bool, device=labels.device).index_fill_(0, labels, True)
    return z, present


def synthesize_class_features_naive(
    features: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor
) -> dict[int, torch.Tensor]:
    """Reference implementation: a Python loop over the classes (for tests and benchmarks)."""
    result = {}
    for c in torch.unique(labels).tolist():
        mask = labels == c
        result[c] = weights[mask].to(features.dtype) @ features[mask]
    return result


def intra_class_loss(
    model: nn.Module, x_orig: torch.Tensor, labels: torch.Tensor, num_classes: int, generator: torch.Generator
) -> torch.Tensor:
    """``L_intra``: CE of the synthesised class features, averaged over the classes present."""
    features = model.features(x_orig)
    weights = draw_intra_weights(labels, num_classes, generator)
    z, present = synthesize_class_features(features, labels, weights, num_classes)
    targets = torch.arange(num_classes, device=labels.device)
    per_class = F.cross_entropy(model.classifier(z), targets, reduction="none")
    present = present.to(per_class.dtype)
    return (per_class * present).sum() / present.sum()


# --------------------------------------------------------------------------- inter-class
def mixup_images(x: torch.Tensor, lam: float, perm: torch.Tensor) -> torch.Tensor:
    return lam * x + (1.0 - lam) * x[perm]


def mixed_cross_entropy(
    logits: torch.Tensor,
    y: torch.Tensor,
    perm: torch.Tensor,
    lam: float,
    weight: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """``lam * CE(logits, y) + (1 - lam) * CE(logits, y[perm])``."""
    kwargs = {"weight": weight, "label_smoothing": label_smoothing}
    return lam * F.cross_entropy(logits, y, **kwargs) + (1.0 - lam) * F.cross_entropy(
        logits, y[perm], **kwargs
    )


@dataclass
class LossParts:
    total: torch.Tensor
    intra: torch.Tensor | None
    inter: torch.Tensor


class SynerMixLoss:
    """``beta * L_intra + (1 - beta) * L_inter`` for any of :data:`METHODS`.

    ========================  ======================  ===============================
    method                    inter term              intra term
    ========================  ======================  ===============================
    ``erm``                   CE on the aug. view     none (beta ignored)
    ``mixup``                 MixUp                   none
    ``manifold_mixup``        Manifold MixUp          none
    ``synermix_intra``        CE on the aug. view     ``beta`` (reference: 0.5)
    ``synermix``              ``inter_method``        ``beta`` (reference: 0.1)
    ========================  ======================  ===============================
    """

    def __init__(
        self,
        method: str,
        num_classes: int,
        rng: MixRandom,
        beta: float = 0.1,
        alpha: float = 1.0,
        inter_method: str = "mixup",
        class_weights: torch.Tensor | None = None,
        label_smoothing: float = 0.0,
    ) -> None:
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
        if inter_method not in INTER_METHODS:
            raise ValueError(f"inter_method must be one of {', '.join(INTER_METHODS)}")
        if not 0.0 <= beta <= 1.0:
            raise ValueError("beta must be in [0, 1]")
        if alpha <= 0:
            raise ValueError("alpha must be > 0")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError("label_smoothing must be in [0, 1)")
        if class_weights is not None and class_weights.shape != (num_classes,):
            raise ValueError(f"class_weights must have {num_classes} entries")
        self.method = method
        # class weights and label smoothing act on the inter (image-level) term only: the
        # intra term already counts every class present once, whatever its frequency
        self.class_weights = class_weights
        self.label_smoothing = label_smoothing
        self.num_classes = num_classes
        self.rng = rng
        self.alpha = alpha
        self.beta = beta if method in ("synermix_intra", "synermix") else 0.0
        self.inter = {
            "erm": "erm",
            "mixup": "mixup",
            "manifold_mixup": "manifold_mixup",
            "synermix_intra": "erm",
            "synermix": inter_method,
        }[method]

    @property
    def uses_intra(self) -> bool:
        return self.beta > 0.0

    def inter_loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        weight = self.class_weights
        if weight is not None and weight.device != x.device:
            weight = self.class_weights = weight.to(x.device)
        if self.inter == "erm":
            return F.cross_entropy(model(x), y, weight=weight, label_smoothing=self.label_smoothing)
        lam = float(self.rng.numpy.beta(self.alpha, self.alpha))
        perm = torch.randperm(x.shape[0], generator=self.rng.torch).to(x.device, non_blocking=True)
        if self.inter == "mixup":
            logits = model(mixup_images(x, lam, perm))
        else:
            point = int(self.rng.numpy.choice(model.mix_points))
            logits = model.forward_mixed(x, point, lam, perm)
        return mixed_cross_entropy(logits, y, perm, lam, weight, self.label_smoothing)

    def __call__(
        self, model: nn.Module, x_orig: torch.Tensor, x_aug: torch.Tensor, y: torch.Tensor
    ) -> LossParts:
        intra = None
        if self.uses_intra:
            intra = intra_class_loss(model, x_orig, y, self.num_classes, self.rng.torch)
        inter = self.inter_loss(model, x_aug, y)
        total = inter if intra is None else self.beta * intra + (1.0 - self.beta) * inter
        return LossParts(total, intra, inter)
