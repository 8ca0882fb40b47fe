"""ONNX → ONNX passes run after export: pruning outputs (``prune``), TensorRT readiness
checks and fixes (``trt_readiness``), splitting into blocks for dynamic loading (``split``)
and saving graphs that share external weights (``external_data``)."""

from tome_export.graph_passes.prune import drop_outputs

__all__ = ["drop_outputs"]
