"""Correct ONNX translations for ATen ops the stock exporter gets wrong.

``scatter_reduce(reduce="mean")`` is the reason this project exists: onnxscript's table
maps it to ScatterElements with ``reduction="none"`` (last write wins) and the graph runs
and is silently wrong. Here every reduction, with ``include_self`` True or False, is
rebuilt from ScatterElements(add/mul/max/min) plus a count of writes per position.
Each use is recorded in the current export's log (``export_log.current()``) so the export
log and manifest can say what was rewritten.
"""

from __future__ import annotations

import math

import torch
from onnxscript import opset18 as op

from tome_export.exporter.export_log import current

_REDUCTIONS = {"sum": "add", "prod": "mul", "amax": "max", "amin": "min", "mean": "add"}


def _fill(like, value: float):
    return op.Expand(op.CastLike(op.Constant(value_float=value), like), op.Shape(like))


def scatter_reduce(self, dim: int, index, src, reduce: str, include_self: bool = True):
    if reduce not in _REDUCTIONS:
        raise ValueError(f"scatter_reduce reduce={reduce!r} has no exact ONNX form")
    reduction = _REDUCTIONS[reduce]
    counts = op.ScatterElements(_fill(self, 0.0), index, _fill(src, 1.0), axis=dim, reduction="add")
    written = op.Greater(counts, _fill(counts, 0.0))
    if reduce == "mean":
        start = self if include_self else _fill(self, 0.0)
        sums = op.ScatterElements(start, index, src, axis=dim, reduction="add")
        denominator = op.Add(counts, _fill(counts, 1.0)) if include_self else counts
        out = op.Where(written, op.Div(sums, denominator), self)
        became = "ScatterElements(add) of values and counts, Div, Where"
    else:
        if include_self:
            start = self
        else:
            identity = {"add": 0.0, "mul": 1.0, "max": -math.inf, "min": math.inf}[reduction]
            start = op.Where(written, _fill(self, identity), self)
        out = op.ScatterElements(start, index, src, axis=dim, reduction=reduction)
        became = f"ScatterElements({reduction})" + ("" if include_self else " from a Where-masked start")
    current().rewrites.append(
        {"op": "aten::scatter_reduce", "reduce": reduce, "include_self": bool(include_self), "became": became}
    )
    return out


def translation_table() -> dict:
    """ATen overloads → corrected translations."""
    return {torch.ops.aten.scatter_reduce.two: scatter_reduce}


__all__ = ["scatter_reduce", "translation_table"]
