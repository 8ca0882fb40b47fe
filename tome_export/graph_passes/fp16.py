"""fp16 ONNX graphs for strongly typed TensorRT (TensorRT for RTX has no fp16 builder flag).

``to_fp16(model)`` returns a copy computing in float16 except the **merge metric**: the
nodes of a token-merge lowering (ONNX nodes whose ``pkg.torch.onnx.fx_node`` metadata names a
``torch.ops.tome_export`` op) reachable from the merge's metric input through float tensors —
normalisation, the similarity MatMul, ReduceMax/ArgMax/TopK and the threshold comparisons —
stay float32, so the discrete merge decisions see fp32 scores. The size-weighted merge of the
tokens themselves runs in fp16 like the rest of the network. Graph inputs and outputs stay
float32 (Casts at the edges), so the bundle's interface does not change.

``keep`` chooses the fp32 region: :func:`metric_nodes` (the default, what TensorRT needs),
:func:`merge_nodes` (every node of the merge lowering: metric, decisions and the size
bookkeeping — the ``--precision fp16`` default), or any set of node indices;
:func:`runtime_fp32_nodes` adds the ops ONNX Runtime CPU has no fp16 kernel for.
Subgraphs (If/Loop) are not converted.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

FLOAT, HALF = TensorProto.FLOAT, TensorProto.FLOAT16
MERGE_MARK = "torch.ops.tome_export."
METRIC_ENTRY_OPS = ("ReduceL2", "LpNormalization")  # the lowering's first op on the metric


def _is_merge_node(node: onnx.NodeProto) -> bool:
    return any(p.key == "pkg.torch.onnx.fx_node" and MERGE_MARK in p.value for p in node.metadata_props)


def _float_tensors(model: onnx.ModelProto) -> set[str]:
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    graph = inferred.graph
    values = [*graph.input, *graph.output, *graph.value_info]
    names = {v.name for v in values if v.type.tensor_type.elem_type == FLOAT}
    names |= {t.name for t in graph.initializer if t.data_type == FLOAT}
    for node in graph.node:
        if node.op_type == "Constant" and any(a.name == "value" and a.t.data_type == FLOAT for a in node.attribute):
            names.update(node.output)
    return names


def metric_nodes(model: onnx.ModelProto) -> set[int]:
    """Indices of the merge-metric nodes kept in fp32 (see the module docstring)."""
    nodes = list(model.graph.node)
    floats = _float_tensors(model)
    merge = {i for i, n in enumerate(nodes) if _is_merge_node(n)}
    consumers: dict[str, list[int]] = {}
    for i in merge:
        for name in nodes[i].input:
            consumers.setdefault(name, []).append(i)
    frontier = [i for i in merge if nodes[i].op_type in METRIC_ENTRY_OPS]
    # the metric tensor feeds the normalisation: every merge node reading it is in the region
    seeds = {nodes[i].input[0] for i in frontier}
    kept: set[int] = set()
    tensors = list(seeds)
    while tensors:
        name = tensors.pop()
        for i in consumers.get(name, []):
            if i in kept:
                continue
            kept.add(i)
            tensors.extend(o for o in nodes[i].output if o in floats)
    return kept


def merge_nodes(model: onnx.ModelProto) -> set[int]:
    """Indices of every node a merge lowering emitted (metric, matching, size-weighted merge, sizes)."""
    return {i for i, n in enumerate(model.graph.node) if _is_merge_node(n)}


# Inputs the ONNX spec types tensor(float) only, whatever the data's type (Resize's scales).
FLOAT_ONLY_INPUTS = {("Resize", 2), ("Upsample", 1)}

# Ops ONNX Runtime's CPU provider cannot run in float16 (checked at run time, not at load).
ORT_CPU_FP32_ONLY = ("ScatterND", "ScatterElements")


def runtime_fp32_nodes(model: onnx.ModelProto, op_types: tuple[str, ...] = ORT_CPU_FP32_ONLY) -> set[int]:
    """Indices of nodes whose op has no fp16 kernel on the runtime (a reduction scatter on ORT CPU)."""
    return {
        i
        for i, n in enumerate(model.graph.node)
        if n.op_type in op_types and any(a.name == "reduction" and a.s not in (b"", b"none") for a in n.attribute)
    }


def to_fp16(
    model: onnx.ModelProto, keep: set[int] | None = None, base_dir: str | None = None
) -> tuple[onnx.ModelProto, dict]:
    """(fp16 copy of ``model``, summary: nodes kept fp32 and their names, casts inserted).

    ``keep``: indices of the nodes left in fp32 (default :func:`metric_nodes`).
    ``base_dir``: the folder of the graph's external weights, if it has any; converted
    tensors come back inline (see ``external_data.restream`` to move them out again)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    kept = metric_nodes(model) if keep is None else set(keep)
    kept_names = sorted(model.graph.node[i].name for i in kept)
    floats = _float_tensors(model)
    graph = model.graph
    nodes = list(graph.node)
    producer_kept = {o: (i in kept) for i, n in enumerate(nodes) for o in n.output}
    inits = {t.name: t for t in graph.initializer}
    def float_slot(i: int, j: int) -> bool:
        return i in kept or (nodes[i].op_type, j) in FLOAT_ONLY_INPUTS

    used_by_half = {name for i, n in enumerate(nodes) for j, name in enumerate(n.input) if not float_slot(i, j)}
    used_by_float = {name for i, n in enumerate(nodes) for j, name in enumerate(n.input) if float_slot(i, j)}

    new_inits = []
    for t in graph.initializer:
        if t.data_type != FLOAT or t.name not in used_by_half:
            new_inits.append(t)
            continue
        values = numpy_helper.to_array(t, base_dir or "")
        new_inits.append(numpy_helper.from_array(values.astype(np.float16), t.name))
        if t.name in used_by_float:  # shared with the metric region: keep an fp32 copy there
            new_inits.append(numpy_helper.from_array(values, f"{t.name}__fp32"))
        del values
    del graph.initializer[:]
    graph.initializer.extend(new_inits)

    out_nodes: list[onnx.NodeProto] = []
    casts = 0

    def cast(name: str, to: int, suffix: str) -> str:
        nonlocal casts
        casts += 1
        out = f"{name}__{suffix}"
        out_nodes.append(helper.make_node("Cast", [name], [out], to=to, name=f"{out}_cast"))
        return out

    graph_inputs = {v.name for v in graph.input if v.type.tensor_type.elem_type == FLOAT}
    renamed_inputs = {name: cast(name, HALF, "fp16") for name in graph_inputs}
    half_of: dict[str, str] = {}
    float_of: dict[str, str] = {}
    for i, node in enumerate(nodes):
        in_region = i in kept
        for j, name in enumerate(node.input):
            if name not in floats:
                continue
            if float_slot(i, j):
                if name in graph_inputs:
                    continue
                if name in inits and name in used_by_half:
                    node.input[j] = f"{name}__fp32"
                elif not (name in inits or producer_kept.get(name, False)):
                    if name not in float_of:
                        float_of[name] = cast(name, FLOAT, "fp32")
                    node.input[j] = float_of[name]
            else:
                if name in renamed_inputs:
                    node.input[j] = renamed_inputs[name]
                elif producer_kept.get(name, False):
                    if name not in half_of:
                        half_of[name] = cast(name, HALF, "fp16")
                    node.input[j] = half_of[name]
        if not in_region:
            _retype_node(node)
        out_nodes.append(node)
    for output in graph.output:
        if output.type.tensor_type.elem_type != FLOAT or producer_kept.get(output.name, False):
            continue
        internal = f"{output.name}__fp16"
        for node in out_nodes:
            node.output[:] = [internal if o == output.name else o for o in node.output]
            node.input[:] = [internal if o == output.name else o for o in node.input]
        out_nodes.append(helper.make_node("Cast", [internal], [output.name], to=FLOAT, name=f"{output.name}_cast"))
        casts += 1
    del graph.node[:]
    graph.node.extend(out_nodes)
    del graph.value_info[:]  # stale float types; ONNX Runtime and TensorRT infer them
    return model, {"kept_fp32_nodes": len(kept), "casts_inserted": casts, "fp32_node_names": kept_names}


def _retype_node(node: onnx.NodeProto) -> None:
    for attr in node.attribute:
        if node.op_type == "Cast" and attr.name == "to" and attr.i == FLOAT:
            attr.i = HALF
        elif attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == FLOAT:
            attr.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(attr.t).astype(np.float16), attr.t.name))
