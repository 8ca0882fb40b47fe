"""The ``plugin`` lowering: one custom-domain node per merge.

The node's contract is fixed (the TensorRT plugin and the Triton kernel implement it, and
``runtimes/ort_custom_ops.py`` implements it for ONNX Runtime):

- domain ``tome_export``, op_type ``BipartiteMerge``, opset version 1 of that domain;
- inputs ``metric`` (B, N, D) float, ``x`` (B, N, C) float, ``size`` (B, N, 1) float;
- outputs ``x_out`` (B, N-r, C) float, ``size_out`` (B, N-r, 1) float, ``slot`` (B, N) int64;
- attributes ``r`` (int), ``protected`` (int), ``mode`` (string): ``"weighted_mean"``, or
  ``"weighted_mean_b_first"`` when the body after the protected prefix alternates B, A (the
  official ToMe split of a class-token model). A mode, not a new attribute, so nodes
  written before keep their meaning and an implementation that knows only
  ``weighted_mean`` refuses the other instead of computing the wrong split.

Semantics: exactly ``tome_export.merging.bipartite.merge_tokens`` (documented in
docs/lowerings.md).

``tome_export::tomesd_merge`` becomes one ``tome_export.TomesdMerge`` node (version 1):
inputs ``metric`` (B, N, D), ``x`` (B, N, C); outputs ``x_out`` (B, N-r, C), ``slot``
(B, N) int64; int attributes ``h``, ``w``, ``sx``, ``sy``, ``r``, ``seed``. Semantics:
exactly ``tome_export.merging.tomesd.merge_tokens`` (docs/diffusion.md).
"""

from __future__ import annotations

import onnx.defs
from onnx.defs import OpSchema
from onnxscript import values

from tome_export.exporter.lowerings import Lowering, register_lowering

PLUGIN_DOMAIN = "tome_export"
PLUGIN_OP_TYPE = "BipartiteMerge"
PLUGIN_VERSION = 1
PLUGIN_MODES = ("weighted_mean", "weighted_mean_b_first")


def plugin_schema() -> OpSchema:
    """The node's ONNX schema: lets onnxscript build it and the checker validate it."""
    param = OpSchema.FormalParameter
    return OpSchema(
        PLUGIN_OP_TYPE,
        PLUGIN_DOMAIN,
        PLUGIN_VERSION,
        "ToMe bipartite soft matching and size-weighted merge of r tokens (see docs/lowerings.md).",
        inputs=[param("metric", "T", "(B, N, D)"), param("x", "T", "(B, N, C)"), param("size", "T", "(B, N, 1)")],
        outputs=[
            param("x_out", "T", "(B, N - r, C)"),
            param("size_out", "T", "(B, N - r, 1)"),
            param("slot", "tensor(int64)", "(B, N): output position of every input token"),
        ],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)"], "float tensors")],
        attributes=[
            OpSchema.Attribute("r", OpSchema.AttrType.INT, "tokens merged away"),
            OpSchema.Attribute("protected", OpSchema.AttrType.INT, "leading tokens that never merge"),
            OpSchema.Attribute(
                "mode", OpSchema.AttrType.STRING, "'weighted_mean', or 'weighted_mean_b_first' (official split)"
            ),
        ],
    )


TOMESD_OP_TYPE = "TomesdMerge"
TOMESD_ATTRIBUTES = ("h", "w", "sx", "sy", "r", "seed")


def tomesd_schema() -> OpSchema:
    """Schema of the tomesd merge node (same domain and version as BipartiteMerge)."""
    param = OpSchema.FormalParameter
    meanings = {
        "h": "latent grid height in tokens",
        "w": "latent grid width in tokens",
        "sx": "cell width (one destination per sx×sy cell)",
        "sy": "cell height",
        "r": "tokens merged away",
        "seed": "-1: top-left destination per cell; else random.Random(seed) picks one per cell",
    }
    return OpSchema(
        TOMESD_OP_TYPE,
        PLUGIN_DOMAIN,
        PLUGIN_VERSION,
        "tomesd token merge: r sources averaged into their most similar destination (see docs/diffusion.md).",
        inputs=[param("metric", "T", "(B, N, D)"), param("x", "T", "(B, N, C)")],
        outputs=[
            param("x_out", "T", "(B, N - r, C)"),
            param("slot", "tensor(int64)", "(B, N): output position of every input token"),
        ],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)"], "float tensors")],
        attributes=[OpSchema.Attribute(name, OpSchema.AttrType.INT, meanings[name]) for name in TOMESD_ATTRIBUTES],
    )


def _register_schema() -> None:
    for op_type, schema in ((PLUGIN_OP_TYPE, plugin_schema), (TOMESD_OP_TYPE, tomesd_schema)):
        if not onnx.defs.has(op_type, PLUGIN_DOMAIN):
            onnx.defs.register_schema(schema())


_register_schema()
plugin_opset = values.Opset(PLUGIN_DOMAIN, PLUGIN_VERSION)


def merge_plugin(metric, x, size, r: int, protected: int, b_first: bool = False):
    """``tome_export::bipartite_merge`` → one ``tome_export.BipartiteMerge`` node."""
    mode = PLUGIN_MODES[1] if b_first else PLUGIN_MODES[0]
    return plugin_opset.BipartiteMerge(metric, x, size, r=int(r), protected=int(protected), mode=mode, _outputs=3)


def tomesd_merge_plugin(metric, x, h: int, w: int, sx: int, sy: int, r: int, seed: int):
    """``tome_export::tomesd_merge`` → one ``tome_export.TomesdMerge`` node."""
    return plugin_opset.TomesdMerge(
        metric, x, h=int(h), w=int(w), sx=int(sx), sy=int(sy), r=int(r), seed=int(seed), _outputs=2
    )


def uses_plugin_domain(model) -> bool:
    """Whether an ``onnx.ModelProto`` has nodes of the plugin domain (top-level graph)."""
    return any(node.domain == PLUGIN_DOMAIN for node in model.graph.node) or any(
        f.domain == PLUGIN_DOMAIN for f in model.functions
    )


register_lowering(
    Lowering(
        "plugin",
        f"one {PLUGIN_DOMAIN}.{PLUGIN_OP_TYPE} custom node per merge (TensorRT plugin, ONNX Runtime custom op)",
        {"tome_export::bipartite_merge": merge_plugin, "tome_export::tomesd_merge": tomesd_merge_plugin},
        custom_domains=(PLUGIN_DOMAIN,),
    )
)
