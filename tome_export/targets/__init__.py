"""Targets: how a patched model becomes verified artifacts for one runtime family.

``TARGETS`` below is the one table of targets. Each :class:`Target` record (``base.py``)
names its lowerings and the hooks it adds to the one export path (``export_path.py``):
``onnx.py`` (ONNX Runtime), ``tensorrt.py`` (TensorRT-ready ONNX + engines or build scripts),
``coreml.py`` (Core ML mlprogram). ``tome_export.pipeline.export`` resolves options and
runs the path for the chosen target.
"""

from __future__ import annotations

from tome_export.errors import UserError
from tome_export.targets import coreml, onnx, tensorrt
from tome_export.targets.base import ExportContext, Target

TARGETS: dict[str, Target] = {target.name: target for target in (onnx.TARGET, tensorrt.TARGET, coreml.TARGET)}


def get_target(name: str) -> Target:
    if name not in TARGETS:
        raise UserError(f"unknown target {name!r}; choose one of: {', '.join(sorted(TARGETS))}")
    return TARGETS[name]


__all__ = ["TARGETS", "ExportContext", "Target", "get_target"]
