"""ToMe bipartite soft matching as pure functions (the eager reference).

Layout convention used everywhere in tome-export: the first ``protected`` tokens
(class, distillation, register tokens) pass through untouched; the remaining tokens
(the body) alternate A, B, A, B… — or B, A, B, A… with ``b_first``. Each A token proposes
its most similar B token (cosine of the metric); the ``r`` strongest proposals merge
(size-weighted average into the B token). Output order: protected tokens, unmerged A
tokens in their original order, B tokens.

Two splits of facebookresearch/ToMe's ``bipartite_soft_matching`` are expressed this way
(see :func:`split_for`): the official one alternates A/B over *all* tokens with the class
token at A[0] (kept out by a -inf score row) and a distillation token at B[0] (never a
destination: -inf column). With a class token only, that is ``protected=1, b_first=True``
(the body starts with a B token); with class and distillation tokens, ``protected=2``.
Without a class token the official code leaves unmerged tokens in score order, which
changes the next layer's split; tome-export does not implement that (use "prefix",
which keeps them in position order). The "prefix" split (``b_first=False`` always) strips all
protected tokens — class, distillation *and register* tokens — then alternates A, B;
the official code has no answer for register tokens.
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
    b_first: bool = False


SPLITS = ("official", "prefix")


def split_for(split: str, class_token: bool, distill_token: bool, registers: int) -> tuple[int, bool]:
    """(protected, b_first) of a split for a model's prefix tokens (class, distillation, registers).

    Raises ValueError for "official" unless the prefix is a class token, optionally followed
    by a distillation token (see the module doc)."""
    protected = int(class_token) + int(distill_token) + registers
    if split == "prefix":
        return protected, False
    if split != "official":
        raise ValueError(f"unknown split {split!r}; choose one of: {', '.join(SPLITS)}")
    if registers or not class_token:
        raise ValueError("the official ToMe split is implemented for class (+ distillation) tokens only")
    # Class token alone: it sits at A[0] of the all-token alternation, so the body
    # (everything after it) starts with B. Class + distillation: both sit at index 0 of
    # A and B, the body starts with A again.
    return protected, class_token and not distill_token


def ab_counts(body_tokens: int, b_first: bool = False) -> tuple[int, int]:
    """(number of A tokens, number of B tokens) in a body of ``body_tokens``."""
    longer, shorter = (body_tokens + 1) // 2, body_tokens // 2
    return (shorter, longer) if b_first else (longer, shorter)


def split_ab(body: torch.Tensor, b_first: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(A tokens, B tokens) of ``body`` (B, N, C) along dim 1."""
    even, odd = body[:, 0::2], body[:, 1::2]
    return (odd, even) if b_first else (even, odd)


def max_r(num_tokens: int, protected: int) -> int:
    """Largest r a layer with ``num_tokens`` tokens can merge (half the unprotected)."""
    return max(0, (num_tokens - protected) // 2)


def match(metric: torch.Tensor, r: int, protected: int = 0, b_first: bool = False) -> MergeDecision:
    """Bipartite soft matching on ``metric`` (B, N, D); ``r`` must be ≤ max_r."""
    batch, num_tokens, _ = metric.shape
    if not 0 <= r <= max_r(num_tokens, protected):
        raise ValueError(f"r={r} outside [0, {max_r(num_tokens, protected)}] for N={num_tokens}")
    with torch.no_grad():
        body = metric[:, protected:]
        body = body / body.norm(dim=-1, keepdim=True)
        a, b = split_ab(body, b_first)
        scores = a @ b.transpose(-1, -2)
        node_max, node_idx = scores.max(dim=-1)
        # Stable descending sort = TopK's documented tie-break (lower index first),
        # so eager and exported graphs order equal scores identically.
        edge_idx = torch.sort(node_max, dim=-1, descending=True, stable=True).indices
        src_idx = edge_idx[:, :r]
        unm_idx = torch.sort(edge_idx[:, r:], dim=-1).values
        dst_idx = node_idx.gather(-1, src_idx)
    return MergeDecision(unm_idx, src_idx, dst_idx, protected, num_tokens, b_first)


def merge_weighted(decision: MergeDecision, x: torch.Tensor, size: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted average merge of ``x`` (B, N, C) with token sizes (B, N, 1)."""
    p = decision.protected
    channels = x.shape[-1]
    # One gather/scatter moves weighted values and sizes together.
    z = torch.cat([x[:, p:] * size[:, p:], size[:, p:]], dim=-1)
    za, zb = split_ab(z, decision.b_first)

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
    num_a, num_b = ab_counts(n - p, decision.b_first)
    dev = decision.unm_idx.device
    slot_a = torch.empty(batch, num_a, dtype=torch.int64, device=dev)
    slot_a.scatter_(1, decision.unm_idx, p + torch.arange(kept, device=dev).expand(batch, kept))
    slot_a.scatter_(1, decision.src_idx, p + kept + decision.dst_idx)
    slot_b = (p + kept + torch.arange(num_b, device=dev)).expand(batch, num_b)
    body = torch.empty(batch, n - p, dtype=torch.int64, device=dev)
    if decision.b_first:
        body[:, 0::2], body[:, 1::2] = slot_b, slot_a
    else:
        body[:, 0::2], body[:, 1::2] = slot_a, slot_b
    return torch.cat([torch.arange(p, device=dev).expand(batch, p), body], dim=1)


def unmerge(merged: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
    """Inverse of a merge for token-wise outputs: every token takes its slot's value."""
    return merged.gather(1, slot[..., None].expand(-1, -1, merged.shape[-1]))


def merge_tokens(
    metric: torch.Tensor, x: torch.Tensor, size: torch.Tensor, r: int, protected: int, b_first: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Match and merge in one call: (x, size, slot). What the custom op computes."""
    decision = match(metric, r, protected, b_first)
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
