"""ToMe inserted at graph level, for models no patcher knows (any transformer, a ``.pt2``).

``insert_merges(model_or_program, example_inputs, r=…)`` exports the model with
torch.export (or takes the ExportedProgram as is), finds its attention blocks
(``graph_blocks.py``), puts ``tome_export::bipartite_merge`` right after each block's
residual add (``graph_rewrite.py``), re-propagates the merged token count through the
static shapes (``repropagate.py``) and wraps the graph as :class:`GraphMergedModel`.
The semantics are those of ``tome_export.apply(model, method="tome")``:

- metric: the block's attention keys averaged over heads;
- size tracking, and proportional attention: ``log(size)`` is added to the logits (or to
  SDPA mask, writing that SDPA out as its math) of every block after the first merge;
- protected prefix tokens: ``protected=`` or detected (see ``detect_protected_tokens``),
  with ToMe's official A/B split for a class (+ distillation) token, the prefix split
  for register tokens (``split=``);
- attention masks follow the merge: a key-padding mask merges with its tokens, and a
  padded sentence merges as it would alone, unpadded (``graph_masks.py``);
- r per block from ``merging/schedule.py`` (capped by the token count).

:func:`merge_for_export` is the pipeline's choice between the eager patcher (behind its
r=0 equivalence gate) and this graph-level insertion.
"""

from __future__ import annotations

import dataclasses
import inspect
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from tome_export.errors import UserError, first_line
from tome_export.exporter.graph_blocks import (
    PrefixTokens,
    _ancestors,
    _shape,
    detect_protected_tokens,
    find_attention_blocks,
)
from tome_export.exporter.graph_masks import MaskFollower, masks_to_follow
from tome_export.exporter.graph_rewrite import _insert, _merge_after, _proportional_attention
from tome_export.exporter.repropagate import repropagate
from tome_export.inputs import make_inputs
from tome_export.merging import ops
from tome_export.merging import schedule as schedules
from tome_export.merging.tome import TomeState, resolve_split

aten = torch.ops.aten


@dataclass
class GraphTomeState(TomeState):
    """TomeState of a graph-level insertion; ``info()`` also says where merges went."""

    blocks: list[dict] = field(default_factory=list)
    protected_rule: str = ""

    def info(self) -> dict:
        return {
            **super().info(),
            "insertion": "graph",
            "protected_rule": self.protected_rule,
            "attention_blocks": list(self.blocks),
        }


class GraphMergedModel(nn.Module):
    """A graph-rewritten model with ToMe merges; behaves like an eagerly patched one.

    ``forward`` returns the model's outputs; every merging layer's slot map lands in
    ``_tome_state.slots`` (so ``merge_state``, verification and the ONNX export's
    decision outputs work unchanged)."""

    def __init__(self, graph_module: fx.GraphModule, state: GraphTomeState, in_spec, out_spec, num_outputs: int):
        super().__init__()
        self.graph_module = graph_module
        self._tome_state = state
        self._in_spec, self._out_spec, self._num_outputs = in_spec, out_spec, num_outputs

    def forward(self, *args, **kwargs):
        flat, spec = pytree.tree_flatten((args, kwargs))
        if self._in_spec is not None and spec != self._in_spec:
            raise TypeError(f"inputs do not match the exported signature {self._in_spec}")
        results = self.graph_module(*flat)
        state = self._tome_state
        state.reset()
        state.slots = list(results[self._num_outputs :])
        state.r_per_layer, state.tokens_per_layer = list(self._r_per_layer), list(self._tokens_per_layer)
        return pytree.tree_unflatten(list(results[: self._num_outputs]), self._out_spec)

    def train(self, mode: bool = True) -> GraphMergedModel:
        # An exported graph is frozen in inference mode (and refuses train()/eval()).
        self.training = mode
        return self

    def info(self) -> dict:
        return self._tome_state.info()


def _with_input_names(names: list[str]) -> type[GraphMergedModel]:
    """A GraphMergedModel class whose forward signature names the original inputs.

    ``export_onnx`` names graph inputs after ``forward``'s parameters."""

    def forward(self, *args, **kwargs):
        return GraphMergedModel.forward(self, *args, **kwargs)

    positional = inspect.Parameter.POSITIONAL_OR_KEYWORD
    forward.__signature__ = inspect.Signature([inspect.Parameter(n, positional) for n in ["self", *names]])
    return type(GraphMergedModel.__name__, (GraphMergedModel,), {"forward": forward})


def as_schedule(r: int | None, schedule) -> schedules.Schedule:
    """The same r/schedule arguments ``tome_export.apply(method="tome")`` takes (one parser for both)."""
    return schedules.coerce(r, schedule)


def _to_program(model_or_program, example_inputs: tuple) -> torch.export.ExportedProgram:
    if isinstance(model_or_program, torch.export.ExportedProgram):
        return model_or_program
    if isinstance(model_or_program, GraphMergedModel):
        raise UserError("this model already has merges inserted")
    try:
        return torch.export.export(model_or_program.eval(), tuple(example_inputs))
    except Exception as exc:
        raise UserError(
            f"torch.export could not trace {type(model_or_program).__name__}: {first_line(exc, 200)}"
        ) from None


def _static_program(program: torch.export.ExportedProgram, example_inputs: tuple) -> torch.export.ExportedProgram:
    """The program with static shapes: a dynamic one is re-traced at ``example_inputs``."""
    for node in program.graph.nodes:
        if node.op == "call_function" and str(getattr(node.target, "namespace", "")) == ops.OP_NAMESPACE:
            raise UserError(f"the graph already merges tokens ({node.name}); insert merges into an unmerged model")
    dynamic = any(
        isinstance(value, torch.Tensor) and not all(isinstance(d, int) for d in value.shape)
        for value in (node.meta.get("val") for node in program.graph.nodes)
    )
    if not dynamic:
        return program
    try:  # token counts are static per input size, so specialize to the one given
        return torch.export.export(program.module(), example_inputs)
    except Exception as exc:
        raise UserError(
            f"cannot specialize the dynamic program to the input shapes given: {first_line(exc, 200)}"
        ) from None


def insert_merges(
    model_or_program: nn.Module | torch.export.ExportedProgram,
    example_inputs: Sequence[torch.Tensor],
    r: int | None = None,
    schedule: schedules.Schedule | Sequence[int] | tuple[int, float] | None = None,
    protected: int | None = None,
    prop_attn: bool = True,
    split: str | None = None,
) -> GraphMergedModel:
    """Insert ToMe merges after every attention block's residual add of an exported graph.

    ``protected=None`` detects learned prefix tokens (:func:`detect_protected_tokens`).
    Returns an ``nn.Module`` with static shapes for ``example_inputs``
    (:func:`exported_program` re-traces it with torch.export). Raises ``UserError`` when the
    graph has no attention block or a node cannot follow the merged token count."""
    example_inputs = tuple(example_inputs)
    sched = as_schedule(r, schedule)
    program = _to_program(model_or_program, example_inputs)
    program = _static_program(program, example_inputs)
    gm = program.module()
    codegen = gm.graph._codegen
    pytree_info = getattr(codegen, "pytree_info", None)
    blocks, rejected = find_attention_blocks(gm.graph)
    if not blocks:
        why = "; ".join(f"{name}: {reason}" for name, reason in list(rejected.items())[:3])
        raise UserError(
            "no attention blocks found in the exported graph (looked for scaled_dot_product_attention or "
            "matmul→softmax→matmul followed by a residual add)" + (f"; passed over {why}" if why else "")
        )
    base_tokens = blocks[0].num_tokens
    for previous, block in zip(blocks, blocks[1:]):
        if previous.residual_add not in _ancestors(block.queries):
            raise UserError(
                f"attention blocks {previous.attention.name} and {block.attention.name} are not on one residual "
                "stream; graph-level merging follows a single token stream (not multi-tower or encoder-decoder)"
            )
        if block.num_tokens != base_tokens:
            raise UserError(
                f"token count changes between attention blocks ({base_tokens} → {block.num_tokens} at "
                f"{block.attention.name}); graph-level merging needs one token stream of constant length"
            )
    if protected is None:
        prefix = detect_protected_tokens(gm.graph, blocks[0])
    else:
        if not 0 <= protected < base_tokens:
            raise UserError(f"--protected {protected} must be in [0, {base_tokens - 1}] for {base_tokens} tokens")
        # Kinds unknown: the official split reads a given 1 or 2 as class (+ distillation) token.
        official = split == "official" and protected in (1, 2)
        prefix = PrefixTokens(official, official and protected == 2, 0 if official else protected, "")
        prefix = dataclasses.replace(prefix, rule=f"given: {protected} protected")
    chosen, protected, b_first = resolve_split(split, prefix.class_token, prefix.distill_token, prefix.registers)
    rule = prefix.rule
    r_per_layer, tokens = schedules.plan(sched.requested(len(blocks)), base_tokens, protected)
    old_shapes = {node: _shape(node) for node in gm.graph.nodes if _shape(node) is not None}

    graph = gm.graph
    uses, mask_kind = masks_to_follow(gm, blocks, example_inputs)
    follower = None
    size, slots, total_slot, tokens_now = None, [], None, base_tokens
    for index, (block, block_r) in enumerate(zip(blocks, r_per_layer)):
        if follower is not None and tokens_now != base_tokens:
            follower.mask_for(uses[index])
        if size is not None and prop_attn:
            _proportional_attention(graph, block, size)
        if block_r > 0:
            if mask_kind is not None and follower is None:
                follower = MaskFollower(graph, uses[0], mask_kind, block.batch)
            padding = follower if mask_kind == "padding" else None
            merged_x, size, slot = _merge_after(graph, block, size, block_r, protected, b_first, padding)
            old_shapes[merged_x] = old_shapes[block.residual_add]
            slots.append(slot)
            tokens_now -= block_r
            cursor = route = slot
            if follower is not None:
                cursor = follower.follow(slot, slot, tokens_now)
            if padding is not None:  # the merge ran on moved tokens (real first): slots of the old order
                cursor = route = padding.route(cursor, slot)
            total_slot = route if total_slot is None else _compose(graph, cursor, route, total_slot)
    for node in graph.nodes:  # the SDPA written out as math stands for the SDPA's old shape
        if "tome_replaces" in node.meta and node.meta["tome_replaces"] is not None:
            old_shapes[node] = tuple(node.meta["tome_replaces"].shape)

    output = next(n for n in graph.nodes if n.op == "output")
    flat_outputs = list(pytree.tree_leaves(output.args[0]))
    if total_slot is not None:  # token-wise outputs come back at the model's own length
        flat_outputs = [_unmerged(graph, out, total_slot, old_shapes, base_tokens) for out in flat_outputs]
    output.args = (tuple(flat_outputs + slots),)
    graph.set_codegen(fx.graph.CodeGen())  # flat in, flat out; the wrapper keeps the pytree specs
    graph.lint()
    repropagate(gm, [t for t in pytree.tree_leaves((example_inputs, {}))], old_shapes, base_tokens)

    state = GraphTomeState(
        sched, depth=len(blocks), protected=protected, prop_attn=prop_attn, split=chosen, b_first=b_first
    )
    state.requested = sched.requested(len(blocks))
    state.blocks = [b.describe() for b in blocks]
    state.protected_rule = rule
    in_spec = pytree_info.in_spec if pytree_info is not None else None
    out_spec = pytree_info.out_spec if pytree_info is not None else pytree.tree_flatten(tuple(flat_outputs))[1]
    names = list(getattr(pytree_info, "orig_args", None) or [])
    cls = _with_input_names(names) if len(names) == len(example_inputs) else GraphMergedModel
    model = cls(gm, state, in_spec, out_spec, len(flat_outputs))
    model._r_per_layer, model._tokens_per_layer = r_per_layer, tokens[:-1]
    state.r_per_layer, state.tokens_per_layer = list(r_per_layer), list(tokens[:-1])
    return model


def _compose(graph: fx.Graph, after: fx.Node, slot: fx.Node, total: fx.Node) -> fx.Node:
    """Slot of every original token after one more merge: ``slot[total]``."""
    return _insert(graph, after, aten.gather.default, slot, 1, total)


def _unmerged(graph: fx.Graph, out, total: fx.Node, old_shapes: dict, base_tokens: int):
    """A (B, N, C) output downstream of the merges, gathered back to N tokens (each
    token takes its merged token's value, as ToMe's unmerge); other outputs as they are."""
    shape = old_shapes.get(out) if isinstance(out, fx.Node) else None
    if not (shape and len(shape) == 3 and shape[1] == base_tokens):
        return out
    if not any(n.target == torch.ops.tome_export.bipartite_merge.default for n in _ancestors(out)):
        return out
    batch, _, channels = shape
    index = _insert(graph, out, aten.unsqueeze.default, total, -1)
    index = _insert(graph, index, aten.expand.default, index, [batch, base_tokens, channels])
    return _insert(graph, index, aten.gather.default, out, 1, index)


def exported_program(model: GraphMergedModel, example_inputs: Sequence[torch.Tensor]) -> torch.export.ExportedProgram:
    """torch.export of the merged model (outputs only; decisions stay in its state)."""
    return torch.export.export(model, tuple(example_inputs))


def insert_for_export(loaded, method_opts: dict, input_shapes, protected: int | None, progress) -> GraphMergedModel:
    """The pipeline's graph-level path: a .pt2, or a model the eager patcher does not know."""
    if loaded.program is not None:
        expected = getattr(loaded.module, "default_input_shapes", None) or [loaded.default_input_shape]
        if expected[0] is not None and [tuple(s) for s in input_shapes] != [tuple(s) for s in expected]:
            shapes = ";".join(",".join(map(str, s)) for s in expected)
            raise UserError(
                f"{loaded.source} was exported for input shape {shapes}; "
                "give that --input-shape or export the .pt2 again for the shape you need"
            )
        why = "MODEL is a torch.export archive"
    else:
        why = f"{type(loaded.module).__name__} has no blocks the eager patcher claims"
    example_inputs = make_inputs(loaded.module, input_shapes, 0)  # declared dtypes (token ids, masks…)
    if protected is None:  # a model may declare prefix tokens the graph cannot show ([CLS] of BERT)
        protected = getattr(loaded.module, "tome_protected_tokens", None)
    # Reported once done, not as a progress step: bad input must stay a one-line error.
    start = time.perf_counter()
    model = insert_merges(loaded.program or loaded.module, example_inputs, protected=protected, **method_opts)
    for name in ("tome_input_specs", "default_input_shapes", "default_input_shape"):  # inputs stay declared
        if getattr(loaded.module, name, None) is not None:
            setattr(model, name, getattr(loaded.module, name))
    state = model._tome_state
    merges = sum(r > 0 for r in state.r_per_layer)
    progress.say(f"• {why}: inserted merges at graph level ({time.perf_counter() - start:.1f} s)")
    progress.say(f"  {merges} merges after {len(state.blocks)} attention blocks; {state.protected_rule}")
    return model


def has_patcher(model: nn.Module) -> bool:
    """Whether the eager ToMe patcher recognizes blocks in ``model``."""
    from tome_export.merging.tome import is_vit_block

    return any(is_vit_block(m) for m in model.modules())


def _probe_inputs(loaded, input_shapes, inputs: tuple) -> None:
    """Run the unpatched model once: a model that rejects the inputs gets a one-line hint."""
    try:
        with torch.no_grad():
            loaded.module(*inputs)
    except Exception as exc:
        expected = loaded.default_input_shape
        shapes = ";".join(",".join(map(str, s)) for s in input_shapes)
        hint = (
            f"; it expects --input-shape {','.join(map(str, expected))}"
            if expected is not None and [tuple(expected)] != [tuple(s) for s in input_shapes]
            else "; pass the --input-shape it expects"
        )
        raise UserError(
            f"{loaded.source} rejects input shape {shapes}: {first_line(exc, 200).rstrip('.')}{hint}"
        ) from None


def merge_for_export(
    loaded, method: str, method_opts: dict, input_shapes, protected: int | None, progress, seeds: int = 2
) -> nn.Module:
    """The merged eager reference for the pipeline: eager patcher or graph-level insertion.

    ToMe's eager patcher is used only when the model passes its r=0 gate (patched at r=0
    ≡ unpatched on the verification inputs); otherwise merges go in at graph level; a
    model neither can merge is refused in one line naming the block class."""
    from tome_export.merging import apply
    from tome_export.merging.families import refuse_unmergeable
    from tome_export.merging.tome import check_r0_equivalence, looks_like_vit_block, unsupported_feature

    if method != "tome":
        if protected is not None:
            raise UserError("--protected applies to graph-level insertion (.pt2, or models without timm-style blocks)")
        return apply(loaded.module, method, **method_opts)
    if loaded.program is not None:  # its input shapes are fixed: insert_for_export checks them
        return insert_for_export(loaded, method_opts, input_shapes, protected, progress)
    refuse_unmergeable(loaded.module)
    inputs = [make_inputs(loaded.module, input_shapes, seed) for seed in range(max(1, seeds))]
    _probe_inputs(loaded, input_shapes, inputs[0])
    patcher_failed = None
    blocks = [m for m in loaded.module.modules() if looks_like_vit_block(m)]
    if blocks and protected is not None:
        raise UserError("--protected applies to graph-level insertion (.pt2, or models without timm-style blocks)")
    if blocks:
        feature = next((f for f in map(unsupported_feature, blocks) if f), None)
        if feature is not None:
            patcher_failed = f"{type(blocks[0]).__name__}: the ToMe patcher does not implement {feature}"
        else:
            try:
                err = check_r0_equivalence(loaded.module, inputs, **method_opts)
            except UserError as exc:
                patcher_failed = str(exc).split("; use --r 0")[0]
            else:
                model = apply(loaded.module, "tome", **method_opts)
                model._tome_state.r0_gate = err  # in the manifest; no progress line (errors stay one line)
                return model
    try:
        return insert_for_export(loaded, method_opts, input_shapes, protected, progress)
    except UserError as exc:
        if patcher_failed is None:
            raise
        raise UserError(
            f"{patcher_failed}, and graph-level merging fails too ({exc}); use --r 0 to export unmerged, "
            "or another method"
        ) from None


__all__ = [
    "GraphMergedModel",
    "has_patcher",
    "insert_for_export",
    "insert_merges",
    "merge_for_export",
]
