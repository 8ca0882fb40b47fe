"""ONNX → ONNX passes: pruning, fusion, readiness checks, splitting."""

from tome_export.graph_passes.prune import drop_outputs

__all__ = ["drop_outputs"]
