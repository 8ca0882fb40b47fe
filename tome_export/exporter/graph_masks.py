"""Attention masks that follow the merge, in graph-level insertion.

Transformers (Hugging Face's included) build one attention mask — boolean "may attend"
or additive 0/-inf — of shape (B|1, 1, N|1, N) and feed it to every block. Once tokens
merge, every later block needs the mask of the merged tokens:

- a **key-padding** mask (the same for every query) merges with its tokens: the merged
  token's value is its members' value. Members always agree, because the matching
  never pairs a padded token with a real one: the metric gets one more component, +1
  for real and -1 for padded tokens, after normalizing it, so the cosine of a same-kind
  pair is (c + 1) / 2 ≥ 0 and of a mixed pair (c - 1) / 2 ≤ 0 — the same order as ToMe's
  cosine c among same-kind pairs, and mixed pairs last;
- a mask that differs between queries (causal, sliding window, ALiBi-style) is refused:
  merging would mix positions the mask keeps apart;
- a mask that does not depend on the model's inputs and lets everything attend (vision
  transformers in recent transformers versions build one from ``arange``) just follows
  the merge, and the metric stays ToMe's own.

Masks are classified by evaluating the graph once on the example inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from tome_export.errors import UserError
from tome_export.exporter.graph_blocks import PASS_THROUGH_OPS, AttentionBlock, _ancestors, _shape
from tome_export.exporter.graph_rewrite import _insert, _insert_before

aten = torch.ops.aten
_SDPA_MASK_POSITION = 3


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

    def groups_metric(self, after: fx.Node, metric: fx.Node) -> tuple[fx.Node, fx.Node]:
        """``metric`` normalized, with +1 (real) / -1 (padded) appended; returns (last node, metric)."""
        graph = self.graph
        norm = _insert(graph, after, aten.linalg_vector_norm.default, metric, 2.0, [-1], True)
        unit = _insert(graph, norm, aten.div.Tensor, metric, norm)
        if self.dtype == torch.bool:
            real = _insert(graph, unit, aten.gt.Scalar, self.row, 0.5)
        else:
            real = _insert(graph, unit, aten.gt.Scalar, self.row, -1.0)
        sign = _insert(graph, real, aten.where.self, real, self._scalar(real, 1.0), self._scalar(real, -1.0))
        column = _insert(graph, sign, aten.unsqueeze.default, sign, -1)
        widened = _insert(graph, column, aten.cat.default, [unit, column], -1)
        return widened, widened

    def _scalar(self, after: fx.Node, value: float) -> fx.Node:
        return _insert_before(self.graph, after, aten.scalar_tensor.default, value)

    def follow(self, after: fx.Node, slot: fx.Node, tokens_out: int) -> fx.Node:
        """The key row after a merge (members agree, so amax picks their common value)."""
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
