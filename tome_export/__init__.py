"""tome-export: deploy token-merged PyTorch models to ONNX Runtime, TensorRT and Core ML."""

from tome_export.merging import apply

__version__ = "0.1.0"

__all__ = ["__version__", "apply"]
