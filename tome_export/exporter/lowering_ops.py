"""Small onnxscript building blocks shared by the merge lowerings (scatter, dense, tomesd).

Constants, slices, index rows and the slot-map/finish steps every lowering writes the
same way. Shapes are static at export time, so helpers take them as Python ints.
"""

from __future__ import annotations

from onnxscript import opset18 as op

INT64_MAX = 2**63 - 1


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
