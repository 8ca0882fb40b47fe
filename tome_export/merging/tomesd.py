"""tomesd-style token merging for diffusion UNets (our own implementation).

Per diffusers ``BasicTransformerBlock`` at the highest resolutions (``max_downsample``):
the block input is the similarity metric; tokens are split into destinations (one per
``sx``×``sy`` cell of the latent grid) and sources (the rest); the ``r = int(N·ratio)``
sources most similar to a destination are averaged into it before self-attention
(optionally cross-attention and the MLP) and every token takes its slot's value back
afterwards (unmerge = a gather by slot).

Export needs a fixed partition: by default the destination is the top-left token of
each cell. ``use_rand=True`` picks a random token per cell, freshly on every forward
(seeded by ``seed``), as tomesd does — eager only; exporting such a model is refused.

The merge is the custom op ``tome_export::tomesd_merge(metric, x, h, w, sx, sy, r, seed)
-> (merged (B, N - r, C), slot (B, N) int64)``; ``slot`` follows the project convention
(output position of every input token), so verification reports decision agreement.
Output order: unmerged sources ascending by token index, then destinations ascending.
"""

from __future__ import annotations

import functools
import math
import random
from dataclasses import dataclass, field

import torch
from torch import nn

from tome_export.errors import UserError
from tome_export.merging import pinning
from tome_export.merging.bipartite import unmerge

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


# -- patching diffusers BasicTransformerBlocks ---------------------------------------


@dataclass
class TomesdState:
    """Per-model state; ``slots`` holds one (B, N) slot map per merging block and forward."""

    ratio: float
    sx: int
    sy: int
    max_downsample: int
    merge_attn: bool
    merge_crossattn: bool
    merge_mlp: bool
    use_rand: bool
    seed: int
    depth: int
    image_size: tuple[int, int] | None = None
    calls: int = 0
    slots: list[torch.Tensor] = field(default_factory=list)
    r_per_layer: list[int] = field(default_factory=list)
    tokens_per_layer: list[int] = field(default_factory=list)

    def reset(self) -> None:
        self.slots, self.r_per_layer, self.tokens_per_layer = [], [], []

    def info(self) -> dict:
        return {
            "method": "tomesd",
            "ratio": self.ratio,
            "sx": self.sx,
            "sy": self.sy,
            "max_downsample": self.max_downsample,
            "merge_attn": self.merge_attn,
            "merge_crossattn": self.merge_crossattn,
            "merge_mlp": self.merge_mlp,
            "destinations": "random per forward (eager only)" if self.use_rand else "top-left of each cell",
            "transformer_blocks": self.depth,
            "r_per_layer": list(self.r_per_layer),
            "tokens_per_layer": list(self.tokens_per_layer),
        }


@dataclass
class _BlockPlan:
    """What one block does in the current forward: the metric and merge geometry."""

    metric: torch.Tensor
    h: int
    w: int
    r: int
    seed: int
    slot: torch.Tensor | None = None


def _is_basic_transformer_block(module: nn.Module) -> bool:
    # Class name, not isinstance: diffusers stays an optional import (tomesd does the same).
    return any(cls.__name__ == "BasicTransformerBlock" for cls in type(module).__mro__)


def _first_image(args, kwargs) -> torch.Tensor | None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.dim() == 4:
            return value
    return None


def _model_pre_hook(module: nn.Module, args, kwargs):
    state: TomesdState = module._tome_state
    state.reset()
    image = _first_image(args, kwargs)
    if image is None:
        raise UserError("method 'tomesd' needs the model's first 4-D input (B, C, H, W) to know the latent size")
    state.image_size = (int(image.shape[2]), int(image.shape[3]))
    if state.use_rand:
        if torch.compiler.is_compiling():
            raise UserError("tomesd use_rand=True is eager-only; apply with use_rand=False to export")
        state.calls += 1


def _block_pre_hook(block: nn.Module, args, kwargs):
    state: TomesdState = block._tome_state
    hidden = args[0] if args else kwargs["hidden_states"]
    block._tome_plan = None
    if state.image_size is None or hidden.dim() != 3:
        return
    height, width = state.image_size
    num_tokens = int(hidden.shape[1])
    downsample = int(math.ceil(math.sqrt((height * width) // num_tokens)))
    if downsample > state.max_downsample:
        return
    h, w = int(math.ceil(height / downsample)), int(math.ceil(width / downsample))
    if h * w != num_tokens:
        return  # not a latent grid we can map tokens onto
    seed = state.seed + 1_000_003 * state.calls + block._tome_layer if state.use_rand else -1
    num_src = len(partition(h, w, state.sx, state.sy, seed)[0])
    r = tokens_merged(num_tokens, state.ratio, num_src)
    state.tokens_per_layer.append(num_tokens)
    state.r_per_layer.append(r)
    if r > 0:
        block._tome_plan = _BlockPlan(hidden, h, w, r, seed)


def _merge_pre_hook(block: nn.Module, sub: nn.Module, args, kwargs):
    plan: _BlockPlan | None = block._tome_plan
    if plan is None:
        return None
    x = args[0] if args else kwargs.pop("hidden_states")
    if kwargs.get("attention_mask") is not None:
        raise UserError("tomesd cannot merge tokens of an attention with a token mask")
    state: TomesdState = block._tome_state
    args_op = (plan.metric, x, plan.h, plan.w, state.sx, state.sy, plan.r, plan.seed)
    if plan.slot is not None and pinning.active() is not None:
        # Only the block's first merge has a slot output to pin to; later merges repeat it.
        with pinning.forced_decisions([plan.slot]):
            merged, slot = torch.ops.tome_export.tomesd_merge(*args_op)
    else:
        merged, slot = torch.ops.tome_export.tomesd_merge(*args_op)
    if plan.slot is None:  # later merges in the block repeat the same decision
        plan.slot = slot
        state.slots.append(slot)
    sub._tome_slot = slot
    return (merged, *args[1:]), kwargs


def _unmerge_hook(sub: nn.Module, args, kwargs, output):
    slot = getattr(sub, "_tome_slot", None)
    if slot is None:
        return None
    sub._tome_slot = None
    return unmerge(output, slot)


def check_tomesd_options(ratio: float, sx: int, sy: int, max_downsample: int) -> None:
    """UserError unless 1 ≤ sx, sy; 0 ≤ ratio ≤ 1 − 1/(sx·sy); max_downsample ≥ 1."""
    if sx < 1 or sy < 1:
        raise UserError(f"tomesd strides must be ≥ 1, got sx={sx} sy={sy}")
    if not 0.0 <= ratio <= max_ratio(sx, sy):
        raise UserError(
            f"tomesd ratio {ratio} outside [0, {max_ratio(sx, sy):g}] (the maximum is 1 - 1/(sx·sy) for sx={sx} sy={sy})"
        )
    if max_downsample < 1:
        raise UserError(f"tomesd max_downsample must be ≥ 1, got {max_downsample}")


def apply_tomesd(
    model: nn.Module,
    ratio: float = 0.5,
    sx: int = 2,
    sy: int = 2,
    max_downsample: int = 1,
    merge_attn: bool = True,
    merge_crossattn: bool = False,
    merge_mlp: bool = False,
    use_rand: bool = False,
    seed: int = 0,
) -> nn.Module:
    """Patch every diffusers ``BasicTransformerBlock`` of ``model`` in place (tomesd-style)."""
    check_tomesd_options(ratio, sx, sy, max_downsample)
    blocks = [m for m in model.modules() if _is_basic_transformer_block(m)]
    if not blocks:
        raise UserError(
            f"{type(model).__name__} has no diffusers BasicTransformerBlock: method 'tomesd' needs a diffusion UNet"
        )
    if getattr(model, "_tome_hooks", None):
        for handle in model._tome_hooks:
            handle.remove()
    state = TomesdState(
        ratio, sx, sy, max_downsample, merge_attn, merge_crossattn, merge_mlp, use_rand, seed, depth=len(blocks)
    )
    hooks = [model.register_forward_pre_hook(_model_pre_hook, with_kwargs=True)]
    for index, block in enumerate(blocks):
        block._tome_state, block._tome_layer, block._tome_plan = state, index, None
        hooks.append(block.register_forward_pre_hook(_block_pre_hook, with_kwargs=True))
        chosen = {"attn1": merge_attn, "attn2": merge_crossattn, "ff": merge_mlp}
        for name, wanted in chosen.items():
            sub = getattr(block, name, None)
            if not wanted or sub is None:
                continue
            sub._tome_slot = None
            # partial, not an attribute: a Module attribute would register the block as a child
            hooks.append(sub.register_forward_pre_hook(functools.partial(_merge_pre_hook, block), with_kwargs=True))
            hooks.append(sub.register_forward_hook(_unmerge_hook, with_kwargs=True))
    model._tome_hooks = hooks
    model._tome_state = state
    return model
