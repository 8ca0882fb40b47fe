"""The ``dense`` lowering: the merge as one-hot assignment matrices and MatMul.

No Scatter*, no GatherElements: matching uses MatMul/ReduceMax/ArgMax/TopK, the set of
merged A tokens is a threshold at TopK's r-th value (ties by CumSum), the output row of every A token is a
CumSum/Where, and the merge itself is one MatMul of a (K × Na) one-hot matrix with the
size-weighted A tokens. Every op is native in TensorRT (TopK with sorted=1 and K < 3840,
as onnx-tensorrt requires) and maps onto Core ML / the Neural Engine.

The price is O(N²·C): the one-hot MatMul does 2·B·(N−p−r)·⌈(N−p)/2⌉·(C+1) FLOPs where
the scatter lowering moves B·(N−p)·(C+1) values. Each translation records that cost in
the current export's log (``export_log.current().notes``) so the export log says it (see
:func:`dense_cost`).
"""

from __future__ import annotations

import logging

from onnx import TensorProto
from onnxscript import opset18 as op

from tome_export.contract import TRT_TOPK_MAX_K
from tome_export.exporter.export_log import current
from tome_export.exporter.lowering_ops import arange_rows, finish, interleave_slots, ints, no_merge, take

log = logging.getLogger(__name__)

# onnx-tensorrt accepts TopK only with K < 3840; above it the merged set comes from a
# pairwise rank (O(Na²) comparisons) instead.
TOPK_LIMIT = TRT_TOPK_MAX_K


def dense_cost(batch: int, num_tokens: int, channels: int, r: int, protected: int) -> dict:
    """Estimated arithmetic of one dense merge against the scatter lowering."""
    body = num_tokens - protected
    num_a = (body + 1) // 2
    rows = body - r  # unmerged A rows + B rows
    dense_flops = 2 * batch * rows * num_a * (channels + 1)
    scatter_moves = batch * body * (channels + 1)
    return {
        "lowering": "dense",
        "batch": batch,
        "tokens": num_tokens,
        "channels": channels,
        "r": r,
        "protected": protected,
        "extra_mflops": round(dense_flops / 1e6, 3),
        "scatter_melements": round(scatter_moves / 1e6, 3),
        "message": (
            f"dense merge N={num_tokens} C={channels} r={r} (batch {batch}): one-hot MatMul ≈ "
            f"{dense_flops / 1e6:.1f} extra MFLOP per merge, O(N²·C); scatter moves "
            f"{scatter_moves / 1e6:.2f} M values instead"
        ),
    }


def merged_flags_topk(node_max, num_a: int, r: int):
    """(B, Na) bool: is the A token among the r best edges (stable descending order)?

    TopK gives the r-th best score v; tokens above v merge, and of those equal to v the
    lowest-indexed ones fill the remaining places (CumSum over the ties) — TopK's and the
    eager stable sort's tie-break. O(Na) after the TopK: no one-hot, no scatter."""
    values, _ = op.TopK(node_max, ints(r), axis=-1, largest=1, sorted=1)
    threshold = take(values, r - 1, r, axis=1)  # (B, 1)
    above = op.Greater(node_max, threshold)
    tied = op.Equal(node_max, threshold)
    places_left = op.Sub(
        op.Constant(value_int=r), op.ReduceSum(op.Cast(above, to=TensorProto.INT64), ints(1), keepdims=1)
    )
    tie_rank = op.CumSum(op.Cast(tied, to=TensorProto.INT64), op.Constant(value_int=1), exclusive=1)
    return op.Or(above, op.And(tied, op.Less(tie_rank, places_left)))


def merged_flags_rank(node_max, num_a: int, r: int):
    """Same as :func:`merged_flags_topk` by a pairwise rank — for K past TensorRT's TopK limit.

    rank(i) = #{j: s_j > s_i} + #{j < i: s_j = s_i}, the position in a stable descending sort."""
    index = op.Range(op.Constant(value_int=0), op.Constant(value_int=num_a), op.Constant(value_int=1))
    earlier = op.Less(op.Unsqueeze(index, ints(0)), op.Unsqueeze(index, ints(1)))  # [i, j] = j < i
    mine, other = op.Unsqueeze(node_max, ints(2)), op.Unsqueeze(node_max, ints(1))
    ahead = op.Or(op.Greater(other, mine), op.And(op.Equal(other, mine), earlier))
    rank = op.ReduceSum(op.Cast(ahead, to=TensorProto.INT64), ints(2), keepdims=0)
    return op.Less(rank, op.Constant(value_int=r))


def merge_dense(metric, x, size, r: int, protected: int):
    batch, num_tokens, channels = (int(d) for d in x.shape)
    if r == 0:
        return no_merge(x, size, batch, num_tokens, protected)
    cost = dense_cost(batch, num_tokens, channels, r, protected)
    current().notes.append(cost)
    log.info(cost["message"])
    body_tokens = num_tokens - protected
    num_a, num_b = (body_tokens + 1) // 2, body_tokens // 2
    kept = num_a - r

    # Matching, as scatter_lowering.match computes it up to the edge scores.
    body = take(metric, protected) if protected else metric
    body = op.Div(body, op.ReduceL2(body, ints(-1), keepdims=1))
    scores = op.MatMul(take(body, 0, step=2), op.Transpose(take(body, 1, step=2), perm=[0, 2, 1]))
    node_max = op.ReduceMax(scores, ints(-1), keepdims=0)
    node_idx = op.ArgMax(scores, axis=-1, keepdims=0)
    flags = merged_flags_topk if r < TOPK_LIMIT else merged_flags_rank
    merged = flags(node_max, num_a, r)

    # Row of every A token in [unmerged A (ascending) | B]: kept ones by their rank among
    # kept tokens, merged ones at their destination B token.
    kept_rank = op.CumSum(op.Cast(op.Not(merged), to=TensorProto.INT64), op.Constant(value_int=1), exclusive=1)
    row = op.Where(merged, op.Add(node_idx, op.Constant(value_int=kept)), kept_rank)  # (B, Na)

    body_x = take(x, protected) if protected else x
    body_size = take(size, protected) if protected else size
    z = op.Concat(op.Mul(body_x, body_size), body_size, axis=2)
    za, zb = take(z, 0, step=2), take(z, 1, step=2)
    rows = op.Range(op.Constant(value_int=0), op.Constant(value_int=kept + num_b), op.Constant(value_int=1))
    assignment = op.CastLike(op.Equal(op.Unsqueeze(rows, ints(0, 2)), op.Unsqueeze(row, ints(1))), za)  # (B,K,Na)
    mixed = op.MatMul(assignment, za)  # (B, kept + Nb, C + 1)
    if kept:
        merged_z = op.Concat(take(mixed, 0, kept), op.Add(take(mixed, kept), zb), axis=1)
    else:
        merged_z = op.Add(mixed, zb)
    merged_x, merged_size = finish(merged_z, x, size, channels, protected)

    slot_a = op.Add(row, op.Constant(value_int=protected))
    slot_b = arange_rows(batch, protected + kept, num_b)
    slot = interleave_slots(slot_a, slot_b, batch, num_tokens, protected)
    return merged_x, merged_size, slot
