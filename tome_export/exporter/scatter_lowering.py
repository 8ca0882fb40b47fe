"""The ``scatter`` lowering of ``tome_export::bipartite_merge``: few nodes, gathers, no reducing scatter.

The merge is many small steps on small tensors, so on ONNX Runtime CPU its cost is the
number of nodes and passes over the tokens, not arithmetic (issue 15: the first version's
38 nodes a merge cost ≈10% of a merged ViT-S block). Everything static — where the
protected, A and B tokens sit — is a constant the runtime folds, and every token move works
on original token positions:

- match: LpNormalization of the metric, Gather of the A and B rows by constant positions,
  one MatMul, TopK(k=1) for the best edge of each A token (TopK's tie-break is ArgMax's:
  lower index first), TopK for the edge order, sliced into merged / kept, TopK(ascending)
  to put the kept ones back in position order; indices stay (B, K, 1) columns, which is
  what GatherND (batch_dims=1) and GatherElements take without Unsqueeze/Expand;
- merge: one GatherND of the rows kept, in output order, from x·size (and one from size);
  the merged rows are added into their destinations by ScatterElements(add) (not
  ScatterND: ONNX Runtime's CPU kernel races on duplicate indices), then one Div. A
  (B, N−r, r) one-hot MatMul can do the sum instead (``ONE_HOT_MAX_ROWS``); on a quiet
  2-core CPU it was 1.1–1.2× slower at every size measured (N = 197…1370), so it is off.

Protected tokens ride along in the gathers: their size is 1, so (x·1)/1 is x bit for bit.
The slot map (the decision; a graph output only in the verification graph) is one
ScatterElements of output rows to original positions. The name ``scatter`` is kept for
compatibility: it is the ONNX Runtime lowering; TensorRT and Core ML use ``dense``.
"""

from __future__ import annotations

from onnxscript import opset18 as op

from tome_export.exporter.lowering_ops import ints, take


def token_positions(num_tokens: int, protected: int, b_first: bool) -> tuple[list[int], list[int]]:
    """Original positions of the A tokens and of the B tokens (see ``bipartite.split_ab``)."""
    body = list(range(protected, num_tokens))
    even, odd = body[0::2], body[1::2]
    return (odd, even) if b_first else (even, odd)


def index_column(values: list[int], batch: int):
    """Constant (B, K, 1) int64 column of ``values`` (folded by the runtime)."""
    return op.Expand(op.Reshape(ints(*values), ints(1, len(values), 1)), ints(batch, len(values), 1))


def match_columns(metric, r: int, protected: int, b_first: bool):
    """Bipartite matching as (B, K, 1) int64 columns: (unm_idx, src_idx, dst_idx), eager tie-breaking.

    unm_idx / src_idx index the A tokens, dst_idx the B tokens (as ``bipartite.match``);
    unm_idx is None when every A token merges."""
    _, num_tokens, _ = (int(d) for d in metric.shape)
    a_pos, b_pos = token_positions(num_tokens, protected, b_first)
    num_a = len(a_pos)
    unit = op.LpNormalization(metric, axis=-1, p=2)
    a = op.Gather(unit, ints(*a_pos), axis=1)
    b = op.Gather(unit, ints(*b_pos), axis=1)
    scores = op.MatMul(a, op.Transpose(b, perm=[0, 2, 1]))  # (B, Na, Nb)
    node_max, node_idx = op.TopK(scores, ints(1), axis=-1, largest=1, sorted=1)  # (B, Na, 1) each
    _, edge_idx = op.TopK(node_max, ints(num_a), axis=1, largest=1, sorted=1)
    if r == num_a:
        src_idx, unm_idx = edge_idx, None
    else:
        src_idx, rest = take(edge_idx, 0, r), take(edge_idx, r)
        unm_idx, _ = op.TopK(rest, ints(num_a - r), axis=1, largest=0, sorted=1)
    dst_idx = op.GatherElements(node_idx, src_idx, axis=1)
    return unm_idx, src_idx, dst_idx


# Up to this many output rows merged rows are summed by a one-hot MatMul instead of
# ScatterElements(add). 0 = never: bench/bench_merge_op.py measured the MatMul 1.1-1.3x
# slower at N = 197, 577 and 1370 on ONNX Runtime 1.32 CPU; re-measure on other runtimes.
ONE_HOT_MAX_ROWS = 0


def one_hot_pays(num_tokens: int, r: int) -> bool:
    """Whether merged rows are summed by the one-hot MatMul (see ONE_HOT_MAX_ROWS)."""
    return num_tokens - r <= ONE_HOT_MAX_ROWS


def merge_scatter(metric, x, size, r: int, protected: int, b_first: bool = False):
    batch, num_tokens, channels = (int(d) for d in x.shape)
    b_first = bool(b_first)
    a_pos, b_pos = token_positions(num_tokens, protected, b_first)
    if r == 0:
        return no_merge(x, size, batch, protected, a_pos, b_pos)
    unm_idx, src_idx, dst_idx = match_columns(metric, r, protected, b_first)
    kept = len(a_pos) - r
    a_table = ints(*a_pos)
    parts = [index_column(list(range(protected)), batch)] if protected else []
    if unm_idx is not None:
        parts.append(op.Gather(a_table, unm_idx))
    parts.append(index_column(b_pos, batch))
    rows_kept = op.Concat(*parts, axis=1) if len(parts) > 1 else parts[0]  # (B, N - r, 1) positions
    rows_merged = op.Gather(a_table, src_idx)  # (B, r, 1)
    out_rows = op.Add(dst_idx, op.Constant(value_int=protected + kept))  # (B, r, 1)
    weighted = op.Mul(x, size)
    if one_hot_pays(num_tokens, r):
        # (B, N - r, r) one-hot MatMul (see ONE_HOT_MAX_ROWS).
        rows = op.Reshape(ints(*range(num_tokens - r)), ints(1, 1, num_tokens - r))
        into = op.Transpose(op.CastLike(op.Equal(out_rows, rows), x), perm=[0, 2, 1])

        def gather_sum(t):
            return op.Add(
                op.GatherND(t, rows_kept, batch_dims=1), op.MatMul(into, op.GatherND(t, rows_merged, batch_dims=1))
            )

        total, merged_size = gather_sum(weighted), gather_sum(size)
    else:
        # ScatterElements(add), not ScatterND(add): ONNX Runtime's CPU ScatterND adds duplicate
        # destination rows from several threads unsynchronised (onnxruntime#18048).
        def gather_sum(t, width: int):
            index = op.Expand(out_rows, ints(batch, r, width))
            kept_rows = op.GatherND(t, rows_kept, batch_dims=1)
            return op.ScatterElements(kept_rows, index, op.GatherND(t, rows_merged, batch_dims=1), axis=1, reduction="add")

        total, merged_size = gather_sum(weighted, channels), gather_sum(size, 1)
    slot = slot_map(batch, num_tokens, r, rows_kept, rows_merged, out_rows)
    return op.Div(total, merged_size), merged_size, slot


def slot_map(batch: int, num_tokens: int, r: int, rows_kept, rows_merged, out_rows):
    """(B, N) int64 output row of every input token, as ``bipartite.slots`` computes it."""
    kept_rows = index_column(list(range(num_tokens - r)), batch)
    positions = op.Concat(rows_kept, rows_merged, axis=1)
    rows = op.Concat(kept_rows, out_rows, axis=1)
    empty = op.Expand(op.Constant(value_int=0), ints(batch, num_tokens, 1))
    return op.Squeeze(op.ScatterElements(empty, positions, rows, axis=1), ints(2))


def no_merge(x, size, batch: int, protected: int, a_pos: list[int], b_pos: list[int]):
    """r = 0 as the eager op defines it: nothing merges, but tokens come out in the merge
    layout (protected, A tokens, B tokens) and the slot map says so."""
    order = [*range(protected), *a_pos, *b_pos]
    slot = [0] * len(order)
    for row, position in enumerate(order):
        slot[position] = row
    permutation = ints(*order)
    slot_rows = op.Expand(op.Reshape(ints(*slot), ints(1, len(slot))), ints(batch, len(slot)))
    return op.Gather(x, permutation, axis=1), op.Gather(size, permutation, axis=1), slot_rows
