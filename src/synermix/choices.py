"""Named choices shared by params validation and the code that implements them.

Kept free of imports so that reading params.yaml does not pull in torch.
"""

#: torchvision backbones that :func:`synermix.models.build_model` can split.
ARCHITECTURES = (
    "resnet18",
    "resnet34",
    "resnet50",
    "mobilenet_v3_small",
    "mobilenet_v3_large",
    "efficientnet_b0",
    "convnext_tiny",
)
#: Training methods of :class:`synermix.mixup.SynerMixLoss`.
METHODS = ("erm", "mixup", "manifold_mixup", "synermix_intra", "synermix")
#: Inter-class part of ``synermix``.
INTER_METHODS = ("mixup", "manifold_mixup")
