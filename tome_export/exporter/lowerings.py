"""The lowerings table: how each merge op becomes ONNX nodes, per lowering.

A lowering turns every merge custom op (``tome_export::bipartite_merge``,
``tome_export::tomesd_merge``) into ONNX nodes through onnxscript translation functions.
The table below is the only place lowerings are declared — complete whatever module is
imported first; the translations live in their own modules:

- ``scatter`` (``scatter_lowering.py``, ``tomesd_lowering.py``): the ONNX Runtime lowering —
  gathers of whole rows by original position, merged rows summed by
  ScatterElements(reduction="add") (not ScatterND: its CPU kernel races on duplicate
  indices), then divide; few nodes, since ORT's cost is per node.
- ``dense`` (``dense_lowering.py``, ``tomesd_lowering.py``): one-hot matrices and MatMul,
  no Scatter, no GatherElements; O(N²·C), for TensorRT without plugins and the Neural Engine.
- ``plugin`` (``plugin_lowering.py``): one ``tome_export.BipartiteMerge`` /
  ``TomesdMerge`` node per merge (names in ``tome_export.contract``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from tome_export.contract import BIPARTITE_OP_TYPE, PLUGIN_DOMAIN
from tome_export.errors import UserError
from tome_export.exporter.dense_lowering import merge_dense
from tome_export.exporter.plugin_lowering import merge_plugin, tomesd_merge_plugin
from tome_export.exporter.scatter_lowering import merge_scatter
from tome_export.exporter.tomesd_lowering import tomesd_merge_dense, tomesd_merge_scatter

BIPARTITE_MERGE = "tome_export::bipartite_merge"
TOMESD_MERGE = "tome_export::tomesd_merge"


@dataclass(frozen=True)
class Lowering:
    """One way to write every merge op in ONNX.

    ``translations`` maps a custom op's qualified name (``"tome_export::bipartite_merge"``)
    to its onnxscript translation function; ``custom_domains`` are the non-ONNX domains its
    graphs need a runtime implementation for.
    """

    name: str
    summary: str
    translations: dict[str, Callable] = field(default_factory=dict)
    custom_domains: tuple[str, ...] = ()


LOWERINGS: dict[str, Lowering] = {
    lowering.name: lowering
    for lowering in (
        Lowering(
            "scatter",
            "row gathers + ScatterElements(add) of size-weighted rows, then divide (ONNX Runtime)",
            {BIPARTITE_MERGE: merge_scatter, TOMESD_MERGE: tomesd_merge_scatter},
        ),
        Lowering(
            "dense",
            "one-hot assignment matrices and MatMul, no Scatter (TensorRT without plugins, Neural Engine); O(N²·C)",
            {BIPARTITE_MERGE: merge_dense, TOMESD_MERGE: tomesd_merge_dense},
        ),
        Lowering(
            "plugin",
            f"one {PLUGIN_DOMAIN}.{BIPARTITE_OP_TYPE} custom node per merge (TensorRT plugin, ONNX Runtime custom op)",
            {BIPARTITE_MERGE: merge_plugin, TOMESD_MERGE: tomesd_merge_plugin},
            custom_domains=(PLUGIN_DOMAIN,),
        ),
    )
}


def get_lowering(name: str) -> Lowering:
    if name not in LOWERINGS:
        raise UserError(f"unknown lowering {name!r}; choose one of: {', '.join(sorted(LOWERINGS))}")
    return LOWERINGS[name]


__all__ = ["BIPARTITE_MERGE", "LOWERINGS", "TOMESD_MERGE", "Lowering", "get_lowering", "merge_scatter"]
