"""tome-export: deploy token-merged PyTorch models to ONNX Runtime, TensorRT and Core ML.

The package root owns only the version and two lazy entry points: ``tome_export.apply``
(patch a model with a merging method, needs torch) and ``tome_export.runtime`` (run a
bundle, needs onnxruntime), so ``import tome_export`` itself stays free of heavy imports.
"""

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
