"""Attention masks that follow the merge, in graph-level insertion.

Transformers (Hugging Face's included) build one attention mask — boolean "may attend"
or additive 0/-inf — of shape (B|1, 1, N|1, N) and feed it to every block. Once tokens
merge, every later block needs the mask of the merged tokens:

- a **key-padding** mask (the same for every query) merges with its tokens, and a padded
  sentence merges its real tokens exactly as the same sentence alone, unpadded
  (:meth:`MaskFollower.prepare`, before every merge):

  1. real tokens move to the front, padded ones after (a stable partition; the mask row,
     sizes and metric move along, the unmerge at the output follows). The merge op's
     A/B split is by position and it outputs kept A tokens before B tokens, so without
     the move the padded tokens left between them would shift the real tokens' A/B
     roles in every later layer (and with left padding from the first);
  2. the metric is normalized, scaled by 1/√2 and widened by three components: real
     tokens get (1/√2, 0, 0); padded ones, by their A/B role, (-α, √(1-α²), 0) or
     (-α, -t, √(1-α²-t²)) with α = 0.1, t = 2α²/√(1-α²). Every row is a unit vector, so
     the op's cosine is (c + 1)/2 ≥ 0 between real tokens (ToMe's order, a monotone
     map of its cosine c), -α² between a padded A and a padded B token, and -α/√2 between
     a real and a padded one. Every real A token with a real B token left proposes a
     real destination, and real edges rank before every padded one: the r merges go to
     the real tokens as without padding; padding absorbs only merges the real tokens
     cannot take (r above their A tokens), and a padded token is merged with a real one
     only when the layer has no same-kind partner left for it;
- a mask that differs between queries (causal, sliding window, ALiBi-style) is refused:
  merging would mix positions the mask keeps apart;
- a mask that does not depend on the model's inputs and lets everything attend (vision
  transformers in recent transformers versions build one from ``arange``) just follows
  the merge, and the metric stays ToMe's own.

Masks are classified by evaluating the graph once on the example inputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import fx

from tome_export.errors import UserError
from tome_export.exporter.graph_blocks import PASS_THROUGH_OPS, AttentionBlock, _ancestors, _shape
from tome_export.exporter.graph_rewrite import _insert, _insert_before

aten = torch.ops.aten
_SDPA_MASK_POSITION = 3
# The widened metric of a padding-masked merge (module doc): the scale of a real
# token's normalized metric, and the three appended components by kind and role.
_PAD_KIND = 0.1  # α
_PAD_CROSS = 2 * _PAD_KIND**2 / math.sqrt(1 - _PAD_KIND**2)  # t: padded A · padded B = -α²
REAL_SCALE = math.sqrt(0.5)
REAL_EXTRA = (math.sqrt(0.5), 0.0, 0.0)
PAD_A_EXTRA = (-_PAD_KIND, math.sqrt(1 - _PAD_KIND**2), 0.0)
PAD_B_EXTRA = (-_PAD_KIND, -_PAD_CROSS, math.sqrt(1 - _PAD_KIND**2 - _PAD_CROSS**2))


@dataclass
class MaskUse:
    """Where one attention block reads its mask: an SDPA argument or a logits add."""

    block: AttentionBlock
    consumer: fx.Node  # the SDPA node or the add node
    mask: fx.Node


def find_mask(block: AttentionBlock) -> MaskUse | None:
    """The (…, N) mask a block's attention uses, if any."""
    node = block.attention
    if block.kind == "sdpa":
        mask = node.kwargs.get("attn_mask", node.args[_SDPA_MASK_POSITION] if len(node.args) > 3 else None)
        return MaskUse(block, node, mask) if isinstance(mask, fx.Node) else None
    current = node.args[0]
    while isinstance(current, fx.Node) and current.op == "call_function" and current.target in PASS_THROUGH_OPS:
        if current.target == aten.add.Tensor:
            for operand in current.args[:2]:
                shape = _shape(operand)
                if (
                    isinstance(operand, fx.Node)
                    and shape is not None
                    and len(shape) == 4
                    and shape[-1] == block.num_tokens
                    and block.keys not in _ancestors(operand)
                ):
                    return MaskUse(block, current, operand)
        current = current.args[0]
    return None


def classify(mask_value: torch.Tensor, depends_on_inputs: bool, name: str) -> str:
    """ "trivial" (input-independent, all attend), "padding" (same for every query), or refuse."""
    value = mask_value.float()
    if value.dim() != 4 or value.shape[1] != 1:
        raise UserError(
            f"attention mask {name} has shape {tuple(value.shape)}, not (B, 1, N|1, N): per-head masks cannot "
            "follow the merge; use --r 0 to export unmerged"
        )
    if value.shape[-2] != 1 and not torch.equal(value, value[..., :1, :].expand_as(value)):
        raise UserError(
            f"attention mask {name} differs between queries (causal or windowed attention): merging tokens "
            "would mix positions the mask keeps apart; use --r 0 to export unmerged"
        )
    attend_all = bool((value > -1.0).all()) if mask_value.dtype != torch.bool else bool(mask_value.all())
    return "trivial" if attend_all and not depends_on_inputs else "padding"


def _evaluate(gm: fx.GraphModule, nodes: list[fx.Node], example_inputs) -> dict[fx.Node, torch.Tensor]:
    """Values of ``nodes`` on the example inputs (one run of the graph)."""
    wanted, values = set(nodes), {}

    class Capture(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n in wanted:
                values[n] = out
            return out

    with torch.no_grad():
        Capture(gm).run(*example_inputs)
    return values


def masks_to_follow(gm: fx.GraphModule, blocks: list[AttentionBlock], example_inputs) -> tuple[list, str | None]:
    """Each block's mask use (or None) and the kind of the shared mask (None: no mask).

    Raises UserError for masks ToMe cannot follow (per-query masks, blocks with different
    masks)."""
    uses = [find_mask(b) for b in blocks]
    masks = {u.mask for u in uses if u is not None}
    if not masks:
        return uses, None
    values = _evaluate(gm, list(masks), example_inputs)
    first = next(u.mask for u in uses if u is not None)
    for mask in masks:
        if mask is not first and not torch.equal(values[mask], values[first]):
            raise UserError(
                f"attention blocks use different masks ({first.name}, {mask.name}); graph-level merging "
                "follows one mask; use --r 0 to export unmerged"
            )
    if any(u is None for u in uses):
        raise UserError("some attention blocks use a mask and others do not; use --r 0 to export unmerged")
    placeholders = {n for n in gm.graph.nodes if n.op == "placeholder" and not n.name.startswith(("p_", "b_", "c_"))}
    depends = bool(_ancestors(first) & placeholders)
    kinds = {classify(values[m], depends, m.name) for m in masks}
    return uses, "padding" if "padding" in kinds else "trivial"


class MaskFollower:
    """The key row of the shared mask at the current merge stage, and its 4-D form."""

    def __init__(self, graph: fx.Graph, first_use: MaskUse, kind: str, batch: int) -> None:
        self.graph, self.kind = graph, kind
        mask = first_use.mask
        self.shape = _shape(mask)
        self.dtype = mask.meta["val"].dtype
        anchor = first_use.consumer
        row = _insert_before(graph, anchor, aten.select.int, mask, 2, 0)  # (Bm, 1, N): one query row
        row = _insert_before(graph, anchor, aten.select.int, row, 1, 0)  # (Bm, N)
        row = _insert_before(graph, anchor, aten._to_copy.default, row)
        row.kwargs = {"dtype": torch.float32}
        self.row = _insert_before(graph, anchor, aten.expand.default, row, [batch, self.shape[-1]])
        self.batch, self.tokens = batch, self.shape[-1]

    def prepare(
        self, after: fx.Node, metric: fx.Node, metric_dim: int, x: fx.Node, size: fx.Node, protected: int, b_first: bool
    ) -> tuple[fx.Node, fx.Node, fx.Node, fx.Node]:
        """Before a merge: real tokens moved to the front, the metric (B, N, metric_dim)
        widened (module doc).

        Returns (last node, metric, x, size) for the merge op; the mask row follows the
        move, and :meth:`route` maps the merge's slots back to the positions before it."""
        graph, batch, tokens = self.graph, self.batch, self.tokens
        at = after

        def add(target, *args, **kwargs):
            nonlocal at
            at = _insert(graph, at, target, *args)
            at.kwargs = kwargs
            return at

        real = add(aten.gt.Scalar, self.row, 0.5 if self.dtype == torch.bool else -1.0)
        counts = add(aten._to_copy.default, real, dtype=torch.int64)
        real_rank = add(aten.sub.Scalar, add(aten.cumsum.default, counts, 1), 1)
        num_real = add(aten.sum.dim_IntList, counts, [1], True)
        pad_rank = add(aten.add.Tensor, add(aten.cumsum.default, add(aten.rsub.Scalar, counts, 1), 1), num_real)
        # Stable partition: real tokens first, padded ones after, each in their order.
        order = add(aten.where.self, real, real_rank, add(aten.sub.Scalar, pad_rank, 1))
        index = add(aten.arange.default, tokens)
        positions = add(aten.expand.default, index, [batch, tokens])
        source = add(aten.scatter.src, add(aten.zeros_like.default, order), 1, order, positions)  # new → old

        def moved(node: fx.Node, channels: int | None) -> fx.Node:
            if channels is None:
                return add(aten.gather.default, node, 1, source)
            rows = add(aten.expand.default, add(aten.unsqueeze.default, source, -1), [batch, tokens, channels])
            return add(aten.gather.default, node, 1, rows)

        x, size, self.row = moved(x, _shape(x)[-1]), moved(size, 1), moved(self.row, None)
        metric = moved(metric, metric_dim)
        self.order = order
        # After the move position i is real iff i < number of real tokens.
        real = add(aten.lt.Tensor, index, num_real)  # (B, N)
        norm = add(aten.linalg_vector_norm.default, metric, 2.0, [-1], True)
        scale = add(aten.where.self, real, self._scalar(at, REAL_SCALE), self._scalar(at, 0.0))
        parts = [add(aten.mul.Tensor, add(aten.div.Tensor, metric, norm), add(aten.unsqueeze.default, scale, -1))]
        body = add(aten.sub.Scalar, index, protected)
        is_b = add(aten.eq.Scalar, add(aten.remainder.Scalar, body, 2), 0 if b_first else 1)
        for real_value, pad_a, pad_b in zip(REAL_EXTRA, PAD_A_EXTRA, PAD_B_EXTRA):
            pad = add(aten.where.self, is_b, self._scalar(at, pad_b), self._scalar(at, pad_a))
            column = add(aten.where.self, real, self._scalar(at, real_value), pad)
            parts.append(add(aten.unsqueeze.default, column, -1))
        metric = add(aten.cat.default, parts, -1)
        return metric, metric, x, size

    def route(self, after: fx.Node, slot: fx.Node) -> fx.Node:
        """Merged position of every token as it was before :meth:`prepare` moved it."""
        return _insert(self.graph, after, aten.gather.default, slot, 1, self.order)

    def _scalar(self, after: fx.Node, value: float) -> fx.Node:
        return _insert_before(self.graph, after, aten.scalar_tensor.default, value)

    def follow(self, after: fx.Node, slot: fx.Node, tokens_out: int) -> fx.Node:
        """The key row after a merge: members agree (``prepare``), so amax picks their
        common value; in the one forced mix (module doc) it marks the merged token real."""
        graph = self.graph
        zeros = _insert(graph, after, aten.zeros.default, [self.batch, tokens_out])
        merged = _insert(graph, zeros, aten.scatter_reduce.two, zeros, 1, slot, self.row, "amax")
        merged.kwargs = {"include_self": False}
        self.row, self.tokens = merged, tokens_out
        return merged

    def mask_for(self, use: MaskUse) -> fx.Node:
        """A mask shaped like the original, for the current merged token count."""
        graph, anchor = self.graph, use.consumer
        rows = _insert_before(graph, anchor, aten.view.default, self.row, [self.batch, 1, 1, self.tokens])
        if self.dtype == torch.bool:
            rows = _insert_before(graph, anchor, aten.gt.Scalar, rows, 0.5)
        else:
            rows = _insert_before(graph, anchor, aten._to_copy.default, rows)
            rows.kwargs = {"dtype": self.dtype}
        queries = 1 if self.shape[-2] == 1 else self.tokens
        mask = _insert_before(graph, anchor, aten.expand.default, rows, [self.batch, 1, queries, self.tokens])
        mask.meta["tome_dtype"] = self.dtype
        use.consumer.replace_input_with(use.mask, mask)
        return mask
