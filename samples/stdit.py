"""A small reference STDiT-style video diffusion transformer (Open-Sora's layout, random weights).

Tokens are ``(B, T·S, C)``: T frames of S spatial tokens each, frame-major. Every block runs
spatial self-attention (within a frame), temporal self-attention (across frames, per spatial
position, with an optional per-frame key mask), cross-attention to text tokens and an MLP,
all modulated by the timestep embedding (adaLN-single, as in PixArt/Open-Sora).

``STDiTBlock`` implements the TDTM block protocol
(``tome_export.merging.video_protocol.TdtmBlock``): each sub-layer is a method returning its
residual update, so ``tome_export.merging.tdtm`` can run the attention sub-layers on fewer
frames and keep the MLP at full length. ``stdit_test`` is tiny for tests; ``stdit_bench`` is several hundred MB.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    # Written out rather than F.scaled_dot_product_attention: the exporter's SDPA
    # decomposition changes strides under the following reshape.
    logits = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    if bias is not None:
        logits = logits + bias
    return logits.softmax(dim=-1) @ v


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, key_bias: torch.Tensor | None = None) -> torch.Tensor:
        batch, tokens, dim = x.shape
        heads = self.num_heads
        qkv = self.qkv(x).reshape(batch, tokens, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
        out = _attention(qkv[0], qkv[1], qkv[2], key_bias)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class CrossAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        heads, head_dim = self.num_heads, dim // self.num_heads
        q = self.q(x).reshape(batch, tokens, heads, head_dim).transpose(1, 2)
        kv = self.kv(context).reshape(batch, context.shape[1], 2, heads, head_dim).permute(2, 0, 3, 1, 4)
        out = _attention(q, kv[0], kv[1], None)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class STDiTBlock(nn.Module):
    """Spatial attention → temporal attention → cross-attention → MLP, each residual.

    Implements ``tome_export.merging.video_protocol.TdtmBlock`` (structurally; no import).
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm_s = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn_s = SelfAttention(dim, num_heads)
        self.norm_t = nn.LayerNorm(dim, eps=1e-6)
        self.attn_t = SelfAttention(dim, num_heads)
        self.norm_c = nn.LayerNorm(dim, eps=1e-6)
        self.cross_attn = CrossAttention(dim, num_heads)
        self.norm_m = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.scale_shift_table = nn.Parameter(torch.randn(6, dim) / dim**0.5)

    def modulation(self, t_mod: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """shift/scale/gate for attention and MLP from the (B, 6·C) timestep embedding."""
        return (self.scale_shift_table[None] + t_mod.reshape(t_mod.shape[0], 6, -1)).unbind(1)

    def spatial(self, x: torch.Tensor, mods, num_frames: int) -> torch.Tensor:
        shift, scale, gate = mods[0], mods[1], mods[2]
        batch, tokens, dim = x.shape
        h = _modulate(self.norm_s(x), shift, scale).reshape(batch * num_frames, tokens // num_frames, dim)
        return gate[:, None] * self.attn_s(h).reshape(batch, tokens, dim)

    def temporal(self, x: torch.Tensor, num_frames: int, frame_mask: torch.Tensor | None) -> torch.Tensor:
        batch, tokens, dim = x.shape
        spatial = tokens // num_frames
        h = self.norm_t(x).reshape(batch, num_frames, spatial, dim).transpose(1, 2)
        h = h.reshape(batch * spatial, num_frames, dim)
        bias = None
        if frame_mask is not None:  # (B, T), 1 = attend to that frame
            bias = ((1.0 - frame_mask) * -1e9)[:, None, None, :].repeat_interleave(spatial, dim=0)
        out = self.attn_t(h, bias).reshape(batch, spatial, num_frames, dim).transpose(1, 2)
        return out.reshape(batch, tokens, dim)

    def cross(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.cross_attn(self.norm_c(x), context)

    def feedforward(self, x: torch.Tensor, mods) -> torch.Tensor:
        shift, scale, gate = mods[3], mods[4], mods[5]
        return gate[:, None] * self.mlp(_modulate(self.norm_m(x), shift, scale))

    def forward(
        self,
        x: torch.Tensor,
        t_mod: torch.Tensor,
        context: torch.Tensor,
        num_frames: int,
        frame_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        mods = self.modulation(t_mod)
        x = x + self.spatial(x, mods, num_frames)
        x = x + self.temporal(x, num_frames, frame_mask)
        x = x + self.cross(x, context)
        return x + self.feedforward(x, mods)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class STDiT(nn.Module):
    """``forward(x (B, T·S, in_channels), timestep (B,), text (B, L, text_dim)[, frame_mask (B, T)])``."""

    def __init__(
        self,
        in_channels: int = 8,
        dim: int = 64,
        depth: int = 2,
        num_heads: int = 4,
        num_frames: int = 4,
        spatial_tokens: int = 16,
        text_tokens: int = 8,
        text_dim: int = 32,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        self.num_frames, self.spatial_tokens, self.dim = num_frames, spatial_tokens, dim
        self.x_embed = nn.Linear(in_channels, dim)
        self.pos_spatial = nn.Parameter(torch.randn(1, 1, spatial_tokens, dim) * 0.02)
        self.pos_temporal = nn.Parameter(torch.randn(1, num_frames, 1, dim) * 0.02)
        self.t_embed = nn.Sequential(nn.Linear(256, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.y_embed = nn.Sequential(nn.Linear(text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim))
        self.blocks = nn.ModuleList(STDiTBlock(dim, num_heads, mlp_ratio) for _ in range(depth))
        self.norm_out = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.out_shift_scale = nn.Parameter(torch.randn(2, dim) / dim**0.5)
        self.proj_out = nn.Linear(dim, in_channels)
        # Shapes of (x, timestep, text) for one sample; the CLI's --input-shape takes the same.
        self.default_input_shapes = [(1, num_frames * spatial_tokens, in_channels), (1,), (1, text_tokens, text_dim)]

    def forward(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor,
        text: torch.Tensor,
        frame_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        batch, tokens, _ = x.shape
        if tokens != self.num_frames * self.spatial_tokens:
            raise ValueError(
                f"expected {self.num_frames}×{self.spatial_tokens} = {self.num_frames * self.spatial_tokens} "
                f"tokens (frames × spatial), got {tokens}"
            )
        h = self.x_embed(x).reshape(batch, self.num_frames, self.spatial_tokens, self.dim)
        h = (h + self.pos_spatial + self.pos_temporal).reshape(batch, tokens, self.dim)
        t = self.t_embed(timestep_embedding(timestep, 256))
        t_mod = self.t_block(t)
        context = self.y_embed(text)
        for block in self.blocks:
            h = block(h, t_mod, context, self.num_frames, frame_mask)
        shift, scale = (self.out_shift_scale[None] + t[:, None]).unbind(1)
        return self.proj_out(_modulate(self.norm_out(h), shift, scale))


def stdit_test() -> STDiT:
    """Tiny: 2 blocks, C=32, 4 frames × 8 tokens (tests)."""
    torch.manual_seed(0)
    return STDiT(
        in_channels=4, dim=32, depth=2, num_heads=2, num_frames=4, spatial_tokens=8, text_tokens=4, text_dim=16
    )


def stdit_test_odd() -> STDiT:
    """Tiny with an odd frame count (5): the last frame stays unmerged under TDTM."""
    torch.manual_seed(0)
    return STDiT(
        in_channels=4, dim=32, depth=2, num_heads=2, num_frames=5, spatial_tokens=8, text_tokens=4, text_dim=16
    )


def stdit_single_frame() -> STDiT:
    """T = 1: nothing to merge along time (TDTM refuses it)."""
    torch.manual_seed(0)
    return STDiT(
        in_channels=4, dim=32, depth=2, num_heads=2, num_frames=1, spatial_tokens=8, text_tokens=4, text_dim=16
    )


def stdit_bench(depth: int = 4, dim: int = 1152, num_frames: int = 8, spatial_tokens: int = 32) -> STDiT:
    """Open-Sora width (C=1152, 16 heads); ~106 MB of fp32 weights per block."""
    torch.manual_seed(0)
    return STDiT(
        in_channels=8,
        dim=dim,
        depth=depth,
        num_heads=16,
        num_frames=num_frames,
        spatial_tokens=spatial_tokens,
        text_tokens=16,
        text_dim=256,
    )
