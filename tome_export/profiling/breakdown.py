"""Per-layer / per-op breakdown from ONNX Runtime's own profiler JSON.

Which ONNX nodes are the merge: the dynamo exporter stamps every node with metadata from
the FX node it came from. ``pkg.torch.onnx.fx_node`` names the op
(``torch.ops.tome_export.bipartite_merge…``) for every node a lowering's translation emits,
and ``pkg.torch.onnx.name_scopes`` gives the module path (``model.blocks.3``). So a node is
a merge node when its FX op is in the ``tome_export`` namespace, whatever its ONNX name.

ONNX Runtime renames nodes it fuses: ``node_MatMul_77/MatmulTransposeFusion/`` keeps the
original name before the first ``/``; nodes it inserts (layout reorders, Gemm reshapes)
have names of their own and are counted as ``(inserted by ONNX Runtime)``.
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from dataclasses import dataclass

import onnx

MERGE_OP_MARK = "torch.ops.tome_export."
INSERTED = "(inserted by ONNX Runtime)"
TOP_LEVEL = "(top level)"
KERNEL_SUFFIX = "_kernel_time"
CONSISTENCY_TOLERANCE = 0.10


@dataclass(frozen=True)
class NodeInfo:
    layer: str
    is_merge: bool


def _layer_of(scopes: list[str]) -> str:
    # The last scope is the FX node itself; the others are module paths.
    modules = [s.removeprefix("model.") for s in scopes[:-1] if s and s != "model"]
    for module in reversed(modules):
        if re.search(r"\.\d+$", module):
            return module
    return modules[0] if modules else TOP_LEVEL


def node_attribution(model: onnx.ModelProto) -> dict[str, NodeInfo]:
    """ONNX node name → (layer, is merge) from the exporter's node metadata."""
    table = {}
    for node in model.graph.node:
        meta = {p.key: p.value for p in node.metadata_props}
        try:
            scopes = ast.literal_eval(meta.get("pkg.torch.onnx.name_scopes", "[]"))
        except (ValueError, SyntaxError):
            scopes = []
        table[node.name] = NodeInfo(_layer_of(scopes), MERGE_OP_MARK in meta.get("pkg.torch.onnx.fx_node", ""))
    return table


def _lookup(kernel_name: str, table: dict[str, NodeInfo]) -> NodeInfo | None:
    name = kernel_name.removesuffix(KERNEL_SUFFIX)
    return table.get(name) or table.get(name.split("/", 1)[0])


def breakdown(events: list[dict], table: dict[str, NodeInfo]) -> dict:
    """Aggregate per-run kernel times by layer and op type; check they account for the run.

    ``coverage`` = (sum of node kernel times) / (model_run time) of the fastest profiled run:
    the profiler-consistency check passes when it is within 10% of 1."""
    runs = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])
    kernels = [e for e in events if e.get("cat") == "Node" and e.get("name", "").endswith(KERNEL_SUFFIX)]
    if not runs:
        raise ValueError("profile has no model_run events")
    by_layer: dict[str, float] = defaultdict(float)
    by_op: dict[str, float] = defaultdict(float)
    merge_by_layer: dict[str, float] = defaultdict(float)
    run_ms, kernel_ms, merge_ms, inserted_ms = [], [], [], 0.0
    for run in runs:
        start, stop = run["ts"], run["ts"] + run["dur"]
        inside = [k for k in kernels if start <= k["ts"] and k["ts"] + k["dur"] <= stop]
        total = merge = 0.0
        for k in inside:
            ms = k["dur"] / 1e3
            info = _lookup(k["name"], table)
            layer = info.layer if info else INSERTED
            by_layer[layer] += ms
            by_op[k.get("args", {}).get("op_name", "?")] += ms
            if info is None:
                inserted_ms += ms
            elif info.is_merge:
                merge += ms
                merge_by_layer[layer] += ms
            total += ms
        run_ms.append(run["dur"] / 1e3)
        kernel_ms.append(total)
        merge_ms.append(merge)
    count = len(runs)

    def per_run(table_ms: dict[str, float]) -> dict[str, float]:
        return {k: v / count for k, v in sorted(table_ms.items(), key=lambda kv: -kv[1])}

    # The fastest run is the one least disturbed by other processes: on a shared CPU the
    # gaps between kernels (the thread descheduled) belong to no node.
    best = min(range(count), key=lambda i: run_ms[i])
    coverage = kernel_ms[best] / run_ms[best] if run_ms[best] else 0.0
    total_kernel = sum(kernel_ms) / count
    return {
        "profiled_runs": count,
        "run_ms": run_ms[best],
        "kernel_sum_ms": kernel_ms[best],
        "coverage": coverage,
        "consistent": abs(1.0 - coverage) <= CONSISTENCY_TOLERANCE,
        "merge_ms": sum(merge_ms) / count,
        "merge_share": (sum(merge_ms) / count) / total_kernel if total_kernel else 0.0,
        "inserted_ms": inserted_ms / count,
        "by_layer": per_run(by_layer),
        "merge_by_layer": per_run(merge_by_layer),
        "by_op": per_run(by_op),
    }
