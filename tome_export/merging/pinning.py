"""Pin the eager merge op to decisions made elsewhere (an exported graph's slot maps).

Merge decisions are discrete: a near-tie can flip under TF32/fp16 and then the outputs
differ a lot although the lowering is right. Re-running eager with the backend's
decisions tells the two apart: if the error vanishes when pinned, a decision flipped; if
it stays, the lowering computes something else.

``with forced_decisions(slot_maps): model(x)`` makes the ``bipartite_merge`` (and
``tomesd_merge``) calls of that forward use ``slot_maps[0]``, ``slot_maps[1]``, … in call
order. Each pinned call also records how far the forced decision is from eager's own in eager's similarity
scores (``tie_gaps``): ~0 for a flipped near-tie, large for a wrong match.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from tome_export.merging.bipartite import MergeDecision, ab_counts, split_ab


def decision_from_slots(slot: torch.Tensor, r: int, protected: int, b_first: bool = False) -> MergeDecision:
    """Rebuild a :class:`MergeDecision` from a (B, N) slot map (``bipartite.slots``' inverse).

    ``src_idx`` comes back in ascending A order (eager orders it by score); that only
    changes the order of the additions in the merge. Raises ValueError when ``slot`` is
    not a merge decision for this ``r`` and ``protected``."""
    slot = torch.as_tensor(slot, dtype=torch.int64)
    batch, num_tokens = slot.shape
    p = protected
    num_a, num_b = ab_counts(num_tokens - p, b_first)
    kept = num_a - r
    if not 0 <= r <= min(num_a, num_b):
        raise ValueError(f"r={r} impossible for {num_tokens} tokens with {p} protected")
    slot_a, slot_b = split_ab(slot[:, p:, None], b_first)
    slot_a, slot_b = slot_a[..., 0], slot_b[..., 0]
    is_kept = slot_a < p + kept
    if not (is_kept.sum(dim=1) == kept).all():
        raise ValueError(f"slot map keeps the wrong number of A tokens (want {kept} of {num_a})")
    # Stable sort on "merged?" puts kept A positions first, both groups ascending.
    order = torch.sort((~is_kept).to(torch.int64), dim=1, stable=True).indices
    unm_idx, src_idx = order[:, :kept], order[:, kept:]
    dst_idx = slot_a.gather(1, src_idx) - (p + kept)
    expected_kept_slots = p + torch.arange(kept).expand(batch, kept)
    protected_ok = (slot[:, :p] == torch.arange(p)).all()
    b_ok = (slot_b == p + kept + torch.arange(num_b)).all()
    if not (
        protected_ok
        and b_ok
        and (slot_a.gather(1, unm_idx) == expected_kept_slots).all()
        and ((dst_idx >= 0) & (dst_idx < num_b)).all()
    ):
        raise ValueError("slot map is not a merge decision in the tome-export layout")
    return MergeDecision(unm_idx, src_idx, dst_idx, protected, num_tokens, b_first)


def tie_gap(metric: torch.Tensor, decision: MergeDecision) -> float:
    """How much worse ``decision`` is than eager's own choice, in eager cosine similarity.

    The larger of: the best score an A token gives up by merging into the forced
    destination, and how far the weakest forced edge falls below the strongest edge the
    forced decision left unmerged. 0 when the decision is one eager could have made."""
    r = decision.src_idx.shape[1]
    if r == 0:
        return 0.0
    with torch.no_grad():
        body = metric[:, decision.protected :].float()
        body = body / body.norm(dim=-1, keepdim=True)
        a, b = split_ab(body, decision.b_first)
        scores = a @ b.transpose(-1, -2)
        node_max = scores.max(dim=-1).values
        chosen = scores.gather(1, decision.src_idx[..., None].expand(-1, -1, scores.shape[-1]))
        chosen = chosen.gather(2, decision.dst_idx[..., None])[..., 0]
        destination_gap = (node_max.gather(1, decision.src_idx) - chosen).max()
        selection_gap = torch.zeros(())
        if decision.unm_idx.shape[1]:
            weakest_merged = node_max.gather(1, decision.src_idx).min(dim=1).values
            strongest_kept = node_max.gather(1, decision.unm_idx).max(dim=1).values
            selection_gap = (strongest_kept - weakest_merged).clamp(min=0).max()
    return float(max(destination_gap.clamp(min=0), selection_gap))


@dataclass
class ForcedDecisions:
    """Slot maps to use, in call order, and what the pinned calls observed."""

    slot_maps: list[torch.Tensor]
    used: int = 0
    tie_gaps: list[float] = field(default_factory=list)

    def next_slot_map(self) -> torch.Tensor:
        """The next call's slot map (ops with another layout decode it themselves)."""
        if self.used >= len(self.slot_maps):
            raise ValueError(f"more merges than pinned decisions ({len(self.slot_maps)})")
        self.used += 1
        return self.slot_maps[self.used - 1]

    def next(self, metric: torch.Tensor, r: int, protected: int, b_first: bool = False) -> MergeDecision:
        slot = self.next_slot_map()
        decision = decision_from_slots(slot, r, protected, b_first)
        self.tie_gaps.append(tie_gap(metric, decision))
        return decision


_FORCED: contextvars.ContextVar[ForcedDecisions | None] = contextvars.ContextVar("tome_forced", default=None)


def active() -> ForcedDecisions | None:
    """The decisions the eager op must use now, if a ``forced_decisions`` block is open."""
    return _FORCED.get()


@contextlib.contextmanager
def forced_decisions(slot_maps: Sequence[torch.Tensor | np.ndarray]) -> Iterator[ForcedDecisions]:
    """Within the block, eager ``bipartite_merge`` calls take their decisions from
    ``slot_maps`` (one (B, N) int64 map per call, in call order)."""
    forced = ForcedDecisions([torch.as_tensor(np.asarray(s), dtype=torch.int64) for s in slot_maps])
    token = _FORCED.set(forced)
    try:
        yield forced
    finally:
        _FORCED.reset(token)
