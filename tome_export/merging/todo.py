"""ToDo — token downsampling (Smith et al. 2024, arXiv 2402.13573) for diffusion UNets.

In every diffusers ``BasicTransformerBlock`` at the highest resolutions
(``max_downsample``, as tomesd), the self-attention's keys and values are computed from
the block's tokens downsampled on the 2-D latent grid by ``downsample`` per side, while
the queries keep full resolution: attention costs N·N/f² instead of N², the output keeps
all N tokens, nothing is unmerged. The downsampling is nearest-neighbour, as the paper
and its public implementations use (``F.interpolate(mode="nearest-exact")`` from
(h, w) to (int(h/f), int(w/f))), written as static index arithmetic: a strided slice
when ``f`` is an integer dividing the grid, else a gather with constant indices. No
scatter, no data-dependent indices: every target and lowering exports it natively.

``downsample=1`` patches nothing that changes a value: the model is the unpatched one.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from tome_export.errors import UserError
from tome_export.merging.latent_grid import block_grid, first_image, is_basic_transformer_block

MAX_FACTOR = 8.0


@functools.lru_cache(maxsize=64)
def nearest_indices(size: int, new_size: int) -> tuple[int, ...]:
    """Source index of each output position of a nearest-exact resize ``size`` → ``new_size``."""
    scale = size / new_size
    return tuple(min(int(math.floor((i + 0.5) * scale)), size - 1) for i in range(new_size))


def downsampled_size(h: int, w: int, factor: float) -> tuple[int, int]:
    """The key/value grid: ``(int(h / f), int(w / f))``, at least 1×1 (the reference's rule)."""
    return max(1, int(h / factor)), max(1, int(w / factor))


def downsample_tokens(x: torch.Tensor, h: int, w: int, new_h: int, new_w: int) -> torch.Tensor:
    """Nearest-exact downsampling of (B, h·w, C) grid tokens to (B, new_h·new_w, C)."""
    batch, _, channels = x.shape
    rows, cols = nearest_indices(h, new_h), nearest_indices(w, new_w)
    step_h, step_w = h // new_h, w // new_w
    grid = x.reshape(batch, h, w, channels)
    if h == new_h * step_h and w == new_w * step_w:
        # Integer factor: nearest-exact picks index i·f + f//2 — a strided slice.
        picked = grid[:, rows[0] :: step_h, cols[0] :: step_w]
    else:
        picked = grid.index_select(1, torch.tensor(rows, device=x.device))
        picked = picked.index_select(2, torch.tensor(cols, device=x.device))
    return picked.reshape(batch, new_h * new_w, channels)


@dataclass
class TodoState:
    """Per-model state, refreshed every forward; fields feed the manifest's ``merge``."""

    downsample: float
    max_downsample: int
    depth: int
    image_size: tuple[int, int] | None = None
    slots: list[torch.Tensor] = field(default_factory=list)  # none: ToDo makes no data-dependent decision
    r_per_layer: list[int] = field(default_factory=list)  # key/value tokens dropped per self-attention
    tokens_per_layer: list[int] = field(default_factory=list)  # query tokens (all kept)
    kv_tokens_per_layer: list[int] = field(default_factory=list)

    def reset(self) -> None:
        self.r_per_layer, self.tokens_per_layer, self.kv_tokens_per_layer = [], [], []

    def info(self) -> dict:
        return {
            "method": "todo",
            "downsample": self.downsample,
            "max_downsample": self.max_downsample,
            "mode": "nearest-exact",
            "applies_to": "keys and values of self-attention (attn1); queries at full resolution",
            "transformer_blocks": self.depth,
            "r_per_layer": list(self.r_per_layer),
            "tokens_per_layer": list(self.tokens_per_layer),
            "kv_tokens_per_layer": list(self.kv_tokens_per_layer),
        }


def _model_pre_hook(module: nn.Module, args, kwargs):
    state: TodoState = module._tome_state
    state.reset()
    image = first_image(args, kwargs)
    if image is None:
        raise UserError("method 'todo' needs the model's first 4-D input (B, C, H, W) to know the latent size")
    state.image_size = (int(image.shape[2]), int(image.shape[3]))


def _attn1_pre_hook(state: TodoState, attn: nn.Module, args, kwargs):
    hidden = args[0] if args else kwargs.get("hidden_states")
    if state.image_size is None or hidden is None or hidden.dim() != 3:
        return None
    if kwargs.get("encoder_hidden_states") is not None:
        return None  # a block with only_cross_attention: attn1 attends to text, not tokens
    num_tokens = int(hidden.shape[1])
    grid = block_grid(state.image_size, num_tokens, state.max_downsample)
    if grid is None:
        return None
    h, w = grid
    new_h, new_w = downsampled_size(h, w, state.downsample)
    state.tokens_per_layer.append(num_tokens)
    state.kv_tokens_per_layer.append(new_h * new_w)
    state.r_per_layer.append(num_tokens - new_h * new_w)
    if (new_h, new_w) == (h, w):
        return None  # factor 1 (or below one cell): the unpatched attention
    if kwargs.get("attention_mask") is not None:
        raise UserError("todo cannot downsample the keys of an attention with a token mask")
    kwargs["encoder_hidden_states"] = downsample_tokens(hidden, h, w, new_h, new_w)
    return args, kwargs


def check_todo_options(downsample: float, max_downsample: int) -> None:
    """UserError unless 1 ≤ downsample ≤ MAX_FACTOR and max_downsample ≥ 1."""
    if not (isinstance(downsample, (int, float)) and 1.0 <= downsample <= MAX_FACTOR):
        raise UserError(
            f"todo downsample factor {downsample} outside [1, {MAX_FACTOR:g}] "
            "(keys/values are downsampled by this factor per side; 1 = unchanged, the paper uses 2-3)"
        )
    if max_downsample < 1:
        raise UserError(f"todo max_downsample must be ≥ 1, got {max_downsample}")


def apply_todo(model: nn.Module, downsample: float = 2.0, max_downsample: int = 1) -> nn.Module:
    """Patch every diffusers ``BasicTransformerBlock``'s self-attention of ``model`` in place."""
    check_todo_options(downsample, max_downsample)
    blocks = [m for m in model.modules() if is_basic_transformer_block(m)]
    if not blocks:
        raise UserError(
            f"{type(model).__name__} has no diffusers BasicTransformerBlock: method 'todo' needs a diffusion UNet"
        )
    for handle in getattr(model, "_tome_hooks", None) or []:
        handle.remove()
    state = TodoState(float(downsample), max_downsample, depth=len(blocks))
    hooks = [model.register_forward_pre_hook(_model_pre_hook, with_kwargs=True)]
    for block in blocks:
        attn = getattr(block, "attn1", None)
        if attn is not None:
            # partial, not an attribute: a Module attribute would register the state as a child
            hooks.append(attn.register_forward_pre_hook(functools.partial(_attn1_pre_hook, state), with_kwargs=True))
    model._tome_hooks = hooks
    model._tome_state = state
    return model
