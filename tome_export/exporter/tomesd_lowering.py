"""ONNX translations of ``tome_export::tomesd_merge`` (see ``merging/tomesd.py``).

The source/destination partition is fixed at export time, so it is computed here in
Python (the same ``partition`` the eager op uses) and embedded as constant indices. Both
translations are entries of the ``LOWERINGS`` table (``lowerings.py``).

- ``scatter``: Gather the partition, TopK matching, whole source rows gathered with
  GatherND(batch_dims=1), summed into their destinations with ScatterElements(add) (values
  and a count per destination), then divide. Not ScatterND(add): ONNX Runtime adds its
  duplicate indices from several threads without synchronisation. (Not for TensorRT —
  the ``dense`` lowering is.)
- ``dense``: the same matching, then one-hot
  assignment matrices and MatMul — no Scatter, no GatherElements. O(N²·C).
"""

from __future__ import annotations

from onnxscript import opset18 as op

from tome_export.exporter.lowering_ops import arange_rows, ints, take
from tome_export.merging.tomesd import partition


def _geometry(x, h: int, w: int, sx: int, sy: int, r: int, seed: int) -> dict:
    batch, num_tokens, channels = (int(d) for d in x.shape)
    a_list, b_list = (list(t) for t in partition(h, w, sx, sy, seed))
    order = a_list + b_list
    inverse = [0] * num_tokens
    for position, token in enumerate(order):
        inverse[token] = position
    return dict(
        batch=batch,
        channels=channels,
        num_a=len(a_list),
        num_b=len(b_list),
        kept=len(a_list) - r,
        a_idx=ints(*a_list),
        b_idx=ints(*b_list),
        inverse=ints(*inverse),
    )


def _match(metric, g: dict, r: int, one_hot_dst: bool = False):
    """(src_idx, unm_idx, dst_idx) as ``merge_tokens`` computes them, ties included.

    ``one_hot_dst`` picks each source's destination with a one-hot MatMul instead of
    GatherElements (for the dense lowering)."""
    a = op.Gather(metric, g["a_idx"], axis=1)
    b = op.Gather(metric, g["b_idx"], axis=1)
    b = op.Div(b, op.ReduceL2(b, ints(-1), keepdims=1))
    scores = op.MatMul(a, op.Transpose(b, perm=[0, 2, 1]))
    node_max = op.Div(op.ReduceMax(scores, ints(-1), keepdims=0), op.ReduceL2(a, ints(-1), keepdims=0))
    node_idx = op.ArgMax(scores, axis=-1, keepdims=0)
    _, edge_idx = op.TopK(node_max, ints(g["num_a"]), axis=-1, largest=1, sorted=1)
    src_idx = take(edge_idx, 0, r)
    unm_idx = None
    if g["kept"] > 0:
        unm_idx, _ = op.TopK(take(edge_idx, r), ints(g["kept"]), axis=-1, largest=0, sorted=1)
    if one_hot_dst:
        # Indices < 2^24 survive the float MatMul exactly.
        picked = op.MatMul(_one_hot(src_idx, g["num_a"], metric), op.Unsqueeze(op.CastLike(node_idx, metric), ints(2)))
        dst_idx = op.Cast(op.Squeeze(picked, ints(2)), to=7)  # INT64
    else:
        dst_idx = op.GatherElements(node_idx, src_idx, axis=1)
    return src_idx, unm_idx, dst_idx


def _slot(slot_a, g: dict):
    """Full (B, N) slot map from the sources' slots; destinations sit after the kept."""
    slot_b = arange_rows(g["batch"], g["kept"], g["num_b"])
    return op.Gather(op.Concat(slot_a, slot_b, axis=1), g["inverse"], axis=1)


def _ones(like, *shape: int):
    return op.Expand(op.CastLike(op.Constant(value_float=1.0), like), ints(*shape))


def tomesd_merge_scatter(metric, x, h: int, w: int, sx: int, sy: int, r: int, seed: int):
    g = _geometry(x, h, w, sx, sy, r, seed)
    batch, kept, num_a, num_b, channels = g["batch"], g["kept"], g["num_a"], g["num_b"], g["channels"]
    src_idx, unm_idx, dst_idx = _match(metric, g, r)
    xa = op.Gather(x, g["a_idx"], axis=1)
    xb = op.Gather(x, g["b_idx"], axis=1)
    # Whole token rows: GatherND(batch_dims=1) and ScatterND(add) copy C values per index,
    # where GatherElements/ScatterElements index every element (several times slower on ORT).
    src = op.GatherND(xa, op.Unsqueeze(src_idx, ints(2)), batch_dims=1)
    # ScatterElements(add), not ScatterND(add): ONNX Runtime's CPU ScatterND splits the
    # index rows over threads and adds duplicate destinations without synchronisation —
    # at N=4096, r=2048 two threads lose updates (max abs err 0.4–0.7 with identical
    # decisions, varying from run to run; onnxruntime#18048, #23396). ScatterElements
    # runs one thread and costs ~4 ms more at that size.
    dst_unsq = op.Unsqueeze(dst_idx, ints(2))
    sums = op.ScatterElements(xb, op.Expand(dst_unsq, ints(batch, r, channels)), src, axis=1, reduction="add")
    counts = op.ScatterElements(_ones(x, batch, num_b, 1), dst_unsq, _ones(x, batch, r, 1), axis=1, reduction="add")
    dst = op.Div(sums, counts)
    zeros_a = op.Expand(op.Constant(value_int=0), ints(batch, num_a))
    dst_slots = op.Add(dst_idx, op.Constant(value_int=kept))
    if unm_idx is None:
        return dst, _slot(op.ScatterElements(zeros_a, src_idx, dst_slots, axis=1), g)
    unm = op.GatherND(xa, op.Unsqueeze(unm_idx, ints(2)), batch_dims=1)
    slot_a = op.ScatterElements(
        zeros_a,
        op.Concat(unm_idx, src_idx, axis=1),
        op.Concat(arange_rows(batch, 0, kept), dst_slots, axis=1),
        axis=1,
    )
    return op.Concat(unm, dst, axis=1), _slot(slot_a, g)


def _one_hot(index, depth: int, like):
    """(B, K) int64 → (B, K, depth) one-hot with ``like``'s float type (Equal + Cast)."""
    positions = op.Range(op.Constant(value_int=0), op.Constant(value_int=depth), op.Constant(value_int=1))
    return op.CastLike(op.Equal(op.Unsqueeze(index, ints(2)), positions), like)


def tomesd_merge_dense(metric, x, h: int, w: int, sx: int, sy: int, r: int, seed: int):
    g = _geometry(x, h, w, sx, sy, r, seed)
    kept, num_a, num_b = g["kept"], g["num_a"], g["num_b"]
    src_idx, unm_idx, dst_idx = _match(metric, g, r, one_hot_dst=True)
    xa = op.Gather(x, g["a_idx"], axis=1)
    xb = op.Gather(x, g["b_idx"], axis=1)
    src_hot = _one_hot(src_idx, num_a, x)  # (B, r, Na)
    dst_hot = _one_hot(dst_idx, num_b, x)  # (B, r, Nb)
    dst_hot_t = op.Transpose(dst_hot, perm=[0, 2, 1])
    sums = op.Add(xb, op.MatMul(dst_hot_t, op.MatMul(src_hot, xa)))
    counts = op.Add(op.ReduceSum(dst_hot_t, ints(-1), keepdims=1), _ones(x, 1, 1, 1))
    dst = op.Div(sums, counts)
    # Slots through MatMul in float: exact, token counts are far below 2^24.
    dst_slots = op.CastLike(op.Add(dst_idx, op.Constant(value_int=kept)), x)
    slot_a = op.MatMul(op.Unsqueeze(dst_slots, ints(1)), src_hot)  # (B, 1, Na)
    if unm_idx is not None:
        unm_hot = _one_hot(unm_idx, num_a, x)  # (B, kept, Na)
        positions = op.CastLike(
            op.Range(op.Constant(value_int=0), op.Constant(value_int=kept), op.Constant(value_int=1)), x
        )
        slot_a = op.Add(slot_a, op.MatMul(op.Unsqueeze(positions, ints(0)), unm_hot))
        dst = op.Concat(op.MatMul(unm_hot, xa), dst, axis=1)
    slot_a = op.Cast(op.Squeeze(slot_a, ints(1)), to=7)  # INT64
    return dst, _slot(slot_a, g)
