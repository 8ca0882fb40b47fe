"""tome-export: deploy token-merged PyTorch models to ONNX Runtime, TensorRT and Core ML."""

__version__ = "0.1.0"

__all__ = ["__version__", "apply", "runtime"]


def __getattr__(name: str):
    # Loaded on first use: `apply` needs torch, `runtime` onnxruntime; the CLI's results
    # commands (report, import-results) and error paths start without either.
    if name == "apply":
        from tome_export.merging import apply

        return apply
    if name == "runtime":
        import importlib

        return importlib.import_module("tome_export.runtime")
    raise AttributeError(f"module 'tome_export' has no attribute {name!r}")
