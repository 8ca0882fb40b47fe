"""ToMe inserted at graph level, for models no patcher knows (any transformer, a ``.pt2``).

``insert_merges(model_or_program, example_inputs, r=…)`` exports the model with
torch.export (or takes the ExportedProgram as is), finds its attention blocks —
``aten.scaled_dot_product_attention``, or matmul → softmax → matmul — each followed by its
output projection and the residual add, and puts ``tome_export::bipartite_merge`` right
after that add. The semantics are those of ``tome_export.apply(model, method="tome")``:

- metric: the block's attention keys averaged over heads;
- size tracking, and proportional attention: ``log(size)`` is added to the logits (or to
  SDPA mask, writing that SDPA out as its math) of every block after the first merge;
- protected prefix tokens: ``protected=`` or detected (see :func:`detect_protected_tokens`);
- r per block from ``merging/schedule.py`` (capped by the token count).

A static-shape export bakes the token count into ``view``/``reshape``/``expand`` sizes, so
after insertion every node downstream of a merge is revisited in order: size arguments
that carried the old token count are rewritten (registry ``SIZE_FIXERS``) and the node is
re-run on fake tensors, which refreshes ``meta["val"]``. A node that cannot follow the
new token count (a constant of token length, a split along tokens) is refused by name.
"""

from __future__ import annotations

import inspect
import math
import operator
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch.fx.node import map_arg
from torch.utils import _pytree as pytree

from tome_export.errors import UserError, first_line
from tome_export.merging import ops  # noqa: F401  (registers tome_export::bipartite_merge)
from tome_export.merging import schedule as schedules
from tome_export.merging.tome import TomeState

aten = torch.ops.aten
INSERTED = "tome_inserted"  # meta key on nodes this pass creates
MAX_SEARCH = 64  # nodes searched forward from an attention output for its residual add

SDPA_OPS = {aten.scaled_dot_product_attention.default}
SOFTMAX_OPS = {aten.softmax.int, aten._softmax.default, aten._safe_softmax.default}
MATMUL_OPS = {aten.matmul.default, aten.bmm.default}
# Ops that keep values in place between matmul and softmax, or softmax and the next matmul.
PASS_THROUGH_OPS = {
    aten.mul.Tensor,
    aten.mul.Scalar,
    aten.div.Tensor,
    aten.div.Scalar,
    aten.add.Tensor,
    aten.sub.Tensor,
    aten.masked_fill.Scalar,
    aten.masked_fill.Tensor,
    aten.dropout.default,
    aten.clone.default,
    aten.contiguous.default,
    aten._to_copy.default,
    aten.to.dtype,
    aten.type_as.default,
    aten.alias.default,
}
# Shape-only ops between a 4-D matmul's operands and its bmm in decomposed graphs.
VIEW_OPS = {aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.expand.default}
# From attention weights to the values matmul; where = the decomposed _safe_softmax.
FORWARD_OPS = (PASS_THROUGH_OPS | VIEW_OPS | {aten.where.self}) - {aten.add.Tensor, aten.sub.Tensor}
ADD_OPS = {aten.add.Tensor}
LINEAR_OPS = {aten.linear.default, aten.addmm.default, aten.mm.default, aten.matmul.default}
# Ops through which a learned prefix token reaches the concatenation.
PREFIX_PASS_OPS = {aten.expand.default, aten.repeat.default, aten._to_copy.default, aten.clone.default}


@dataclass
class AttentionBlock:
    """One self-attention block found in the graph."""

    kind: str  # "sdpa" | "matmul-softmax"
    attention: fx.Node  # the SDPA node, or the softmax
    queries: fx.Node
    keys: fx.Node  # (B, H, N, d), or (B, H, d, N) when keys_transposed
    keys_transposed: bool
    output: fx.Node  # SDPA output or the second matmul
    residual_add: fx.Node
    projection: fx.Node | None
    num_tokens: int
    batch: int

    def describe(self) -> dict:
        return {
            "kind": self.kind,
            "attention": self.attention.name,
            "projection": self.projection.name if self.projection is not None else None,
            "residual_add": self.residual_add.name,
        }


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


# --------------------------------------------------------------------------- finding blocks


def _shape(node) -> tuple[int, ...] | None:
    value = node.meta.get("val") if isinstance(node, fx.Node) else None
    return tuple(int(d) for d in value.shape) if isinstance(value, torch.Tensor) else None


def _ancestors(node: fx.Node) -> set[fx.Node]:
    seen, stack = set(), [node]
    while stack:
        for parent in stack.pop().all_input_nodes:
            if parent not in seen:
                seen.add(parent)
                stack.append(parent)
    return seen


def _last_two_swapped(node: fx.Node) -> fx.Node | None:
    """The input of a transpose/permute that swaps the last two dims, else None."""
    rank = len(_shape(node) or ())
    if node.target == aten.transpose.int:
        dims = sorted(d % rank for d in node.args[1:3])
        return node.args[0] if rank and dims == [rank - 2, rank - 1] else None
    if node.target == aten.permute.default:
        perm = [d % rank for d in node.args[1]]
        return node.args[0] if perm == [*range(rank - 2), rank - 1, rank - 2] else None
    return None


def _walk_back(node, through: set) -> fx.Node:
    """Follow first tensor inputs back through ``through`` ops (scale, mask add, casts)."""
    while isinstance(node, fx.Node) and node.op == "call_function" and node.target in through:
        node = node.args[0]
    return node


def _sdpa_block(node: fx.Node) -> tuple[dict | None, str]:
    q, k = node.args[0], node.args[1]
    is_causal = node.kwargs.get("is_causal", node.args[5] if len(node.args) > 5 else False)
    if is_causal:
        return None, "causal attention (is_causal=True): merging tokens would break causality"
    q_shape, k_shape = _shape(q), _shape(k)
    if q_shape is None or k_shape is None or len(k_shape) != 4:
        return None, "queries/keys are not (B, heads, N, d)"
    if q_shape[-2] != k_shape[-2]:
        return None, "cross-attention (queries and keys differ in length)"
    return dict(kind="sdpa", queries=q, keys=k, keys_transposed=False, output=node), ""


def _softmax_block(node: fx.Node) -> tuple[dict | None, str]:
    shape = _shape(node)
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", -1)
    if shape is None or len(shape) != 4 or dim % 4 != 3:
        return None, "not a softmax over the last dim of (B, heads, N, N) logits"
    # Core-ATen graphs (run_decompositions) spell a 4-D matmul as expand → view → bmm → view.
    logits = _walk_back(node.args[0], PASS_THROUGH_OPS | VIEW_OPS)
    if not (isinstance(logits, fx.Node) and logits.target in MATMUL_OPS):
        return None, "softmax input does not come from a matmul"
    users = [node]
    output = None
    while users:  # forward through dropout/casts/views to the weights @ values matmul
        current = users.pop()
        for user in current.users:
            if user.target in MATMUL_OPS and user.args[0] is current:
                output = user
            elif user.target in FORWARD_OPS:
                users.append(user)
    if output is None:
        return None, "softmax output does not feed a matmul with values"
    if shape[-1] != shape[-2]:
        return None, "cross-attention (queries and keys differ in length)"
    key_operand = _walk_back(logits.args[1], PASS_THROUGH_OPS | VIEW_OPS)
    keys = _last_two_swapped(key_operand)
    keys = keys if keys is not None else key_operand
    if len(_shape(keys) or ()) != 4:
        return None, "keys are not (B, heads, N, d)"
    return (
        dict(
            kind="matmul-softmax",
            queries=_walk_back(logits.args[0], PASS_THROUGH_OPS | VIEW_OPS),
            keys=keys,
            keys_transposed=keys is key_operand,
            output=output,
        ),
        "",
    )


CANDIDATES: dict = {**dict.fromkeys(SDPA_OPS, _sdpa_block), **dict.fromkeys(SOFTMAX_OPS, _softmax_block)}


def _residual_add(output: fx.Node, queries: fx.Node, num_tokens: int, batch: int):
    """First add after ``output`` whose other operand is the block input; also the projection."""
    block_inputs = _ancestors(queries)
    seen, frontier, projection = {output}, [output], None
    while frontier and len(seen) < MAX_SEARCH:
        node = frontier.pop(0)
        for user in node.users:
            if user in seen:
                continue
            seen.add(user)
            if projection is None and user.target in LINEAR_OPS and user is not output:
                projection = user
            shape = _shape(user)
            if user.target in ADD_OPS and shape is not None and len(shape) == 3 and shape[:2] == (batch, num_tokens):
                other = user.args[1] if user.args[0] is node else user.args[0]
                if isinstance(other, fx.Node) and other in block_inputs:
                    return user, projection
            frontier.append(user)
    return None, projection


def find_attention_blocks(graph: fx.Graph) -> tuple[list[AttentionBlock], dict[str, str]]:
    """Self-attention blocks in graph order, and why other candidates were passed over."""
    blocks, rejected = [], {}
    for node in graph.nodes:
        if node.op != "call_function" or node.target not in CANDIDATES:
            continue
        found, reason = CANDIDATES[node.target](node)
        if found is None:
            rejected[node.name] = reason
            continue
        key_shape = _shape(found["keys"])
        num_tokens = key_shape[-1] if found["keys_transposed"] else key_shape[-2]
        add, projection = _residual_add(found["output"], found["queries"], num_tokens, key_shape[0])
        if add is None:
            rejected[node.name] = "no residual add of shape (B, N, C) follows the attention output"
            continue
        blocks.append(
            AttentionBlock(
                attention=node,
                residual_add=add,
                projection=projection,
                num_tokens=num_tokens,
                batch=key_shape[0],
                **found,
            )
        )
    order = {node: i for i, node in enumerate(graph.nodes)}
    blocks.sort(key=lambda b: order[b.residual_add])
    return blocks, rejected


def detect_protected_tokens(graph: fx.Graph, first_block: AttentionBlock) -> tuple[int, str]:
    """Prefix tokens ToMe must not merge, read off the graph.

    Rule: take the last concatenation along the token dim (dim 1 of a rank-3 tensor)
    that the first attention block depends on; count the tokens of its leading inputs
    that are learned parameters of shape (1, k, C) (through expand/repeat over the
    batch): class, distillation and register tokens. No such concatenation: 0.
    """
    upstream = _ancestors(first_block.queries)
    cats = [
        n
        for n in graph.nodes
        if n in upstream
        and n.target == aten.cat.default
        and len(_shape(n) or ()) == 3
        and (n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)) % 3 == 1
    ]
    if not cats:
        return 0, "no token concatenation before the first attention block: 0 protected tokens"
    count, names = 0, []
    for part in cats[-1].args[0]:
        source = _walk_back(part, PREFIX_PASS_OPS)
        shape = _shape(source)
        if source.op != "get_attr" or shape is None or len(shape) != 3 or shape[0] != 1:
            break
        count += shape[1]
        names.append(str(source.target))
    if not count:
        return 0, f"{cats[-1].name} starts with no learned (1, k, C) parameter: 0 protected tokens"
    return count, f"learned prefix tokens {', '.join(names)} concatenated at {cats[-1].name}: {count} protected"


# --------------------------------------------------------------------------- rewriting


def _insert(graph: fx.Graph, after: fx.Node, target, *args) -> fx.Node:
    with graph.inserting_after(after):
        node = graph.call_function(target, args)
    node.meta[INSERTED] = True
    return node


def _merge_after(graph, block: AttentionBlock, size: fx.Node | None, r: int, protected: int):
    """Merge the residual stream right after the block's residual add; returns (x, size, slot)."""
    x = block.residual_add
    cursor = metric = _insert(graph, x, aten.mean.dim, block.keys, [1])
    if block.keys_transposed:
        cursor = metric = _insert(graph, metric, aten.transpose.int, metric, -2, -1)
    if size is None:  # all ones: every token stands for one patch
        cursor = first = _insert(graph, cursor, aten.slice.Tensor, x, -1, 0, 1)
        cursor = size = _insert(graph, first, aten.ones_like.default, first)
    merge = _insert(graph, cursor, torch.ops.tome_export.bipartite_merge.default, metric, x, size, r, protected)
    merged_x = _insert(graph, merge, operator.getitem, merge, 0)
    merged_size = _insert(graph, merged_x, operator.getitem, merge, 1)
    slot = _insert(graph, merged_size, operator.getitem, merge, 2)
    x.replace_all_uses_with(merged_x, delete_user_cb=lambda user: not user.meta.get(INSERTED))
    return merged_x, merged_size, slot


def _insert_before(graph: fx.Graph, before: fx.Node, target, *args) -> fx.Node:
    with graph.inserting_before(before):
        node = graph.call_function(target, args)
    node.meta[INSERTED] = True
    return node


def _proportional_attention(graph: fx.Graph, block: AttentionBlock, size: fx.Node) -> None:
    """Add log(size) over keys, as (B, 1, 1, N), to the block's logits or SDPA mask."""
    node = block.attention
    log = _insert_before(graph, node, aten.log.default, size)
    over_keys = _insert_before(graph, node, aten.transpose.int, log, 1, 2)  # (B, 1, N)
    bias = _insert_before(graph, node, aten.unsqueeze.default, over_keys, 1)  # (B, 1, 1, N)
    if block.kind == "matmul-softmax":
        logits = node.args[0]
        node.replace_input_with(logits, _insert_before(graph, node, aten.add.Tensor, logits, bias))
        return
    _sdpa_as_math(graph, node, bias)


_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def _sdpa_as_math(graph: fx.Graph, node: fx.Node, bias: fx.Node) -> None:
    """Replace an SDPA node by softmax(q·kᵀ·scale + mask + bias)·v.

    Written out because torch.onnx decomposes a masked SDPA with strides that no longer
    fit the following reshape once the token count changed; the math is SDPA's own."""
    call = dict(zip(_SDPA_ARGS, node.args))
    call.update(node.kwargs)
    q, k, v, mask = call["query"], call["key"], call["value"], call.get("attn_mask")
    if call.get("dropout_p", 0.0) or call.get("enable_gqa", False):
        raise UserError(
            f"{node.name}: proportional attention supports SDPA without dropout or grouped-query "
            "attention; pass --no-prop-attn (prop_attn=False)"
        )
    scale = call.get("scale") or _shape(q)[-1] ** -0.5
    keys_t = _insert_before(graph, node, aten.transpose.int, k, -2, -1)
    logits = _insert_before(graph, node, aten.matmul.default, q, keys_t)
    logits = _insert_before(graph, node, aten.mul.Tensor, logits, scale)
    if isinstance(mask, fx.Node):
        if _dtype(mask) == torch.bool:  # True = attend, as SDPA reads boolean masks
            mask = _insert_before(graph, node, aten.where.ScalarOther, mask, 0.0, -math.inf)
        logits = _insert_before(graph, node, aten.add.Tensor, logits, mask)
    logits = _insert_before(graph, node, aten.add.Tensor, logits, bias)
    weights = _insert_before(graph, node, aten.softmax.int, logits, -1)
    out = _insert_before(graph, node, aten.matmul.default, weights, v)
    node.replace_all_uses_with(out)
    graph.erase_node(node)


def _dtype(node) -> torch.dtype | None:
    value = node.meta.get("val") if isinstance(node, fx.Node) else None
    return value.dtype if isinstance(value, torch.Tensor) else None


# --------------------------------------------------------------------------- re-propagation


def _view_groups(old_in: Sequence[int], old_out: Sequence[int]) -> list[tuple[list[int], list[int]]]:
    """Split a view into groups of input and output dims with equal products."""
    groups, i, j = [], 0, 0
    while i < len(old_in) or j < len(old_out):
        gi, gj = [], []
        pa = pb = 1
        if i < len(old_in):
            gi.append(i)
            pa = old_in[i]
            i += 1
        if j < len(old_out):
            gj.append(j)
            pb = old_out[j]
            j += 1
        while pa != pb:
            if (pa < pb and i < len(old_in)) or j >= len(old_out):
                if i >= len(old_in):
                    raise ValueError("view sizes do not match")
                gi.append(i)
                pa *= old_in[i]
                i += 1
            else:
                gj.append(j)
                pb *= old_out[j]
                j += 1
        groups.append((gi, gj))
    return groups


def _fix_view(node, new_in, old_in, old_out, base_tokens):
    new_out = list(old_out)
    for gi, gj in _view_groups(old_in, old_out):
        old_prod, new_prod = math.prod(old_in[d] for d in gi), math.prod(new_in[d] for d in gi)
        if old_prod == new_prod:
            continue
        if len(gj) == 1:
            new_out[gj[0]] = new_prod
            continue
        # A group like (B·N) → (B, N): the token-length output dim takes the change.
        fits = [j for j in gj if old_out[j] == base_tokens and (old_out[j] * new_prod) % old_prod == 0]
        if len(fits) != 1:
            raise UserError(
                f"graph-level merging cannot adapt {node.name} ({node.target}) from shape {tuple(old_out)} "
                "to the merged token count: it splits or mixes the token dimension"
            )
        new_out[fits[0]] = old_out[fits[0]] * new_prod // old_prod
    return (node.args[0], new_out, *node.args[2:])


def _fix_expand(node, new_in, old_in, old_out, base_tokens):
    sizes = list(node.args[1])
    offset = len(sizes) - len(old_in)
    for q, (old, new) in enumerate(zip(old_in, new_in)):
        if old != new and sizes[q + offset] == old:
            sizes[q + offset] = new
    return (node.args[0], sizes, *node.args[2:])


def _fix_slice(node, new_in, old_in, old_out, base_tokens):
    args = list(node.args) + [0, None, None, 1][len(node.args) - 1 :]
    dim = args[1] % len(old_in)
    old, new = old_in[dim], new_in[dim]
    if old == new:
        return node.args
    start, end = args[2] or 0, args[3]
    if end is not None and end >= old:
        end = new if end == old else end  # to the end, whatever the length
    if (start >= 0 and start >= new) or (end is not None and 0 <= end and end > new):
        raise UserError(f"graph-level merging: {node.name} slices tokens {start}:{end} past the merged length {new}")
    args[3] = end
    return tuple(args[: max(len(node.args), 4)])


def _fix_select(node, new_in, old_in, old_out, base_tokens):
    dim, index = node.args[1] % len(old_in), node.args[2]
    if index >= 0 and index >= new_in[dim]:
        raise UserError(f"graph-level merging: {node.name} selects token {index} of only {new_in[dim]} after merging")
    return node.args


def _refuse_along_tokens(dim_position: int, default_dim: int = 0):
    def fix(node, new_in, old_in, old_out, base_tokens):
        dim = node.args[dim_position] if len(node.args) > dim_position else node.kwargs.get("dim", default_dim)
        dim %= len(old_in)
        if old_in[dim] != new_in[dim]:
            raise UserError(
                f"graph-level merging cannot follow {node.name} ({node.target}): it splits the token "
                f"dimension into fixed pieces; merge only before this point (--schedule) or use an eager patcher"
            )
        return node.args

    return fix


FixFn = Callable[..., tuple]
# Ops whose arguments carry sizes; each fixer returns new args for the merged token count.
SIZE_FIXERS: dict[object, FixFn] = {
    aten.view.default: _fix_view,
    aten.reshape.default: _fix_view,
    aten._unsafe_view.default: _fix_view,
    aten.expand.default: _fix_expand,
    aten.slice.Tensor: _fix_slice,
    aten.select.int: _fix_select,
    aten.narrow.default: _refuse_along_tokens(1),
    aten.unflatten.int: _refuse_along_tokens(1),
    aten.split.Tensor: _refuse_along_tokens(2),
    aten.split_with_sizes.default: _refuse_along_tokens(2),
    aten.chunk.default: _refuse_along_tokens(2),
    aten.unbind.int: _refuse_along_tokens(1),
}


def _first_line(exc: Exception) -> str:
    return first_line(exc, 200)


def _rerun(gm: fx.GraphModule, node: fx.Node, env: dict, old_shapes: dict, base_tokens: int):
    """Fix ``node``'s size arguments if its input changed shape, then run it on fakes."""
    first = node.args[0] if node.args else None
    if (
        node.op == "call_function"
        and not node.meta.get(INSERTED)
        and node.target in SIZE_FIXERS
        and isinstance(first, fx.Node)
        and first in old_shapes
        and tuple(env[first].shape) != old_shapes[first]
    ):
        fix = SIZE_FIXERS[node.target]
        node.args = fix(node, tuple(env[first].shape), old_shapes[first], old_shapes.get(node, ()), base_tokens)
    args = map_arg(node.args, env.__getitem__)
    kwargs = map_arg(node.kwargs, env.__getitem__)
    target = gm.get_submodule(node.target) if node.op == "call_module" else node.target
    return target(*args, **kwargs)


def repropagate(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor], old_shapes: dict, base_tokens: int) -> None:
    """Re-run every node on fake tensors in order, rewriting token-count size arguments.

    ``old_shapes`` maps nodes to their shape before insertion; a node whose first input
    changed shape has its size arguments rewritten by ``SIZE_FIXERS``. ``meta["val"]``
    ends up describing the merged graph."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    env: dict[fx.Node, object] = {}
    inputs = iter(example_inputs)
    with mode:
        for node in gm.graph.nodes:
            if node.op == "placeholder":
                env[node] = mode.from_tensor(next(inputs))
            elif node.op == "get_attr":
                attr = gm
                for part in str(node.target).split("."):
                    attr = getattr(attr, part)
                env[node] = mode.from_tensor(attr) if isinstance(attr, torch.Tensor) else attr
            elif node.op in ("call_function", "call_module"):
                try:
                    env[node] = _rerun(gm, node, env, old_shapes, base_tokens)
                except UserError:
                    raise
                except Exception as exc:
                    raise UserError(
                        f"graph-level merging cannot adapt node {node.name} ({node.target}) to the merged "
                        f"token count: {_first_line(exc)}"
                    ) from None
                node.meta["val"] = env[node]
    gm.recompile()


# --------------------------------------------------------------------------- the module


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
        raise UserError(f"torch.export could not trace {type(model_or_program).__name__}: {_first_line(exc)}") from None


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
            f"cannot specialize the dynamic program to the input shapes given: {_first_line(exc)}"
        ) from None


def insert_merges(
    model_or_program: nn.Module | torch.export.ExportedProgram,
    example_inputs: Sequence[torch.Tensor],
    r: int | None = None,
    schedule: schedules.Schedule | Sequence[int] | tuple[int, float] | None = None,
    protected: int | None = None,
    prop_attn: bool = True,
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
        protected, rule = detect_protected_tokens(gm.graph, blocks[0])
    else:
        if not 0 <= protected < base_tokens:
            raise UserError(f"--protected {protected} must be in [0, {base_tokens - 1}] for {base_tokens} tokens")
        rule = f"given: {protected} protected"
    r_per_layer, tokens = schedules.plan(sched.requested(len(blocks)), base_tokens, protected)
    old_shapes = {node: _shape(node) for node in gm.graph.nodes if _shape(node) is not None}

    graph = gm.graph
    size, slots = None, []
    for block, block_r in zip(blocks, r_per_layer):
        if size is not None and prop_attn:
            _proportional_attention(graph, block, size)
        if block_r > 0:
            merged_x, size, slot = _merge_after(graph, block, size, block_r, protected)
            old_shapes[merged_x] = old_shapes[block.residual_add]
            slots.append(slot)

    output = next(n for n in graph.nodes if n.op == "output")
    flat_outputs = list(pytree.tree_leaves(output.args[0]))
    output.args = (tuple(flat_outputs + slots),)
    graph.set_codegen(fx.graph.CodeGen())  # flat in, flat out; the wrapper keeps the pytree specs
    graph.lint()
    repropagate(gm, [t for t in pytree.tree_leaves((example_inputs, {}))], old_shapes, base_tokens)

    state = GraphTomeState(sched, depth=len(blocks), protected=protected, prop_attn=prop_attn)
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


def exported_program(model: GraphMergedModel, example_inputs: Sequence[torch.Tensor]) -> torch.export.ExportedProgram:
    """torch.export of the merged model (outputs only; decisions stay in its state)."""
    return torch.export.export(model, tuple(example_inputs))


def insert_for_export(loaded, method_opts: dict, input_shapes, protected: int | None, progress) -> GraphMergedModel:
    """The pipeline's graph-level path: a .pt2, or a model the eager patcher does not know."""
    if loaded.program is not None:
        expected = loaded.default_input_shape
        if expected is not None and [tuple(s) for s in input_shapes] != [expected]:
            raise UserError(
                f"{loaded.source} was exported for input shape {','.join(map(str, expected))}; "
                "give that --input-shape or export the .pt2 again for the shape you need"
            )
        why = "MODEL is a torch.export archive"
    else:
        why = f"{type(loaded.module).__name__} has no timm-style blocks for the eager patcher"
    generator = torch.Generator().manual_seed(0)
    example_inputs = tuple(torch.randn(*shape, generator=generator) for shape in input_shapes)
    # Reported once done, not as a progress step: bad input must stay a one-line error.
    start = time.perf_counter()
    model = insert_merges(loaded.program or loaded.module, example_inputs, protected=protected, **method_opts)
    state = model._tome_state
    merges = sum(r > 0 for r in state.r_per_layer)
    progress.say(f"• {why}: inserted merges at graph level ({time.perf_counter() - start:.1f} s)")
    progress.say(f"  {merges} merges after {len(state.blocks)} attention blocks; {state.protected_rule}")
    return model


def has_patcher(model: nn.Module) -> bool:
    """Whether the eager ToMe patcher recognizes blocks in ``model``."""
    from tome_export.merging.tome import is_vit_block

    return any(is_vit_block(m) for m in model.modules())


__all__ = [
    "AttentionBlock",
    "GraphMergedModel",
    "SIZE_FIXERS",
    "detect_protected_tokens",
    "find_attention_blocks",
    "has_patcher",
    "insert_for_export",
    "insert_merges",
]
