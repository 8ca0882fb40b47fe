"""The ``scatter`` lowering of ``tome_export::bipartite_merge``: gathers and ScatterElements(add).

GatherElements + ScatterElements(reduction="add") of size-weighted values and sizes, then
divide: the mean, duplicates included (not ScatterND: ONNX Runtime's CPU kernel races on
duplicate indices). Best on ONNX Runtime (onnx-tensorrt rejects Scatter ops with a
reduction: TensorRT uses ``dense``). ``match`` is the bipartite
matching with the eager tie-breaking (TopK over the best edge per A token).
"""

from __future__ import annotations

from onnxscript import opset18 as op

from tome_export.exporter.lowering_ops import (
    ab_counts,
    along_channels,
    arange_rows,
    body_ab,
    finish,
    interleave_slots,
    ints,
    no_merge,
    take,
)


def match(metric, r: int, protected: int, b_first: bool = False):
    """Bipartite matching: (unm_idx, src_idx, dst_idx) with the eager tie-breaking."""
    batch, num_tokens, _ = (int(d) for d in metric.shape)
    body = take(metric, protected) if protected else metric
    body = op.Div(body, op.ReduceL2(body, ints(-1), keepdims=1))
    a, b = body_ab(body, 0, b_first)
    num_a, _ = ab_counts(num_tokens - protected, b_first)
    scores = op.MatMul(a, op.Transpose(b, perm=[0, 2, 1]))
    node_max = op.ReduceMax(scores, ints(-1), keepdims=0)
    node_idx = op.ArgMax(scores, axis=-1, keepdims=0)
    _, edge_idx = op.TopK(node_max, ints(num_a), axis=-1, largest=1, sorted=1)
    src_idx = take(edge_idx, 0, r)
    unm_idx, _ = op.TopK(take(edge_idx, r), ints(num_a - r), axis=-1, largest=0, sorted=1)
    dst_idx = op.GatherElements(node_idx, src_idx, axis=1)
    return unm_idx, src_idx, dst_idx


def slots_graph(unm_idx, src_idx, dst_idx, batch: int, num_tokens: int, protected: int, r: int, b_first: bool = False):
    """Output slot of every input token (B, N) int64, as ``bipartite.slots`` computes it."""
    num_a, num_b = ab_counts(num_tokens - protected, b_first)
    kept = num_a - r
    updates = op.Concat(
        arange_rows(batch, protected, kept),
        op.Add(dst_idx, op.Constant(value_int=protected + kept)),
        axis=1,
    )
    slot_a = op.ScatterElements(
        op.Expand(op.Constant(value_int=0), ints(batch, num_a)),
        op.Concat(unm_idx, src_idx, axis=1),
        updates,
        axis=1,
    )
    slot_b = arange_rows(batch, protected + kept, num_b)
    return interleave_slots(slot_a, slot_b, batch, num_tokens, protected, b_first)


def merge_scatter(metric, x, size, r: int, protected: int, b_first: bool = False):
    batch, num_tokens, channels = (int(d) for d in x.shape)
    b_first = bool(b_first)
    if r == 0:
        return no_merge(x, size, batch, num_tokens, protected, b_first)
    unm_idx, src_idx, dst_idx = match(metric, r, protected, b_first)
    body_x = take(x, protected) if protected else x
    body_size = take(size, protected) if protected else size
    z = op.Concat(op.Mul(body_x, body_size), body_size, axis=2)
    za, zb = body_ab(z, 0, b_first)
    width, kept = channels + 1, ab_counts(num_tokens - protected, b_first)[0] - r
    src = op.GatherElements(za, along_channels(src_idx, batch, r, width), axis=1)
    unm = op.GatherElements(za, along_channels(unm_idx, batch, kept, width), axis=1)
    # ScatterElements(add), not ScatterND(add): ONNX Runtime's CPU ScatterND adds duplicate
    # destination rows from several threads unsynchronised once the merge is large enough
    # (onnxruntime#18048; measured: SD-scale tomesd, and 1 of 200 runs at 1024 rows of 385).
    dst = op.ScatterElements(zb, along_channels(dst_idx, batch, r, width), src, axis=1, reduction="add")
    merged_x, merged_size = finish(op.Concat(unm, dst, axis=1), x, size, channels, protected)
    slot = slots_graph(unm_idx, src_idx, dst_idx, batch, num_tokens, protected, r, b_first)
    return merged_x, merged_size, slot
