"""Split an ONNX model into consecutive block sub-models that fit a memory budget.

Cuts go where the fewest activations cross — between transformer blocks only the hidden
state does (one more, ToMe's token sizes, is allowed when needed to fit the budget), once long-lived values (conditioning such as a timestep embedding, read in several
blocks) are set aside; those are passed to
each block that needs them. Graph inputs are read from the caller's feeds. Small ``Constant``
nodes are copied into each block that uses them. Blocks are packed greedily up to half the
budget, so the next block can load while the current one computes; a block that holds more
than half still runs, without overlap. Each block's weights go to its own file.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from tome_export.errors import UserError
from tome_export.graph_passes.external_data import SharedWeightsFile, initializer_nbytes

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
EDGE_FRACTION = 0.05  # cuts are chosen among positions with at least this share of weights each side


def parse_bytes(text: str | int) -> int:
    """``512MB``, ``1.5GiB``, ``300000000`` → bytes (MB = 10⁶, MiB = 2²⁰)."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else ""
    if not match or unit not in _UNITS or float(match.group(1)) <= 0:
        raise UserError(f"memory budget {text!r} is malformed: give a size like 512MB, 1.5GB or 300MiB")
    return int(float(match.group(1)) * _UNITS[unit])


def format_bytes(count: int) -> str:
    return f"{count / 1e6:.1f} MB" if count >= 10**5 else f"{count / 1e3:.1f} kB"


@dataclass
class Block:
    """One sub-model: nodes [start, end) of the source graph."""

    index: int
    start: int
    end: int
    model: onnx.ModelProto
    inputs: list[str]
    outputs: list[str]
    weight_bytes: int
    scope: str
    activation_bytes: int = 0  # peak bytes of live intermediate tensors (no memory reuse assumed)


@dataclass
class SplitPlan:
    blocks: list[Block]
    budget_bytes: int
    inputs: list[str]
    outputs: list[str]
    crossing_at_cuts: list[int] = field(default_factory=list)


def _node_inputs(node: onnx.NodeProto) -> list[str]:
    """Inputs including values a subgraph (If/Loop/Scan body) reads from the outer scope."""
    names = [n for n in node.input if n]
    for attribute in node.attribute:
        graphs = list(attribute.graphs) + ([attribute.g] if attribute.HasField("g") else [])
        for graph in graphs:
            inner = {o for n in graph.node for o in n.output} | {i.name for i in graph.input}
            inner |= {t.name for t in graph.initializer}
            names += [n for sub in graph.node for n in _node_inputs(sub) if n not in inner]
    return names


def _scope(node: onnx.NodeProto) -> str | None:
    """Outermost module path with a list index (``model.blocks.3``) from torch.onnx metadata."""
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                return None
            indexed = [s for s in scopes if re.search(r"\.\d+$", s)]
            return indexed[0] if indexed else None
    return None


def _describe(nodes: list[onnx.NodeProto], start: int, end: int) -> str:
    scopes = [s for s in (_scope(n) for n in nodes[start:end]) if s]
    unique = list(dict.fromkeys(scopes))
    where = f"nodes {start}–{end - 1}"
    if not unique:
        return where
    return f"{where} ({unique[0]}{' … ' + unique[-1] if len(unique) > 1 else ''})"


def _value_infos(model: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    graph = model.graph
    infos = {v.name: v for v in [*graph.value_info, *graph.input, *graph.output]}
    return infos


def split_model(model: onnx.ModelProto, budget_bytes: int) -> SplitPlan:
    """Plan and build the block sub-models of ``model`` for ``budget_bytes`` of weights."""
    graph = model.graph
    nodes = list(graph.node)
    count = len(nodes)
    initializers = {t.name: t for t in graph.initializer}
    sizes = {name: initializer_nbytes(t) for name, t in initializers.items()}
    graph_inputs = [i.name for i in graph.input if i.name not in initializers]
    graph_outputs = [o.name for o in graph.output]
    constants = {o: i for i, n in enumerate(nodes) if n.op_type == "Constant" for o in n.output}

    inputs_of = [_node_inputs(n) for n in nodes]
    producer = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    last_use: dict[str, int] = {}
    for i, names in enumerate(inputs_of):
        for name in names:
            last_use[name] = i
    for name in graph_outputs:
        last_use[name] = count

    # crossing[k]: activations alive across the cut before node k, not counting long-lived
    # ones (conditioning that blocks read, like a timestep embedding): alive across a whole
    # block of the model's block stack (torch.onnx records module scopes, e.g. model.blocks.3) or, without that
    # metadata, across more than half the graph.
    # The block stack is the indexed module list holding the most weights (model.blocks).
    scopes = [_scope(n) for n in nodes]
    stack_weight: dict[str, int] = {}
    for scope, names in zip(scopes, inputs_of):
        if scope:
            parent = scope.rsplit(".", 1)[0]
            stack_weight[parent] = stack_weight.get(parent, 0) + sum(sizes.get(n, 0) for n in names)
    stack = max(stack_weight, key=stack_weight.get) if stack_weight else None
    spans: dict[str, list[int]] = {}
    for i, scope in enumerate(scopes):
        if scope and scope.rsplit(".", 1)[0] == stack:
            spans.setdefault(scope, [i, i])[1] = i

    def long_lived(name: str, made_at: int) -> bool:
        if spans:
            return any(made_at <= first and last < last_use[name] for first, last in spans.values())
        return last_use[name] - made_at > count // 2

    diff = [0] * (count + 2)
    for name, p in producer.items():
        if name in constants or name not in last_use or last_use[name] <= p:
            continue
        if long_lived(name, p):
            continue
        diff[p + 1] += 1
        diff[min(last_use[name], count - 1) + 1] -= 1
    crossing, running = [0] * (count + 1), 0
    for k in range(count + 1):
        running += diff[k]
        crossing[k] = running

    first_use: dict[str, int] = {}
    for i, names in enumerate(inputs_of):
        for name in names:
            if name in sizes:
                first_use.setdefault(name, i)
    weight_before = [0] * (count + 1)
    for name, i in first_use.items():
        weight_before[i + 1] += sizes[name]
    for k in range(1, count + 1):
        weight_before[k] += weight_before[k - 1]
    total = weight_before[count]

    interior = [k for k in range(1, count) if min(weight_before[k], total - weight_before[k]) >= EDGE_FRACTION * total]
    positions = interior or list(range(1, count))
    fewest = min((crossing[k] for k in positions), default=0)

    def weights_of(start: int, end: int) -> int:
        used = {n for names in inputs_of[start:end] for n in names if n in sizes}
        return sum(sizes[n] for n in used)

    # Cut where only the hidden state crosses; allow one more tensor (ToMe's token sizes
    # cross between blocks) when that is what it takes to fit half, then all, of the budget.
    levels = []
    for level in (fewest, fewest + 1):
        bounds = [0, *(k for k in positions if crossing[k] <= level), count]
        segments = [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]
        levels.append((segments, [weights_of(a, b) for a, b in segments]))
    segments, seg_bytes = next(
        (lv for limit in (budget_bytes // 2, budget_bytes) for lv in levels if max(lv[1]) <= limit), levels[-1]
    )
    largest = max(range(len(segments)), key=lambda i: seg_bytes[i])
    if seg_bytes[largest] > budget_bytes:
        a, b = segments[largest]
        raise UserError(
            f"memory budget {format_bytes(budget_bytes)} is smaller than block {_describe(nodes, a, b)} "
            f"of {format_bytes(seg_bytes[largest])}; raise --memory-budget to at least that"
        )

    target = budget_bytes // 2
    groups: list[tuple[int, int]] = []
    for a, b in segments:
        if groups and weights_of(groups[-1][0], b) <= target:
            groups[-1] = (groups[-1][0], b)
        else:
            groups.append((a, b))

    infos = _value_infos(model)
    missing = [n for n in producer if n not in infos]
    if missing:
        infos = _value_infos(onnx.shape_inference.infer_shapes(model))
    blocks = []
    for index, (start, end) in enumerate(groups):
        blocks.append(_build_block(model, nodes, inputs_of, index, start, end, initializers, sizes, constants, infos))
        blocks[-1].outputs = [
            o for n in nodes[start:end] for o in n.output if o and (last_use.get(o, -1) >= end or o in graph_outputs)
        ]
        blocks[-1].model.graph.ClearField("output")
        blocks[-1].model.graph.output.extend(infos[o] for o in blocks[-1].outputs)
    for block in blocks:
        if block.weight_bytes + block.activation_bytes > budget_bytes:
            raise UserError(
                f"memory budget {format_bytes(budget_bytes)} is smaller than block {block.scope} with "
                f"{format_bytes(block.weight_bytes)} of weights and {format_bytes(block.activation_bytes)} "
                "of activations; raise --memory-budget"
            )
    return SplitPlan(blocks, budget_bytes, graph_inputs, graph_outputs, [crossing[b] for _, b in groups[:-1]])


def _build_block(model, nodes, inputs_of, index, start, end, initializers, sizes, constants, infos) -> Block:
    block_nodes = nodes[start:end]
    produced = {o for n in block_nodes for o in n.output}
    needed = list(dict.fromkeys(n for names in inputs_of[start:end] for n in names))
    copied_constants = [nodes[constants[n]] for n in needed if n in constants and n not in produced]
    produced |= {o for n in copied_constants for o in n.output}
    weights = [n for n in needed if n in initializers]
    inputs = [n for n in needed if n not in produced and n not in initializers]
    graph = onnx.helper.make_graph(
        [*copied_constants, *block_nodes],
        f"{model.graph.name}_block_{index}",
        [infos[n] for n in inputs],
        [],
        initializer=[initializers[n] for n in weights],
    )
    sub = onnx.helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    sub.functions.extend(model.functions)
    block = Block(index, start, end, sub, inputs, [], sum(sizes[n] for n in weights), _describe(nodes, start, end))
    block.activation_bytes = _peak_live_bytes(block_nodes, inputs, infos)
    return block


def _tensor_bytes(info: onnx.ValueInfoProto | None) -> int:
    if info is None or not info.type.HasField("tensor_type"):
        return 0
    tensor = info.type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else 0 for d in tensor.shape.dim]
    itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).itemsize if tensor.elem_type else 4
    count = 1
    for d in dims:
        count *= d
    return count * itemsize


def _peak_live_bytes(block_nodes: list[onnx.NodeProto], inputs: list[str], infos: dict) -> int:
    """Largest total size of tensors alive at once while the block runs (its inputs included)."""
    last = {}
    for i, node in enumerate(block_nodes):
        for name in _node_inputs(node):
            last[name] = i
    live = {n: _tensor_bytes(infos.get(n)) for n in inputs}
    peak = sum(live.values())
    for i, node in enumerate(block_nodes):
        for out in node.output:
            if out:
                live[out] = _tensor_bytes(infos.get(out))
        peak = max(peak, sum(live.values()))
        for name in [n for n in live if last.get(n, len(block_nodes)) <= i]:
            del live[name]
    return peak


def write_blocks(
    plan: SplitPlan,
    out_dir: Path,
    prefix: str = "",
    weight_files: dict[int, SharedWeightsFile] | None = None,
    relative_to: Path | None = None,
) -> list[dict]:
    """Write ``{prefix}block_NN.onnx`` with weights in ``block_NN.weights`` (one per index).

    Pass the same ``weight_files`` for several plans (TDTM variants) so a block index shares
    one weights file. Returns the manifest entries (paths relative to ``relative_to``).
    """
    weight_files = {} if weight_files is None else weight_files
    root = relative_to or out_dir
    entries = []
    for block in plan.blocks:
        store = weight_files.get(block.index)
        if store is None:
            store = weight_files[block.index] = SharedWeightsFile(out_dir / f"block_{block.index:02d}.weights")
        graph_path = out_dir / f"{prefix}block_{block.index:02d}.onnx"
        store.save(block.model, graph_path)
        entries.append(
            {
                "artifact": str(graph_path.relative_to(root)),
                "weights": str(store.path.relative_to(root)),
                "inputs": list(block.inputs),
                "outputs": list(block.outputs),
                "bytes": block.weight_bytes,
                "activation_bytes": block.activation_bytes,
                "scope": block.scope,
            }
        )
    return entries
