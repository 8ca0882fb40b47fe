"""ToMe bipartite soft matching as pure functions (the eager reference).

Layout convention used everywhere in tome-export: the first ``protected`` tokens
(class, distillation, register tokens) pass through untouched; the remaining tokens
alternate A, B, A, B…  Each A token proposes its most similar B token (cosine of the
metric); the ``r`` strongest proposals merge (size-weighted average into the B token).
Output order: protected tokens, unmerged A tokens in their original order, B tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MergeDecision:
    """Which tokens merge where; every index tensor is int64 with batch first."""

    unm_idx: torch.Tensor  # (B, Na - r) A positions kept, ascending
    src_idx: torch.Tensor  # (B, r) A positions merged away
    dst_idx: torch.Tensor  # (B, r) B position each one merges into
    protected: int
    num_tokens: int


def max_r(num_tokens: int, protected: int) -> int:
    """Largest r a layer with ``num_tokens`` tokens can merge (half the unprotected)."""
    return max(0, (num_tokens - protected) // 2)


def match(metric: torch.Tensor, r: int, protected: int = 0) -> MergeDecision:
    """Bipartite soft matching on ``metric`` (B, N, D); ``r`` must be ≤ max_r."""
    batch, num_tokens, _ = metric.shape
    if not 0 <= r <= max_r(num_tokens, protected):
        raise ValueError(f"r={r} outside [0, {max_r(num_tokens, protected)}] for N={num_tokens}")
    with torch.no_grad():
        body = metric[:, protected:]
        body = body / body.norm(dim=-1, keepdim=True)
        a, b = body[:, 0::2], body[:, 1::2]
        scores = a @ b.transpose(-1, -2)
        node_max, node_idx = scores.max(dim=-1)
        # Stable descending sort = TopK's documented tie-break (lower index first),
        # so eager and exported graphs order equal scores identically.
        edge_idx = torch.sort(node_max, dim=-1, descending=True, stable=True).indices
        src_idx = edge_idx[:, :r]
        unm_idx = torch.sort(edge_idx[:, r:], dim=-1).values
        dst_idx = node_idx.gather(-1, src_idx)
    return MergeDecision(unm_idx, src_idx, dst_idx, protected, num_tokens)


def merge_weighted(decision: MergeDecision, x: torch.Tensor, size: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted average merge of ``x`` (B, N, C) with token sizes (B, N, 1)."""
    p = decision.protected
    channels = x.shape[-1]
    # One gather/scatter moves weighted values and sizes together.
    z = torch.cat([x[:, p:] * size[:, p:], size[:, p:]], dim=-1)
    za, zb = z[:, 0::2], z[:, 1::2]

    def take(idx: torch.Tensor) -> torch.Tensor:
        return za.gather(1, idx[..., None].expand(-1, -1, za.shape[-1]))

    dst = zb.scatter_add(1, decision.dst_idx[..., None].expand(-1, -1, zb.shape[-1]), take(decision.src_idx))
    merged = torch.cat([take(decision.unm_idx), dst], dim=1)
    merged_size = merged[..., channels:]
    merged_x = merged[..., :channels] / merged_size
    return (
        torch.cat([x[:, :p], merged_x], dim=1),
        torch.cat([size[:, :p], merged_size], dim=1),
    )


def slots(decision: MergeDecision) -> torch.Tensor:
    """Output position of every input token, (B, N) int64 — the merge decision as data."""
    p, n = decision.protected, decision.num_tokens
    batch, kept = decision.unm_idx.shape
    r = decision.src_idx.shape[1]
    num_a, num_b = kept + r, (n - p) // 2
    dev = decision.unm_idx.device
    slot_a = torch.empty(batch, num_a, dtype=torch.int64, device=dev)
    slot_a.scatter_(1, decision.unm_idx, p + torch.arange(kept, device=dev).expand(batch, kept))
    slot_a.scatter_(1, decision.src_idx, p + kept + decision.dst_idx)
    slot_b = (p + kept + torch.arange(num_b, device=dev)).expand(batch, num_b)
    body = torch.empty(batch, n - p, dtype=torch.int64, device=dev)
    body[:, 0::2], body[:, 1::2] = slot_a, slot_b
    return torch.cat([torch.arange(p, device=dev).expand(batch, p), body], dim=1)


def unmerge(merged: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
    """Inverse of a merge for token-wise outputs: every token takes its slot's value."""
    return merged.gather(1, slot[..., None].expand(-1, -1, merged.shape[-1]))


def merge_tokens(
    metric: torch.Tensor, x: torch.Tensor, size: torch.Tensor, r: int, protected: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Match and merge in one call: (x, size, slot). What the custom op computes."""
    decision = match(metric, r, protected)
    merged_x, merged_size = merge_weighted(decision, x, size)
    return merged_x, merged_size, slots(decision)


def ranks_descending(values: torch.Tensor) -> torch.Tensor:
    """Position of every entry in a stable descending sort, by counting (no sort op).

    rank_i = #{j: v_j > v_i} + #{j < i: v_j == v_i}, the tie-break of a stable sort."""
    count = values.shape[-1]
    vi, vj = values[..., :, None], values[..., None, :]
    index = torch.arange(count, device=values.device)
    earlier = index[None, :] < index[:, None]  # [i, j]: j comes before i
    # logical_* rather than |/&: coremltools converts those, not aten.bitwise_*.
    beats = torch.logical_or(vj > vi, torch.logical_and(vj == vi, earlier))
    return beats.to(torch.int64).sum(-1)
