"""synermix: from labelled inspection photos to a tested, versioned ONNX model."""

__version__ = "0.1.0"
