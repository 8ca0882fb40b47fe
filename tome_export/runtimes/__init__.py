"""Runtimes that build and run exported models, one per backend."""

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
