"""Where a diffusion UNet's tokens sit: shared by the tomesd and ToDo patchers.

A model pre-hook reads the latent size from the model's first 4-D input; a transformer
block's token count then tells its downsampling level and its (h, w) token grid, as
tomesd computes it (``downsample = ceil(sqrt(H·W // N))``).
"""

from __future__ import annotations

import math

import torch
from torch import nn


def is_basic_transformer_block(module: nn.Module) -> bool:
    """A diffusers ``BasicTransformerBlock`` (by class name: diffusers stays an optional import)."""
    return any(cls.__name__ == "BasicTransformerBlock" for cls in type(module).__mro__)


def first_image(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The first 4-D tensor among a forward's arguments: the latent (B, C, H, W)."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.dim() == 4:
            return value
    return None


def block_grid(image_size: tuple[int, int], num_tokens: int, max_downsample: int) -> tuple[int, int] | None:
    """(h, w) of a block's token grid, or None when the block is downsampled more than
    ``max_downsample`` times or its tokens are no grid of the latent."""
    height, width = image_size
    if num_tokens <= 0:
        return None
    downsample = int(math.ceil(math.sqrt((height * width) // num_tokens)))
    if downsample < 1 or downsample > max_downsample:
        return None
    h, w = int(math.ceil(height / downsample)), int(math.ceil(width / downsample))
    return (h, w) if h * w == num_tokens else None
