"""A vision transformer no eager patcher knows: its own attribute names and SDPA.

Same computation as ``samples/reference_vit.py`` but with different module names and
``F.scaled_dot_product_attention``, so ToMe reaches it only through graph-level
insertion (``tome_export/exporter/insert.py``). ``from_reference`` copies a reference
ViT's weights, which makes the two directly comparable.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SelfAttention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.to_qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = h.shape
        q, k, v = self.to_qkv(h).reshape(batch, tokens, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        mixed = F.scaled_dot_product_attention(q, k, v)
        return self.out(mixed.transpose(1, 2).reshape(batch, tokens, width))


class Layer(nn.Module):
    def __init__(self, width: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.pre_attention = nn.LayerNorm(width)
        self.attention = SelfAttention(width, heads)
        self.pre_ffn = nn.LayerNorm(width)
        self.ffn = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h + self.attention(self.pre_attention(h))
        return h + self.ffn(self.pre_ffn(h))


class PlainTransformer(nn.Module):
    def __init__(
        self,
        image: int = 64,
        patch: int = 8,
        width: int = 64,
        depth: int = 4,
        heads: int = 4,
        classes: int = 10,
        class_embedding: bool = True,
    ) -> None:
        super().__init__()
        self.image = image
        self.to_patches = nn.Conv2d(3, width, patch, patch)
        self.class_embedding = nn.Parameter(torch.randn(1, 1, width) * 0.02) if class_embedding else None
        tokens = (image // patch) ** 2 + int(class_embedding)
        self.positions = nn.Parameter(torch.randn(1, tokens, width) * 0.02)
        self.layers = nn.ModuleList(Layer(width, heads, 4 * width) for _ in range(depth))
        self.final_norm = nn.LayerNorm(width)
        self.classifier = nn.Linear(width, classes)

    @property
    def default_input_shape(self) -> tuple[int, int, int, int]:
        return (1, 3, self.image, self.image)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        h = self.to_patches(pixels).flatten(2).transpose(1, 2)
        if self.class_embedding is not None:
            h = torch.cat([self.class_embedding.expand(h.shape[0], -1, -1), h], dim=1)
        h = h + self.positions
        for layer in self.layers:
            h = layer(h)
        h = self.final_norm(h)
        return self.classifier(h[:, 0] if self.class_embedding is not None else h.mean(dim=1))


# reference_vit name → PlainTransformer name, for weight copies.
_RENAMES = {
    "patch_embed": "to_patches",
    "cls_token": "class_embedding",
    "pos_embed": "positions",
    "blocks": "layers",
    "norm1": "pre_attention",
    "attn.qkv": "attention.to_qkv",
    "attn.proj": "attention.out",
    "norm2": "pre_ffn",
    "mlp.fc1": "ffn.0",
    "mlp.fc2": "ffn.2",
    "norm.": "final_norm.",
    "head": "classifier",
}


def from_reference(vit: nn.Module) -> PlainTransformer:
    """A PlainTransformer computing what ``vit`` (samples.reference_vit) computes."""
    width = vit.head.in_features
    plain = PlainTransformer(
        image=vit.img_size,
        patch=vit.patch_embed.kernel_size[0],
        width=width,
        depth=len(vit.blocks),
        heads=vit.blocks[0].attn.num_heads,
        classes=vit.head.out_features,
        class_embedding=vit.cls_token is not None,
    )
    state = {}
    for name, value in vit.state_dict().items():
        for old, new in _RENAMES.items():
            if name.startswith(old) or f".{old}" in name:
                name = name.replace(old, new, 1)
        state[name] = value
    plain.load_state_dict(state)
    return plain.eval()


def plain_tiny_test(**kwargs) -> PlainTransformer:
    """The same size as ``reference_vit.vit_tiny_test``: 64×64 input, 4 layers."""
    torch.manual_seed(kwargs.pop("seed", 0))
    return PlainTransformer(**kwargs).eval()


def plain_micro_test(**kwargs) -> PlainTransformer:
    """Smallest useful size for end-to-end tests: 32×32 input, 17 tokens, 2 layers."""
    options = dict(image=32, patch=8, width=32, depth=2, heads=2)
    options.update(kwargs)
    return plain_tiny_test(**options)
