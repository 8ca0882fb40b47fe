"""ONNX lowerings of the merge op: a registry of onnxscript translation functions.

A lowering turns ``tome_export::bipartite_merge`` into ONNX nodes. Shapes are static at
export time, so the functions read them from their inputs and emit constants.

- ``scatter``: GatherElements + ScatterElements(reduction="add") of size-weighted values
  and sizes, then divide — the mean, duplicates included (not ScatterND: ONNX Runtime's
  CPU kernel races on duplicate indices). Best on ONNX Runtime
  (onnx-tensorrt rejects Scatter ops with a reduction: TensorRT uses ``dense``).
- ``dense`` (``dense_lowering.py``): one-hot assignment matrices and MatMul, no Scatter and
  no GatherElements; O(N²·C), for TensorRT without plugins and the Neural Engine.
- ``plugin`` (``plugin_lowering.py``): one ``tome_export.BipartiteMerge`` node per merge.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from onnxscript import opset18 as op

from tome_export.errors import UserError

INT64_MAX = 2**63 - 1


@dataclass(frozen=True)
class Lowering:
    """One way to write every merge op in ONNX.

    ``translations`` maps a custom op's qualified name (``"tome_export::bipartite_merge"``)
    to its onnxscript translation function.
    """

    name: str
    summary: str
    translations: dict[str, Callable] = field(default_factory=dict)
    custom_domains: tuple[str, ...] = ()


LOWERINGS: dict[str, Lowering] = {}

# What translations want the user to know (e.g. the dense lowering's cost), appended at
# export time; ``export_onnx`` hands the new entries to the export log and manifest.
LOWERING_NOTES: list[dict] = []


def register_lowering(lowering: Lowering) -> Lowering:
    LOWERINGS[lowering.name] = lowering
    return lowering


def register_translation(lowering: str, op_name: str):
    """Decorator: add ``op_name``'s translation to an existing lowering."""

    def decorator(fn: Callable) -> Callable:
        LOWERINGS[lowering].translations[op_name] = fn
        return fn

    return decorator


def get_lowering(name: str) -> Lowering:
    if name not in LOWERINGS:
        raise UserError(f"unknown lowering {name!r}; choose one of: {', '.join(sorted(LOWERINGS))}")
    return LOWERINGS[name]


# -- small graph helpers -------------------------------------------------------------


def ints(*values: int):
    return op.Constant(value_ints=list(values))


def take(x, start: int, end: int = INT64_MAX, axis: int = 1, step: int = 1):
    """x[start:end:step] along ``axis``."""
    return op.Slice(x, ints(start), ints(end), ints(axis), ints(step))


def arange_rows(batch: int, start: int, count: int):
    """(batch, count) int64 rows of start, start+1, …"""
    row = op.Range(op.Constant(value_int=start), op.Constant(value_int=start + count), op.Constant(value_int=1))
    return op.Expand(op.Unsqueeze(row, ints(0)), ints(batch, count))


def along_channels(index, batch: int, count: int, channels: int):
    """(B, K) token indices → (B, K, channels) for GatherElements/ScatterElements.

    Shapes come from the caller: values made inside a translation carry none."""
    return op.Expand(op.Unsqueeze(index, ints(2)), ints(batch, count, channels))


def match(metric, r: int, protected: int):
    """Bipartite matching: (unm_idx, src_idx, dst_idx) with the eager tie-breaking."""
    batch, num_tokens, _ = (int(d) for d in metric.shape)
    body = take(metric, protected) if protected else metric
    body = op.Div(body, op.ReduceL2(body, ints(-1), keepdims=1))
    a, b = take(body, 0, step=2), take(body, 1, step=2)
    num_a = (num_tokens - protected + 1) // 2
    scores = op.MatMul(a, op.Transpose(b, perm=[0, 2, 1]))
    node_max = op.ReduceMax(scores, ints(-1), keepdims=0)
    node_idx = op.ArgMax(scores, axis=-1, keepdims=0)
    _, edge_idx = op.TopK(node_max, ints(num_a), axis=-1, largest=1, sorted=1)
    src_idx = take(edge_idx, 0, r)
    unm_idx, _ = op.TopK(take(edge_idx, r), ints(num_a - r), axis=-1, largest=0, sorted=1)
    dst_idx = op.GatherElements(node_idx, src_idx, axis=1)
    return unm_idx, src_idx, dst_idx


def slots_graph(unm_idx, src_idx, dst_idx, batch: int, num_tokens: int, protected: int, r: int):
    """Output slot of every input token (B, N) int64, as ``bipartite.slots`` computes it."""
    body_tokens = num_tokens - protected
    num_a, num_b = (body_tokens + 1) // 2, body_tokens // 2
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
    return interleave_slots(slot_a, slot_b, batch, num_tokens, protected)


def interleave_slots(slot_a, slot_b, batch: int, num_tokens: int, protected: int):
    """(B, Na) A-token and (B, Nb) B-token slots → the (B, N) slot map, protected first.

    Concat/Reshape/Slice only, so every lowering (dense included) can share it."""
    body_tokens = num_tokens - protected
    num_a, num_b = (body_tokens + 1) // 2, body_tokens // 2
    if num_a > num_b:
        slot_b = op.Concat(slot_b, op.Expand(op.Constant(value_int=0), ints(batch, 1)), axis=1)
    interleaved = op.Reshape(
        op.Concat(op.Unsqueeze(slot_a, ints(2)), op.Unsqueeze(slot_b, ints(2)), axis=2),
        ints(batch, 2 * num_a),
    )
    body = take(interleaved, 0, body_tokens)
    return op.Concat(arange_rows(batch, 0, protected), body, axis=1) if protected else body


def no_merge(x, size, batch: int, num_tokens: int, protected: int):
    """r = 0 as the eager op defines it: nothing merges, but tokens still come out in the
    merge layout (protected, A tokens, B tokens) and the slot map says so."""
    body_tokens = num_tokens - protected
    num_a, num_b = (body_tokens + 1) // 2, body_tokens // 2

    def reorder(t):
        body = take(t, protected) if protected else t
        parts = [take(t, 0, protected)] if protected else []
        return op.Concat(*parts, take(body, 0, step=2), take(body, 1, step=2), axis=1)

    slot_a = arange_rows(batch, protected, num_a)
    slot_b = arange_rows(batch, protected + num_a, num_b)
    return reorder(x), reorder(size), interleave_slots(slot_a, slot_b, batch, num_tokens, protected)


def finish(merged, x, size, channels: int, protected: int):
    """Split the merged [value·size | size] tensor, divide, put protected tokens back."""
    merged_size = take(merged, channels, axis=2)
    merged_x = op.Div(take(merged, 0, channels, axis=2), merged_size)
    if protected:
        merged_x = op.Concat(take(x, 0, protected), merged_x, axis=1)
        merged_size = op.Concat(take(size, 0, protected), merged_size, axis=1)
    return merged_x, merged_size


# -- scatter -------------------------------------------------------------------------


def merge_scatter(metric, x, size, r: int, protected: int):
    batch, num_tokens, channels = (int(d) for d in x.shape)
    if r == 0:
        return no_merge(x, size, batch, num_tokens, protected)
    unm_idx, src_idx, dst_idx = match(metric, r, protected)
    body_x = take(x, protected) if protected else x
    body_size = take(size, protected) if protected else size
    z = op.Concat(op.Mul(body_x, body_size), body_size, axis=2)
    za, zb = take(z, 0, step=2), take(z, 1, step=2)
    width, kept = channels + 1, (num_tokens - protected + 1) // 2 - r
    src = op.GatherElements(za, along_channels(src_idx, batch, r, width), axis=1)
    unm = op.GatherElements(za, along_channels(unm_idx, batch, kept, width), axis=1)
    # ScatterElements(add), not ScatterND(add): ONNX Runtime's CPU ScatterND adds duplicate
    # destination rows from several threads unsynchronised once the merge is large enough
    # (onnxruntime#18048; measured: SD-scale tomesd, and 1 of 200 runs at 1024 rows of 385).
    dst = op.ScatterElements(zb, along_channels(dst_idx, batch, r, width), src, axis=1, reduction="add")
    merged_x, merged_size = finish(op.Concat(unm, dst, axis=1), x, size, channels, protected)
    slot = slots_graph(unm_idx, src_idx, dst_idx, batch, num_tokens, protected, r)
    return merged_x, merged_size, slot


register_lowering(
    Lowering(
        "scatter",
        "GatherElements + ScatterElements(add) of size-weighted rows, then divide (ONNX Runtime)",
        {"tome_export::bipartite_merge": merge_scatter},
    )
)


# -- plugin and dense live in their own modules, which register themselves --------------

from tome_export.exporter import dense_lowering, plugin_lowering  # noqa: E402, F401
