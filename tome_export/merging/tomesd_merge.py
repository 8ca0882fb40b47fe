"""tomesd's merge as pure functions and one custom op (the math; patching is in tomesd.py).

tokens are split into destinations (one per ``sx``×``sy`` cell of the latent grid) and
sources (the rest); the ``r`` sources most similar (cosine) to a destination are averaged
into it. The partition is plain Python (a constant of the exported graph).

The custom op ``tome_export::tomesd_merge(metric, x, h, w, sx, sy, r, seed) -> (merged
(B, N - r, C), slot (B, N) int64)``; ``slot`` follows the project convention (output
position of every input token), so verification reports decision agreement. Output
order: unmerged sources ascending by token index, then destinations ascending. The op
honours ``pinning.forced_decisions`` (decision-pinned verification).
"""

from __future__ import annotations

import functools
import random

import torch

from tome_export.merging import pinning

# -- the partition and the merge as pure functions ------------------------------------


@functools.lru_cache(maxsize=64)
def partition(h: int, w: int, sx: int, sy: int, seed: int = -1) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(source token indices, destination token indices), each ascending.

    One destination per full sx×sy cell: its top-left token when ``seed`` < 0, else a
    token drawn with ``random.Random(seed)``. Tokens outside the full cells (h or w not
    divisible) are sources. Plain Python: the partition is a constant of the graph."""
    rng = random.Random(seed) if seed >= 0 else None
    destinations = set()
    for cy in range(h // sy):
        for cx in range(w // sx):
            offset = rng.randrange(sx * sy) if rng else 0
            destinations.add((cy * sy + offset // sx) * w + cx * sx + offset % sx)
    sources = tuple(t for t in range(h * w) if t not in destinations)
    return sources, tuple(sorted(destinations))


def max_ratio(sx: int, sy: int) -> float:
    return 1.0 - 1.0 / (sx * sy)


def tokens_merged(num_tokens: int, ratio: float, num_src: int) -> int:
    """tomesd's r: ``int(N · ratio)``, capped by the number of sources."""
    return min(int(num_tokens * ratio), num_src)


def _partition_tensors(h: int, w: int, sx: int, sy: int, seed: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    return tuple(torch.tensor(t, dtype=torch.int64, device=device) for t in partition(h, w, sx, sy, seed))


def _scores(metric: torch.Tensor, a_idx: torch.Tensor, b_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores (B, Na, Nb) with destinations normalised, norms of the sources (B, Na))."""
    # Cosine similarity, normalising only the (fewer) destinations before the MatMul:
    # a source's norm scales its whole row, so it changes no argmax — divide after.
    metric_a, metric_b = metric[:, a_idx], metric[:, b_idx]
    scores = metric_a @ (metric_b / metric_b.norm(dim=-1, keepdim=True)).transpose(-1, -2)
    return scores, metric_a.norm(dim=-1)


def merge_tokens(
    metric: torch.Tensor, x: torch.Tensor, h: int, w: int, sx: int, sy: int, r: int, seed: int = -1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge ``x`` (B, N, C) by similarity of ``metric`` (B, N, D): (merged, slot)."""
    a_idx, b_idx = _partition_tensors(h, w, sx, sy, seed, x.device)
    with torch.no_grad():
        scores, norm_a = _scores(metric, a_idx, b_idx)
        row_max, node_idx = scores.max(dim=-1)
        node_max = row_max / norm_a
        # Stable descending sort = TopK's tie-break (lower index first), as in bipartite.match.
        edge_idx = torch.sort(node_max, dim=-1, descending=True, stable=True).indices
        src_idx = edge_idx[:, :r]
        unm_idx = torch.sort(edge_idx[:, r:], dim=-1).values
        dst_idx = node_idx.gather(-1, src_idx)
    return merge_decided(x, a_idx, b_idx, unm_idx, src_idx, dst_idx)


def merge_decided(
    x: torch.Tensor,
    a_idx: torch.Tensor,
    b_idx: torch.Tensor,
    unm_idx: torch.Tensor,
    src_idx: torch.Tensor,
    dst_idx: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply a decision (indices into the source/destination lists): (merged, slot)."""
    batch, num_tokens, channels = x.shape
    num_a, num_b, r = a_idx.numel(), b_idx.numel(), src_idx.shape[1]
    kept = num_a - r
    xa, xb = x[:, a_idx], x[:, b_idx]

    def rows(idx: torch.Tensor) -> torch.Tensor:
        return idx[..., None].expand(-1, -1, channels)

    sums = xb.scatter_add(1, rows(dst_idx), xa.gather(1, rows(src_idx)))
    counts = torch.ones(batch, num_b, 1, dtype=x.dtype, device=x.device)
    counts = counts.scatter_add(1, dst_idx[..., None], torch.ones(batch, r, 1, dtype=x.dtype, device=x.device))
    merged = torch.cat([xa.gather(1, rows(unm_idx)), sums / counts], dim=1)

    arange = torch.arange(max(num_a, num_b), device=x.device)
    slot_a = torch.empty(batch, num_a, dtype=torch.int64, device=x.device)
    slot_a.scatter_(1, unm_idx, arange[:kept].expand(batch, kept))
    slot_a.scatter_(1, src_idx, kept + dst_idx)
    slot = torch.empty(batch, num_tokens, dtype=torch.int64, device=x.device)
    slot[:, a_idx] = slot_a
    slot[:, b_idx] = (kept + arange[:num_b]).expand(batch, num_b)
    return merged, slot


def decision_from_slot(
    slot: torch.Tensor, a_idx: torch.Tensor, b_idx: torch.Tensor, r: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(unm_idx, src_idx, dst_idx) of a (B, N) slot map, ``merge_decided``'s inverse.

    ``src_idx`` comes back ascending (eager orders it by score: only the order of the
    additions changes). ValueError when ``slot`` is no tomesd decision for this r."""
    slot = torch.as_tensor(slot, dtype=torch.int64)
    batch, num_a, num_b = slot.shape[0], a_idx.numel(), b_idx.numel()
    kept = num_a - r
    if slot.dim() != 2 or slot.shape[1] != num_a + num_b or not 0 <= r <= num_a:
        raise ValueError(f"slot map of shape {tuple(slot.shape)} is no tomesd decision for r={r}")
    slot_a = slot[:, a_idx]
    is_kept = slot_a < kept
    if not (is_kept.sum(dim=1) == kept).all():
        raise ValueError(f"slot map keeps the wrong number of sources (want {kept} of {num_a})")
    order = torch.sort((~is_kept).to(torch.int64), dim=1, stable=True).indices
    unm_idx, src_idx = order[:, :kept], order[:, kept:]
    dst_idx = slot_a.gather(1, src_idx) - kept
    if not (
        (slot[:, b_idx] == kept + torch.arange(num_b)).all()
        and (slot_a.gather(1, unm_idx) == torch.arange(kept).expand(batch, kept)).all()
        and ((dst_idx >= 0) & (dst_idx < num_b)).all()
    ):
        raise ValueError("slot map is not a tomesd merge decision in the tome-export layout")
    return unm_idx, src_idx, dst_idx


def tie_gap(metric: torch.Tensor, a_idx, b_idx, unm_idx, src_idx, dst_idx) -> float:
    """How much worse a forced decision is than eager's own, in eager cosine similarity
    (as ``pinning.tie_gap``): 0 when eager could have made it."""
    if src_idx.shape[1] == 0:
        return 0.0
    with torch.no_grad():
        scores, norm_a = _scores(metric.float(), a_idx, b_idx)
        scores = scores / norm_a[..., None]
        node_max = scores.max(dim=-1).values
        chosen = scores.gather(1, src_idx[..., None].expand(-1, -1, scores.shape[-1])).gather(2, dst_idx[..., None])
        gap = (node_max.gather(1, src_idx) - chosen[..., 0]).max().clamp(min=0)
        if unm_idx.shape[1]:
            weakest_merged = node_max.gather(1, src_idx).min(dim=1).values
            strongest_kept = node_max.gather(1, unm_idx).max(dim=1).values
            gap = torch.maximum(gap, (strongest_kept - weakest_merged).clamp(min=0).max())
    return float(gap)


# -- the custom op -------------------------------------------------------------------


@torch.library.custom_op("tome_export::tomesd_merge", mutates_args=())
def tomesd_merge(
    metric: torch.Tensor, x: torch.Tensor, h: int, w: int, sx: int, sy: int, r: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """tomesd merge of ``x`` by similarity of ``metric``; returns (merged, slot)."""
    forced = pinning.active()
    if forced is not None:
        # Decision-pinned verification: merge as the backend decided (see pinning.py).
        a_idx, b_idx = _partition_tensors(h, w, sx, sy, seed, x.device)
        decision = decision_from_slot(forced.next_slot_map(), a_idx, b_idx, r)
        forced.tie_gaps.append(tie_gap(metric, a_idx, b_idx, *decision))
        merged, slot = merge_decided(x, a_idx, b_idx, *decision)
        return merged, slot
    merged, slot = merge_tokens(metric, x, h, w, sx, sy, r, seed)
    return merged.clone(), slot  # outputs must not alias inputs (r = 0 slices)


@tomesd_merge.register_fake
def _tomesd_merge_fake(metric, x, h, w, sx, sy, r, seed):
    batch, num_tokens, channels = x.shape
    return x.new_empty(batch, num_tokens - r, channels), x.new_empty(batch, num_tokens, dtype=torch.int64)


# -- the same merge in dense ops (Core ML: no scatter, no sort) -------------------------


def merge_tokens_dense(
    metric: torch.Tensor, x: torch.Tensor, h: int, w: int, sx: int, sy: int, r: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``merge_tokens`` without sort, scatter or data-dependent gather: comparisons,
    one-hot matrices and MatMuls (same decisions and slots, values up to rounding).
    O(Na²) for the ranks and O(N²·C) for the merge: the ``dense`` lowering's price."""
    from tome_export.merging.bipartite import ranks_descending

    sources, destinations = partition(h, w, sx, sy, seed)
    a_idx = torch.tensor(sources, dtype=torch.int64, device=x.device)
    b_idx = torch.tensor(destinations, dtype=torch.int64, device=x.device)
    inverse = [0] * (h * w)  # plain Python: a constant of the graph
    for position, token in enumerate(sources + destinations):
        inverse[token] = position
    batch, num_a, num_b = x.shape[0], len(sources), len(destinations)
    kept = num_a - r
    scores, norm_a = _scores(metric, a_idx, b_idx)
    row_max, node_idx = scores.max(dim=-1)
    is_src = ranks_descending(row_max / norm_a) < r  # the stable sort's first r
    is_kept = torch.logical_not(is_src)
    kept_pos = torch.cumsum(is_kept.to(torch.int64), dim=-1) - 1  # ascending token order, as eager
    xa, xb = x.index_select(1, a_idx), x.index_select(1, b_idx)
    rows_kept = torch.arange(kept, device=x.device)
    keep_hot = torch.logical_and(is_kept[:, None, :], kept_pos[:, None, :] == rows_kept[None, :, None]).to(x.dtype)
    rows_b = torch.arange(num_b, device=x.device)
    dst_hot = torch.logical_and(is_src[:, None, :], node_idx[:, None, :] == rows_b[None, :, None]).to(x.dtype)
    counts = 1 + dst_hot.sum(dim=-1, keepdim=True)
    merged = torch.cat([keep_hot @ xa, (xb + dst_hot @ xa) / counts], dim=1)
    slot_a = torch.where(is_src, kept + node_idx, kept_pos)
    slot_b = (kept + rows_b).expand(batch, num_b)
    slot = torch.cat([slot_a, slot_b], dim=1).index_select(1, torch.tensor(inverse, dtype=torch.int64, device=x.device))
    return merged, slot
