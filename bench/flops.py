"""Theoretical FLOPs of a ViT from its per-layer token counts (multiply-adds × 2)."""

from __future__ import annotations


def vit_block_flops(tokens_in: int, tokens_out: int, dim: int, mlp_ratio: float = 4.0) -> float:
    """Attention at the block's input token count, MLP after the merge."""
    qkv_proj = 2 * tokens_in * dim * (4 * dim)  # qkv (3C) + output projection (C)
    attention = 2 * 2 * tokens_in * tokens_in * dim  # QK^T and AV
    mlp = 2 * 2 * tokens_out * dim * int(dim * mlp_ratio)
    return qkv_proj + attention + mlp


def vit_flops(tokens_per_layer: list[int], r_per_layer: list[int], dim: int, mlp_ratio: float = 4.0) -> float:
    return sum(
        vit_block_flops(n, n - r, dim, mlp_ratio) for n, r in zip(tokens_per_layer, r_per_layer, strict=True)
    )
