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
#: Where training and PyTorch scoring run (``train.device``, ``evaluate.device``).
DEVICES = ("auto", "cpu", "cuda")
#: ONNX Runtime execution providers a model may run on (``serve.provider``, ``--provider``).
PROVIDERS = ("auto", "cpu", "cuda", "tensorrt")
#: Decompression-bomb guard: the most pixels an image may decode to (``data.max_pixels``,
#: ``serve.max_pixels``, ``--max-pixels``).
MAX_PIXELS = 40_000_000
