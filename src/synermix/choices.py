"""Named choices shared by params validation and the code that implements them.

Kept free of imports so that reading params.yaml does not pull in torch.
"""

#: torchvision backbones that :func:`synermix.models.build_model` can split.
ARCHITECTURES = (
    "resnet18",
    "resnet34",
    "resnet50",
    "mobilenet_v2",
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
#: The longest side may be at most this many times the shorter one: resizing scales the
#: shorter side up to the model's input, so a tiny file declaring 1 x 250,000 pixels would
#: otherwise allocate gigabytes (``data/images.inspect_image``).
MAX_ASPECT_RATIO = 20
#: The image formats the project reads, by content (Pillow's names; a phone's multi-picture
#: JPEG opens through JPEG). Nothing else reaches a decoder: Pillow would otherwise open
#: EPS through Ghostscript, PSD, FITS and others from an uploaded file.
IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "TIFF")
