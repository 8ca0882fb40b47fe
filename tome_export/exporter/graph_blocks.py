"""Finding self-attention blocks and protected prefix tokens in a torch.export graph.

An attention block is ``aten.scaled_dot_product_attention``, or matmul → softmax → matmul
(eager attention, also as core-ATen bmm), followed by its output projection and the
residual add whose other operand is the block input. :func:`find_attention_blocks` lists
them in graph order with the reason every other candidate was passed over;
:func:`detect_protected_tokens` reads the learned prefix tokens off the token concat.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

aten = torch.ops.aten

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


@dataclass(frozen=True)
class PrefixTokens:
    """Learned prefix tokens found in the graph, by kind, and how they were found."""

    class_token: bool
    distill_token: bool
    registers: int
    rule: str

    @property
    def count(self) -> int:
        return int(self.class_token) + int(self.distill_token) + self.registers


SLICE_OPS = {aten.slice.Tensor}
PREFIX_SHAPE_OPS = PREFIX_PASS_OPS | {aten.view.default, aten.reshape.default, aten.unsqueeze.default}


def _token_cats(graph: fx.Graph, upstream: set) -> list[fx.Node]:
    return [
        n
        for n in graph.nodes
        if n in upstream
        and n.target == aten.cat.default
        and len(_shape(n) or ()) == 3
        and (n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)) % 3 == 1
    ]


def _learned_prefix(graph: fx.Graph, cat: fx.Node, depth: int = 0) -> list[tuple[str, int]]:
    """(parameter name, tokens) of the learned tokens at the start of a token concat.

    A part is learned when it is a parameter — (C,), (1, C) or (1, k, C) — through
    expand/repeat/view/casts, or a leading slice ``[:, :k]`` of an earlier concat's learned
    prefix (DINOv2 puts registers after ``embeddings[:, :1]``, the class token)."""
    found = []
    for part in cat.args[0]:
        tokens = (_shape(part) or (0, 0))[1] if len(_shape(part) or ()) == 3 else 0
        source = _walk_back(part, PREFIX_SHAPE_OPS)
        shape = _shape(source)
        if (
            source.op == "get_attr"
            and shape is not None
            and 1 <= len(shape) <= 3
            and (len(shape) == 1 or shape[0] == 1)
        ):
            found.append((str(source.target), tokens))
            continue
        if depth < 2 and isinstance(part, fx.Node) and part.target in SLICE_OPS and part.args[1] % 3 == 1:
            start = part.args[2] if len(part.args) > 2 else 0
            earlier = _token_cats(graph, _ancestors(part))
            if not start and earlier:
                inner = _learned_prefix(graph, earlier[-1], depth + 1)
                if sum(k for _, k in inner) >= tokens > 0:
                    taken, left = [], tokens
                    for name, k in inner:
                        if left <= 0:
                            break
                        taken.append((name, min(k, left)))
                        left -= k
                    found.extend(taken)
                    continue
        break
    return found


def detect_protected_tokens(graph: fx.Graph, first_block: AttentionBlock) -> PrefixTokens:
    """Prefix tokens ToMe must not merge, read off the graph.

    Rule: take the last concatenation along the token dim (dim 1 of a rank-3 tensor)
    that the first attention block depends on; count the tokens of its leading inputs
    that are learned parameters (see :func:`_learned_prefix`): class, distillation and
    register tokens. Kinds come from the parameter names: one with "reg" in its name
    holds registers, one with "dist" a distillation token, the first other one is the
    class token. No such concatenation: no protected tokens.
    """
    cats = _token_cats(graph, _ancestors(first_block.queries))
    if not cats:
        return PrefixTokens(False, False, 0, "no token concatenation before the first attention block: 0 protected")
    prefix = _learned_prefix(graph, cats[-1])
    if not prefix:
        return PrefixTokens(False, False, 0, f"{cats[-1].name} starts with no learned parameter: 0 protected tokens")
    class_token = distill_token = False
    registers = 0
    for name, tokens in prefix:
        lowered = name.lower()
        if "reg" in lowered:
            registers += tokens
        elif "dist" in lowered and tokens == 1 and not distill_token:
            distill_token = True
        elif not class_token and tokens == 1 and not registers and not distill_token:
            class_token = True
        else:
            registers += tokens  # anything else learned in the prefix: protected like a register
    count = sum(k for _, k in prefix)
    names = ", ".join(name for name, _ in prefix)
    return PrefixTokens(
        class_token, distill_token, registers, f"learned prefix tokens {names} at {cats[-1].name}: {count} protected"
    )
