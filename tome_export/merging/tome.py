"""ToMe for ViT-style models: patch blocks in place so they merge after attention.

A block is patched when it looks like a timm ``Block`` (``norm1``, ``attn``, ``norm2``,
``mlp``; ``attn.qkv`` and ``attn.num_heads``), which covers timm ViT/DeiT and the
reference ViT in ``samples/``. Blocks share one :class:`TomeState` per model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from tome_export.errors import UserError
from tome_export.merging import schedule as schedules
from tome_export.merging.bipartite import max_r


@dataclass
class TomeState:
    """Per-model merge state; reset at the start of every forward."""

    schedule: schedules.Schedule
    depth: int
    protected: int
    prop_attn: bool = True
    requested: list[int] = field(default_factory=list)
    size: torch.Tensor | None = None
    slots: list[torch.Tensor] = field(default_factory=list)
    r_per_layer: list[int] = field(default_factory=list)
    tokens_per_layer: list[int] = field(default_factory=list)

    def reset(self) -> None:
        self.size = None
        self.slots, self.r_per_layer, self.tokens_per_layer = [], [], []

    def info(self) -> dict:
        """What the last forward did: the static plan written to the manifest."""
        return {
            "method": "tome",
            "schedule": self.schedule.describe(),
            "protected_tokens": self.protected,
            "prop_attn": self.prop_attn,
            "r_per_layer": list(self.r_per_layer),
            "tokens_per_layer": list(self.tokens_per_layer),
            "tokens_out": self.tokens_per_layer[-1] - self.r_per_layer[-1] if self.r_per_layer else None,
        }


def is_vit_block(module: nn.Module) -> bool:
    attn = getattr(module, "attn", None)
    return (
        all(hasattr(module, name) for name in ("norm1", "norm2", "mlp"))
        and isinstance(getattr(attn, "qkv", None), nn.Linear)
        and hasattr(attn, "num_heads")
    )


def _protected_tokens(model: nn.Module) -> int:
    if hasattr(model, "num_prefix_tokens"):
        return int(model.num_prefix_tokens)
    return sum(getattr(model, name, None) is not None for name in ("cls_token", "dist_token"))


def attention_with_metric(attn: nn.Module, x: torch.Tensor, size: torch.Tensor | None, prop_attn: bool):
    """timm-style attention that also returns the ToMe metric (keys averaged over heads)."""
    batch, num_tokens, _ = x.shape
    heads = attn.num_heads
    head_dim = getattr(attn, "head_dim", attn.qkv.out_features // (3 * heads))
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    qkv = attn.qkv(x).reshape(batch, num_tokens, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    scale = getattr(attn, "scale", head_dim**-0.5)
    logits = (q * scale) @ k.transpose(-2, -1)
    if prop_attn and size is not None:
        # Proportional attention: a token standing for s patches gets log(s) more logit.
        logits = logits + size.log()[:, None, None, :, 0]
    weights = attn.attn_drop(logits.softmax(dim=-1))
    # Written out rather than F.scaled_dot_product_attention: the exporter's SDPA
    # decomposition changes strides under the following reshape.
    out = (weights @ v).transpose(1, 2).reshape(batch, num_tokens, heads * head_dim)
    out = getattr(attn, "norm", nn.Identity())(out)
    if gate is not None:
        out = out * gate
    out = attn.proj_drop(attn.proj(out))
    return out, k.mean(1)


def _tome_block_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    state: TomeState = self._tome_state
    attn_out, metric = attention_with_metric(self.attn, self.norm1(x), state.size, state.prop_attn)
    x = x + self.drop_path1(self.ls1(attn_out))
    num_tokens = x.shape[1]
    r = min(state.requested[self._tome_layer], max_r(num_tokens, state.protected))
    state.tokens_per_layer.append(num_tokens)
    state.r_per_layer.append(r)
    if r > 0:
        if state.size is None:
            state.size = torch.ones_like(x[..., :1])
        x, state.size, slot = torch.ops.tome_export.bipartite_merge(metric, x, state.size, r, state.protected)
        state.slots.append(slot)
    return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


_PATCHED_CLASSES: dict[type, type] = {}


def _patched_class(cls: type) -> type:
    if cls not in _PATCHED_CLASSES:
        _PATCHED_CLASSES[cls] = type(f"ToMe{cls.__name__}", (cls,), {"forward": _tome_block_forward})
    return _PATCHED_CLASSES[cls]


def _reset_hook(module: nn.Module, args) -> None:
    module._tome_state.reset()


def apply_tome(
    model: nn.Module,
    r: int | None = None,
    schedule: schedules.Schedule | list[int] | tuple[int, float] | None = None,
    prop_attn: bool = True,
) -> nn.Module:
    """Patch ``model`` in place with ToMe; ``r`` constant or ``schedule``. Returns ``model``."""
    sched = schedules.coerce(r, schedule)
    blocks = [m for m in model.modules() if is_vit_block(m)]
    if not blocks:
        raise UserError(
            f"{type(model).__name__} has no attention blocks to patch: method 'tome' needs "
            "timm-style blocks (norm1, attn with qkv, norm2, mlp)"
        )
    state = TomeState(sched, depth=len(blocks), protected=_protected_tokens(model), prop_attn=prop_attn)
    state.requested = sched.requested(len(blocks))
    for index, block in enumerate(blocks):
        for name in ("ls1", "ls2", "drop_path1", "drop_path2"):
            if not hasattr(block, name):
                setattr(block, name, nn.Identity())
        if type(block) not in _PATCHED_CLASSES.values():
            block.__class__ = _patched_class(type(block))
        block._tome_state, block._tome_layer = state, index
    if getattr(model, "_tome_hook", None) is None:
        model._tome_hook = model.register_forward_pre_hook(_reset_hook)
    model._tome_state = state
    return model


def merge_state(model: nn.Module) -> TomeState | None:
    """The model's ToMe state if ``apply`` patched it."""
    return getattr(model, "_tome_state", None)
