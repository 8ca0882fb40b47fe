"""TDTM (On-device Sora, arXiv 2502.04363): temporal dimension token merging.

Inside each spatial-temporal block, consecutive frames are averaged in pairs (T → ⌈T/2⌉;
with odd T the last frame stays as it is) before spatial attention, temporal attention and
cross-attention; the attention sub-layers' update is repeated back to T frames and added to
the unmerged tokens, and the MLP runs at full T. A per-frame attention mask is halved the
same way (a merged frame is attended to when either of its frames is). Merging is used only
in the first ``merge_steps`` denoising steps. It slices, averages and repeats: shapes are
static and no custom op is needed.

Owns the frame merge/unmerge math, the per-model :class:`TdtmState` (which denoising step,
merged or not) and the patcher. Patched blocks follow
:class:`tome_export.merging.video_protocol.TdtmBlock` (sub-layer methods ``modulation``,
``spatial``, ``temporal``, ``cross``, ``feedforward``, each returning a residual update); a
block that looks like one but does not follow it is refused with one line.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from tome_export.errors import UserError
from tome_export.merging.video_protocol import find_tdtm_blocks


def merged_frames(num_frames: int) -> int:
    return (num_frames + 1) // 2


def merge_frames(x: torch.Tensor, num_frames: int) -> torch.Tensor:
    """(B, T·S, C) → (B, ⌈T/2⌉·S, C): frames 2i and 2i+1 averaged; an odd last frame kept."""
    batch, tokens, dim = x.shape
    frames = x.reshape(batch, num_frames, tokens // num_frames, dim)
    pairs = num_frames // 2
    merged = (frames[:, 0 : 2 * pairs : 2] + frames[:, 1 : 2 * pairs : 2]) * 0.5
    if num_frames % 2:
        merged = torch.cat([merged, frames[:, 2 * pairs :]], dim=1)
    return merged.reshape(batch, -1, dim)


def unmerge_frames(x: torch.Tensor, num_frames: int) -> torch.Tensor:
    """Inverse shape of :func:`merge_frames`: each merged frame repeated for both of its frames."""
    batch, tokens, dim = x.shape
    frames_in = merged_frames(num_frames)
    spatial = tokens // frames_in
    frames = x.reshape(batch, frames_in, spatial, dim)
    pairs = num_frames // 2
    repeated = frames[:, :pairs, None].expand(batch, pairs, 2, spatial, dim).reshape(batch, 2 * pairs, spatial, dim)
    if num_frames % 2:
        repeated = torch.cat([repeated, frames[:, pairs:]], dim=1)
    return repeated.reshape(batch, tokens // frames_in * num_frames, dim)


def merge_frame_mask(mask: torch.Tensor) -> torch.Tensor:
    """(B, T) → (B, ⌈T/2⌉): a merged frame is visible when either frame of its pair is."""
    pairs = mask.shape[1] // 2
    merged = torch.maximum(mask[:, 0 : 2 * pairs : 2], mask[:, 1 : 2 * pairs : 2])
    return torch.cat([merged, mask[:, 2 * pairs :]], dim=1) if mask.shape[1] % 2 else merged


@dataclass
class TdtmState:
    """Which denoising step the model is in, hence whether blocks merge frames.

    ``force`` overrides the step (export writes one graph per variant).
    """

    merge_steps: int
    num_steps: int | None
    num_frames: int | None
    step: int = 0
    force: bool | None = None
    slots: list[torch.Tensor] = field(default_factory=list)  # no merge decisions: nothing data-dependent
    merged_last_forward: bool = False

    @property
    def merging(self) -> bool:
        return self.force if self.force is not None else self.step < self.merge_steps

    def reset(self) -> None:
        self.slots = []

    def info(self) -> dict:
        return {
            "method": "tdtm",
            "merge_steps": self.merge_steps,
            "num_steps": self.num_steps,
            "frames": self.num_frames,
            "frames_merged": merged_frames(self.num_frames) if self.num_frames else None,
            "merged": ["spatial_attention", "temporal_attention", "cross_attention"],
            "full_length": ["mlp"],
        }


def _tdtm_block_forward(
    self,
    x: torch.Tensor,
    t_mod: torch.Tensor,
    context: torch.Tensor,
    num_frames: int,
    frame_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    state: TdtmState = self._tdtm_state
    mods = self.modulation(t_mod)
    if not state.merging:
        state.merged_last_forward = False
        x = x + self.spatial(x, mods, num_frames)
        x = x + self.temporal(x, num_frames, frame_mask)
        x = x + self.cross(x, context)
        return x + self.feedforward(x, mods)
    if num_frames < 2:
        raise UserError("TDTM needs at least 2 frames to merge; this input has T = 1 (use --method none)")
    state.merged_last_forward = True
    frames = merged_frames(num_frames)
    mask = merge_frame_mask(frame_mask) if frame_mask is not None else None
    merged = merge_frames(x, num_frames)
    h = merged + self.spatial(merged, mods, frames)
    h = h + self.temporal(h, frames, mask)
    h = h + self.cross(h, context)
    # The attention sub-layers' update, repeated to full T, keeps per-frame detail in x.
    x = x + unmerge_frames(h - merged, num_frames)
    return x + self.feedforward(x, mods)


_PATCHED: dict[type, type] = {}


def _patched_class(cls: type) -> type:
    if cls not in _PATCHED:
        _PATCHED[cls] = type(f"Tdtm{cls.__name__}", (cls,), {"forward": _tdtm_block_forward})
    return _PATCHED[cls]


def apply_tdtm(model: nn.Module, merge_steps: int, num_steps: int | None = None) -> nn.Module:
    """Patch ``model`` in place with TDTM used in the first ``merge_steps`` steps."""
    if isinstance(merge_steps, bool) or not isinstance(merge_steps, int) or merge_steps < 0:
        raise UserError(f"merge_steps must be an integer ≥ 0, got {merge_steps!r}")
    if num_steps is not None and (num_steps < 1 or merge_steps > num_steps):
        raise UserError(
            f"merge_steps ({merge_steps}) must be ≤ the number of denoising steps ({num_steps}); lower --merge-steps"
        )
    num_frames = getattr(model, "num_frames", None)
    if num_frames is not None and int(num_frames) < 2:
        raise UserError(f"TDTM merges frames in pairs, but {type(model).__name__} has T = {num_frames} frame(s)")
    blocks = find_tdtm_blocks(model)
    state = TdtmState(merge_steps, num_steps, int(num_frames) if num_frames is not None else None)
    for block in blocks:
        if type(block) not in _PATCHED.values():
            block.__class__ = _patched_class(type(block))
        block._tdtm_state = state
    model._tome_state = state  # merge_state() finds it; export and verification read .slots / .info()
    model._tdtm_state = state
    return model


def tdtm_state(model: nn.Module) -> TdtmState | None:
    return getattr(model, "_tdtm_state", None)


@contextmanager
def denoising_step(model: nn.Module, step: int) -> Iterator[None]:
    """``with denoising_step(model, i): model(...)`` — merges iff ``i < merge_steps``."""
    state = tdtm_state(model)
    if state is None:
        raise UserError("denoising_step() needs a model patched with method 'tdtm'")
    previous, state.step = state.step, step
    try:
        yield
    finally:
        state.step = previous


@contextmanager
def forced(model: nn.Module, merging: bool) -> Iterator[None]:
    """Run (or export) the merged or the full variant regardless of the step."""
    state = tdtm_state(model)
    previous, state.force = state.force, merging
    try:
        yield
    finally:
        state.force = previous


def block_flops(num_frames: int, spatial: int, dim: int, text_tokens: int, mlp_ratio: float = 4.0) -> dict:
    """Multiply-accumulates of one STDiT block with and without TDTM (the theoretical ratio)."""

    def attention_part(frames: int) -> float:
        tokens = frames * spatial
        spatial_attn = tokens * 4 * dim * dim + 2 * frames * spatial * spatial * dim
        temporal_attn = tokens * 4 * dim * dim + 2 * spatial * frames * frames * dim
        cross_attn = tokens * 2 * dim * dim + text_tokens * 2 * dim * dim + 2 * tokens * text_tokens * dim
        return spatial_attn + temporal_attn + cross_attn

    mlp = num_frames * spatial * 2 * dim * int(dim * mlp_ratio)
    full = attention_part(num_frames) + mlp
    merged = attention_part(merged_frames(num_frames)) + mlp
    return {"full_macs": full, "merged_macs": merged, "ratio": full / merged}
