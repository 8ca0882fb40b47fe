"""tomesd-style token merging for diffusion UNets: patching diffusers blocks (our implementation).

Per diffusers ``BasicTransformerBlock`` at the highest resolutions (``max_downsample``):
the block input is the similarity metric; tokens are split into destinations (one per
``sx``×``sy`` cell of the latent grid) and sources (the rest); the ``r = int(N·ratio)``
sources most similar to a destination are averaged into it before self-attention
(optionally cross-attention and the MLP) and every token takes its slot's value back
afterwards (unmerge = a gather by slot). The merge itself — partition, matching, the
``tome_export::tomesd_merge`` custom op — is in ``tomesd_merge.py``, as upstream tomesd
keeps ``merge.py`` apart from ``patch.py``.

Export needs a fixed partition: by default the destination is the top-left token of
each cell. ``use_rand=True`` picks a random token per cell, freshly on every forward
(seeded by ``seed``), as tomesd does — eager only; exporting such a model is refused.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from tome_export.errors import UserError
from tome_export.merging import pinning
from tome_export.merging.bipartite import unmerge
from tome_export.merging.latent_grid import block_grid, first_image, is_basic_transformer_block
from tome_export.merging.tomesd_merge import (  # noqa: F401  (re-exported: the lowering and tests use them)
    decision_from_slot,
    max_ratio,
    merge_decided,
    merge_tokens,
    merge_tokens_dense,
    partition,
    tie_gap,
    tokens_merged,
    tomesd_merge,
)

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


def _model_pre_hook(module: nn.Module, args, kwargs):
    state: TomesdState = module._tome_state
    state.reset()
    image = first_image(args, kwargs)
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
    num_tokens = int(hidden.shape[1])
    grid = block_grid(state.image_size, num_tokens, state.max_downsample)
    if grid is None:
        return  # deeper than max_downsample, or no latent grid we can map tokens onto
    h, w = grid
    seed = state.seed + 1_000_003 * state.calls + block._tome_layer if state.use_rand else -1
    num_src = len(partition(h, w, state.sx, state.sy, seed)[0])
    r = tokens_merged(num_tokens, state.ratio, num_src)
    state.tokens_per_layer.append(num_tokens)
    state.r_per_layer.append(r)
    if r > 0:
        block._tome_plan = _BlockPlan(hidden, h, w, r, seed)


_DENSE: contextvars.ContextVar[bool] = contextvars.ContextVar("tomesd_dense", default=False)


@contextlib.contextmanager
def dense_merges() -> Iterator[None]:
    """Within the block, patched blocks merge with ``merge_tokens_dense`` (plain ATen ops:
    comparisons, one-hot MatMuls) instead of the custom op — for converters without
    scatter (Core ML), which then trace the dense merge like any other model code."""
    token = _DENSE.set(True)
    try:
        yield
    finally:
        _DENSE.reset(token)


def _merge_pre_hook(block: nn.Module, sub: nn.Module, args, kwargs):
    plan: _BlockPlan | None = block._tome_plan
    if plan is None:
        return None
    x = args[0] if args else kwargs.pop("hidden_states")
    if kwargs.get("attention_mask") is not None:
        raise UserError("tomesd cannot merge tokens of an attention with a token mask")
    state: TomesdState = block._tome_state
    args_op = (plan.metric, x, plan.h, plan.w, state.sx, state.sy, plan.r, plan.seed)
    if _DENSE.get():
        merged, slot = merge_tokens_dense(*args_op)  # same metric: a later merge repeats the decision
    elif plan.slot is not None and pinning.active() is not None:
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
    blocks = [m for m in model.modules() if is_basic_transformer_block(m)]
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
