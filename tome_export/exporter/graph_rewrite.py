"""Rewriting an exported graph for ToMe: merges after residual adds, proportional
attention, SDPA written out as its math, attention masks that follow the merge.

Every node this module creates carries ``meta[INSERTED]`` so re-propagation and later
rewrites leave it alone.
"""

from __future__ import annotations

import math
import operator

import torch
from torch import fx

from tome_export.errors import UserError
from tome_export.exporter.graph_blocks import AttentionBlock, _shape
from tome_export.merging import ops  # noqa: F401  (registers tome_export::bipartite_merge)

aten = torch.ops.aten
INSERTED = "tome_inserted"  # meta key on nodes this pass creates


def _insert(graph: fx.Graph, after: fx.Node, target, *args) -> fx.Node:
    with graph.inserting_after(after):
        node = graph.call_function(target, args)
    node.meta[INSERTED] = True
    return node


def _merge_after(
    graph, block: AttentionBlock, size: fx.Node | None, r: int, protected: int, b_first: bool = False, masks=None
):
    """Merge the residual stream right after the block's residual add; returns (x, size, slot).

    ``masks``: a ``graph_masks.MaskFollower`` of a key-padding mask: before the merge it
    moves real tokens to the front and widens the metric so that real tokens merge as
    they would unpadded (``MaskFollower.prepare``); its ``route`` maps the slots back."""
    x = stream = block.residual_add
    cursor = metric = _insert(graph, x, aten.mean.dim, block.keys, [1])
    if block.keys_transposed:
        cursor = metric = _insert(graph, metric, aten.transpose.int, metric, -2, -1)
    if size is None:  # all ones: every token stands for one patch
        cursor = first = _insert(graph, cursor, aten.slice.Tensor, x, -1, 0, 1)
        cursor = size = _insert(graph, first, aten.ones_like.default, first)
    if masks is not None:
        key_shape = _shape(block.keys)
        metric_dim = key_shape[-2] if block.keys_transposed else key_shape[-1]
        cursor, metric, stream, size = masks.prepare(cursor, metric, metric_dim, x, size, protected, bool(b_first))
    merge_op = torch.ops.tome_export.bipartite_merge.default
    merge = _insert(graph, cursor, merge_op, metric, stream, size, r, protected, bool(b_first))
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
            zero = _insert_before(graph, node, aten.scalar_tensor.default, 0.0)
            blocked = _insert_before(graph, node, aten.scalar_tensor.default, -math.inf)
            mask = _insert_before(graph, node, aten.where.self, mask, zero, blocked)
        logits = _insert_before(graph, node, aten.add.Tensor, logits, mask)
    logits = _insert_before(graph, node, aten.add.Tensor, logits, bias)
    weights = _insert_before(graph, node, aten.softmax.int, logits, -1)
    out = _insert_before(graph, node, aten.matmul.default, weights, v)
    out.meta["tome_replaces"] = node.meta.get("val")  # the SDPA's shape before merging, for re-propagation
    node.replace_all_uses_with(out)
    graph.erase_node(node)


def _dtype(node) -> torch.dtype | None:
    if isinstance(node, fx.Node) and "tome_dtype" in node.meta:  # made by this pass, not yet propagated
        return node.meta["tome_dtype"]
    value = node.meta.get("val") if isinstance(node, fx.Node) else None
    return value.dtype if isinstance(value, torch.Tensor) else None
