"""tome-export: deploy token-merged PyTorch models to ONNX Runtime, TensorRT and Core ML."""

from tome_export.merging import apply

__version__ = "0.1.0"

__all__ = ["__version__", "apply", "runtime"]


def __getattr__(name: str):
    # `tome_export.runtime` imports onnxruntime; load it only when asked for.
    if name == "runtime":
        import importlib

        return importlib.import_module("tome_export.runtime")
    raise AttributeError(f"module 'tome_export' has no attribute {name!r}")
