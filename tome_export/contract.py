"""What crosses the boundary between the exporter, the runtimes and the targets.

The names and limits every side must agree on, with no imports at all (the runtime side,
TensorRT build scripts and tests read them without torch or onnx):

- the plugin nodes the ``plugin`` lowering writes: domain ``tome_export`` (opset version
  1), ``BipartiteMerge`` (attributes ``r``, ``protected``, ``mode``) and ``TomesdMerge``
  (int attributes ``h``, ``w``, ``sx``, ``sy``, ``r``, ``seed``), their inputs and outputs,
  and the extra attributes TensorRT's ONNX parser reads to find the plugin;
- the decision outputs ``tome_slots_<i>`` (one slot map per merging layer) that
  verification compares and shipped graphs drop;
- onnx-tensorrt's TopK limit (K < 3840).

The semantics of the nodes are in docs/lowerings.md and docs/diffusion.md.
"""

from __future__ import annotations

PLUGIN_DOMAIN = "tome_export"
PLUGIN_VERSION = 1

BIPARTITE_OP_TYPE = "BipartiteMerge"
BIPARTITE_INPUTS = ("metric", "x", "size")
BIPARTITE_OUTPUTS = ("x_out", "size_out", "slot")
BIPARTITE_ATTRIBUTES = ("r", "protected", "mode")
BIPARTITE_MODES = ("weighted_mean",)

TOMESD_OP_TYPE = "TomesdMerge"
TOMESD_INPUTS = ("metric", "x")
TOMESD_OUTPUTS = ("x_out", "slot")
TOMESD_ATTRIBUTES = ("h", "w", "sx", "sy", "r", "seed")

# TensorRT's ONNX parser looks a plugin up by these node attributes (AOT: no JIT kernel).
TRT_PLUGIN_ATTRIBUTES = (("plugin_namespace", PLUGIN_DOMAIN), ("plugin_version", str(PLUGIN_VERSION)), ("aot", 1))

# onnx-tensorrt: "K must be less than 3840" for TopK.
TRT_TOPK_MAX_K = 3840

DECISION_PREFIX = "tome_slots_"


def qualified_op(op_type: str) -> str:
    """``"tome_export::BipartiteMerge"``: how TensorRT and onnxruntime-extensions name a plugin op."""
    return f"{PLUGIN_DOMAIN}::{op_type}"


def uses_plugin_domain(model) -> bool:
    """Whether an ``onnx.ModelProto`` has nodes or functions of the plugin domain (top-level graph).

    Duck-typed (``model.graph.node``, ``model.functions``): no onnx import needed."""
    return any(node.domain == PLUGIN_DOMAIN for node in model.graph.node) or any(
        f.domain == PLUGIN_DOMAIN for f in model.functions
    )


def decision_names(count: int) -> list[str]:
    """The names of ``count`` decision outputs, one per merging layer, in layer order."""
    return [f"{DECISION_PREFIX}{i}" for i in range(count)]


__all__ = [
    "BIPARTITE_ATTRIBUTES",
    "BIPARTITE_INPUTS",
    "BIPARTITE_MODES",
    "BIPARTITE_OP_TYPE",
    "BIPARTITE_OUTPUTS",
    "DECISION_PREFIX",
    "PLUGIN_DOMAIN",
    "PLUGIN_VERSION",
    "TOMESD_ATTRIBUTES",
    "TOMESD_INPUTS",
    "TOMESD_OP_TYPE",
    "TOMESD_OUTPUTS",
    "TRT_PLUGIN_ATTRIBUTES",
    "TRT_TOPK_MAX_K",
    "decision_names",
    "qualified_op",
    "uses_plugin_domain",
]
