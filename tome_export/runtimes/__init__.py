"""Runtimes that load and run exported models, one module per backend: ONNX Runtime
(``onnxruntime``), its CUDA-graph variant (``ort_cuda``), the plugin ops' CPU implementation
(``ort_custom_ops``) and the block-wise runner for dynamic loading (``dynamic``)."""

from __future__ import annotations

from collections.abc import Callable

RUNTIMES: dict[str, Callable] = {}


def register_runtime(name: str, factory: Callable) -> None:
    RUNTIMES[name] = factory


def _onnxruntime(*args, **kwargs):
    from tome_export.runtimes.onnxruntime import OnnxRuntimeRunner

    return OnnxRuntimeRunner(*args, **kwargs)


register_runtime("onnxruntime", _onnxruntime)

__all__ = ["RUNTIMES", "register_runtime"]
