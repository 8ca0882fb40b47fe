"""The ToMe merge in dense PyTorch ops: comparisons, one-hot matrices and matmuls.

Same results as ``bipartite.merge_tokens`` (same decisions, same slots; values up to float
rounding) without sort, scatter or gather, so converters that lack ``scatter_reduce``
(Core ML) or restrict TopK/Scatter (TensorRT) take the whole merge. Cost is O(N²·C).

``dense_decompositions()`` maps the custom op to this implementation for
``ExportedProgram.run_decompositions``: export once with the op as one node, then lower
it to dense ATen ops only for the converter that needs it.
"""

from __future__ import annotations

import torch

from tome_export.merging.bipartite import max_r, ranks_descending, split_ab


def merge_tokens_dense(
    metric: torch.Tensor, x: torch.Tensor, size: torch.Tensor, r: int, protected: int, b_first: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dense equivalent of ``merge_tokens``: returns (x, size, slot)."""
    batch, num_tokens, channels = x.shape
    p = protected
    if not 0 <= r <= max_r(num_tokens, p):
        raise ValueError(f"r={r} outside [0, {max_r(num_tokens, p)}] for N={num_tokens}")
    body = metric[:, p:]
    body = body / body.norm(dim=-1, keepdim=True)
    a, b = split_ab(body, b_first)
    num_a, num_b = a.shape[1], b.shape[1]
    kept = num_a - r
    scores = a @ b.transpose(-1, -2)
    node_max, node_idx = scores.max(dim=-1)
    is_src = ranks_descending(node_max) < r  # (B, Na)
    is_kept = torch.logical_not(is_src)
    # Output position among kept A tokens: ascending original order, like the eager sort.
    kept_pos = torch.cumsum(is_kept.to(torch.int64), dim=-1) - 1
    out_rows = torch.arange(kept, device=x.device)
    keep_onehot = torch.logical_and(is_kept[:, None, :], kept_pos[:, None, :] == out_rows[None, :, None]).to(x.dtype)
    dst_rows = torch.arange(num_b, device=x.device)
    dst_onehot = torch.logical_and(is_src[:, None, :], node_idx[:, None, :] == dst_rows[None, :, None]).to(x.dtype)

    z = torch.cat([x[:, p:] * size[:, p:], size[:, p:]], dim=-1)
    za, zb = split_ab(z, b_first)
    merged = torch.cat([keep_onehot @ za, zb + dst_onehot @ za], dim=1)
    merged_size = merged[..., channels:]
    merged_x = merged[..., :channels] / merged_size

    slot_a = torch.where(is_src, p + kept + node_idx, p + kept_pos)
    slot_b = (p + kept + dst_rows).expand(batch, num_b)
    first, second = (slot_b, slot_a) if b_first else (slot_a, slot_b)
    if first.shape[1] > second.shape[1]:  # odd body: one more leading token; pad, interleave, cut
        second = torch.cat([second, second[:, :1]], dim=1)
    body_slot = torch.stack([first, second], dim=-1).reshape(batch, 2 * first.shape[1])[:, : num_tokens - p]
    protected_slot = torch.arange(p, device=x.device).expand(batch, p)
    return (
        torch.cat([x[:, :p], merged_x], dim=1),
        torch.cat([size[:, :p], merged_size], dim=1),
        torch.cat([protected_slot, body_slot], dim=1),
    )


def dense_decompositions() -> dict:
    """Decomposition table: the merge custom op → dense ATen ops, plus torch's defaults."""
    from torch.export import default_decompositions

    table = default_decompositions()
    table[torch.ops.tome_export.bipartite_merge.default] = merge_tokens_dense
    return table


def export_dense(model: torch.nn.Module, example_inputs: tuple[torch.Tensor, ...]) -> torch.export.ExportedProgram:
    """torch.export the model, then lower every merge to dense ATen ops (no scatter)."""
    from tome_export.merging.tomesd import dense_merges  # tomesd merges traced as dense ops directly

    model.eval()
    with torch.no_grad(), dense_merges():
        program = torch.export.export(model, tuple(example_inputs))
    return program.run_decompositions(dense_decompositions())


__all__ = ["dense_decompositions", "export_dense", "merge_tokens_dense"]
