"""The ``plugin`` lowering: one custom-domain node per merge.

The node's contract is fixed (names in ``tome_export.contract``; the TensorRT plugin and the
Triton kernel implement it, and ``runtimes/ort_custom_ops.py`` implements it for ONNX Runtime):

- domain ``tome_export``, op_type ``BipartiteMerge``, opset version 1 of that domain;
- inputs ``metric`` (B, N, D) float, ``x`` (B, N, C) float, ``size`` (B, N, 1) float;
- outputs ``x_out`` (B, N-r, C) float, ``size_out`` (B, N-r, 1) float, ``slot`` (B, N) int64;
- attributes ``r`` (int), ``protected`` (int), ``mode`` (string, ``"weighted_mean"``).

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

from tome_export.contract import (
    BIPARTITE_ATTRIBUTES,
    BIPARTITE_INPUTS,
    BIPARTITE_MODES,
    BIPARTITE_OP_TYPE,
    BIPARTITE_OUTPUTS,
    PLUGIN_DOMAIN,
    PLUGIN_VERSION,
    TOMESD_ATTRIBUTES,
    TOMESD_INPUTS,
    TOMESD_OP_TYPE,
    TOMESD_OUTPUTS,
    uses_plugin_domain,  # noqa: F401  (runtimes/onnxruntime.py imports it from here)
)


def plugin_schema() -> OpSchema:
    """The node's ONNX schema: lets onnxscript build it and the checker validate it."""
    param = OpSchema.FormalParameter
    return OpSchema(
        BIPARTITE_OP_TYPE,
        PLUGIN_DOMAIN,
        PLUGIN_VERSION,
        "ToMe bipartite soft matching and size-weighted merge of r tokens (see docs/lowerings.md).",
        inputs=[
            param(name, "T", shape) for name, shape in zip(BIPARTITE_INPUTS, ("(B, N, D)", "(B, N, C)", "(B, N, 1)"))
        ],
        outputs=[
            param(BIPARTITE_OUTPUTS[0], "T", "(B, N - r, C)"),
            param(BIPARTITE_OUTPUTS[1], "T", "(B, N - r, 1)"),
            param(BIPARTITE_OUTPUTS[2], "tensor(int64)", "(B, N): output position of every input token"),
        ],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)"], "float tensors")],
        attributes=[
            OpSchema.Attribute(name, kind, meaning)
            for name, kind, meaning in zip(
                BIPARTITE_ATTRIBUTES,
                (OpSchema.AttrType.INT, OpSchema.AttrType.INT, OpSchema.AttrType.STRING),
                ("tokens merged away", "leading tokens that never merge", f"one of {BIPARTITE_MODES}"),
            )
        ],
    )


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
        inputs=[param(name, "T", shape) for name, shape in zip(TOMESD_INPUTS, ("(B, N, D)", "(B, N, C)"))],
        outputs=[
            param(TOMESD_OUTPUTS[0], "T", "(B, N - r, C)"),
            param(TOMESD_OUTPUTS[1], "tensor(int64)", "(B, N): output position of every input token"),
        ],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)"], "float tensors")],
        attributes=[OpSchema.Attribute(name, OpSchema.AttrType.INT, meanings[name]) for name in TOMESD_ATTRIBUTES],
    )


def _register_schema() -> None:
    # onnx.defs is process-wide: onnxscript needs the schemas to build the nodes and
    # onnx.checker to validate them, so they are registered once, on import.
    for op_type, schema in ((BIPARTITE_OP_TYPE, plugin_schema), (TOMESD_OP_TYPE, tomesd_schema)):
        if not onnx.defs.has(op_type, PLUGIN_DOMAIN):
            onnx.defs.register_schema(schema())


_register_schema()
plugin_opset = values.Opset(PLUGIN_DOMAIN, PLUGIN_VERSION)


def merge_plugin(metric, x, size, r: int, protected: int):
    """``tome_export::bipartite_merge`` → one ``tome_export.BipartiteMerge`` node."""
    return plugin_opset.BipartiteMerge(
        metric, x, size, r=int(r), protected=int(protected), mode=BIPARTITE_MODES[0], _outputs=3
    )


def tomesd_merge_plugin(metric, x, h: int, w: int, sx: int, sy: int, r: int, seed: int):
    """``tome_export::tomesd_merge`` → one ``tome_export.TomesdMerge`` node."""
    return plugin_opset.TomesdMerge(
        metric, x, h=int(h), w=int(w), sx=int(sx), sy=int(sy), r=int(r), seed=int(seed), _outputs=2
    )
