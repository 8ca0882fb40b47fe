"""ToMe for ViT-style models: patch blocks in place so they merge after attention.

A block is patched when it looks like a timm ``Block`` (``norm1``, ``attn``, ``norm2``,
``mlp``; ``attn.qkv`` and ``attn.num_heads``) and its attention has nothing the patched
forward would drop (rotary embeddings, separate q/v biases, relative position bias,
windows: :data:`UNSUPPORTED_ATTENTION`). That covers timm ViT/DeiT/DeiT-III/CLIP/DINOv2
and the reference ViT in ``samples/``. Blocks share one :class:`TomeState` per model.

The split of A/B tokens (``split=``): ``"official"`` reproduces facebookresearch/ToMe
(class token at A[0] of an alternation over all tokens, distillation token never a
destination); ``"prefix"`` strips every prefix token first — the only choice for register
tokens, and what models without a class token get. Default: official for class-token
models, prefix otherwise.

:func:`check_r0_equivalence` is the gate every export passes first: the patched model at
r=0 must reproduce the unpatched model, or the patcher does not understand the block.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from tome_export.errors import UserError
from tome_export.merging import schedule as schedules
from tome_export.merging.bipartite import SPLITS, max_r, split_for

# Attention attributes the patched forward does not implement: such blocks are not claimed.
UNSUPPORTED_ATTENTION = {
    "q_bias": "separate q/v biases",
    "v_bias": "separate q/v biases",
    "relative_position_bias_table": "relative position bias",
    "rel_pos_h": "relative position embeddings",
    "rope": "rotary position embeddings",
    "window_size": "windowed attention",
}
R0_ATOL = 1e-5  # the r=0 gate: the patched model reproduces the unpatched one


@dataclass
class TomeState:
    """Per-model merge state; reset at the start of every forward."""

    schedule: schedules.Schedule
    depth: int
    protected: int
    prop_attn: bool = True
    split: str = "prefix"
    b_first: bool = False
    r0_gate: float | None = None  # max abs err of the patched model at r=0 vs unpatched
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
            "split": self.split,
            **({"r0_gate_max_abs_err": self.r0_gate} if self.r0_gate is not None else {}),
            "prop_attn": self.prop_attn,
            "r_per_layer": list(self.r_per_layer),
            "tokens_per_layer": list(self.tokens_per_layer),
            "tokens_out": self.tokens_per_layer[-1] - self.r_per_layer[-1] if self.r_per_layer else None,
        }


def looks_like_vit_block(module: nn.Module) -> bool:
    """timm-style block structure: norm1, attn (qkv Linear, num_heads), norm2, mlp."""
    attn = getattr(module, "attn", None)
    return (
        all(hasattr(module, name) for name in ("norm1", "norm2", "mlp"))
        and isinstance(getattr(attn, "qkv", None), nn.Linear)
        and hasattr(attn, "num_heads")
    )


def unsupported_feature(module: nn.Module) -> str | None:
    """What a timm-looking block has that the patcher does not implement, else None."""
    attn = getattr(module, "attn", None)
    for name, feature in UNSUPPORTED_ATTENTION.items():
        if getattr(attn, name, None) is not None or getattr(module, name, None) is not None:
            return feature
    return None


def is_vit_block(module: nn.Module) -> bool:
    """A block the eager patcher claims (structure, and nothing it would drop)."""
    return looks_like_vit_block(module) and unsupported_feature(module) is None


def prefix_tokens(model: nn.Module) -> tuple[bool, bool, int]:
    """(class token?, distillation token?, register tokens) of a timm-style model."""
    class_token = getattr(model, "cls_token", None) is not None
    distill_token = getattr(model, "dist_token", None) is not None
    registers = int(getattr(model, "num_reg_tokens", 0) or 0)
    if hasattr(model, "num_prefix_tokens"):  # anything else counted as prefix is a register
        registers = max(registers, int(model.num_prefix_tokens) - class_token - distill_token)
    return class_token, distill_token, registers


def resolve_split(split: str | None, class_token: bool, distill_token: bool, registers: int) -> tuple[str, int, bool]:
    """(split, protected, b_first); ``None``: official where defined, else prefix."""
    if split is not None and split not in SPLITS:
        raise UserError(f"unknown split {split!r}; choose one of: {', '.join(SPLITS)}")
    chosen = split or ("official" if class_token and not registers else "prefix")
    try:
        protected, b_first = split_for(chosen, class_token, distill_token, registers)
    except ValueError:
        what = f"{registers} register token(s)" if registers else "no class token"
        raise UserError(
            f"split 'official' is implemented for class (+ distillation) token models; this model has {what}: "
            "use split 'prefix' (every prefix token protected, A/B alternate after them)"
        ) from None
    return chosen, protected, b_first


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
        # (B, N, 1) → (B, 1, 1, N) as one Reshape: the exported graph's cost is per node.
        logits = logits + size.log().reshape(batch, 1, 1, num_tokens)
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
    extra = [a for a in (*args, *kwargs.values()) if a is not None and a is not False]
    if extra:  # an attention mask, rotary embeddings…: the patched attention would drop them
        raise UserError(
            f"{type(self).__mro__[1].__name__} is called with extra inputs the ToMe patcher does not implement "
            f"({', '.join(sorted(kwargs)) or 'positional'}); use --r 0 to export unmerged"
        )
    attn_out, metric = attention_with_metric(self.attn, self.norm1(x), state.size, state.prop_attn)
    x = x + self.drop_path1(self.ls1(attn_out))
    num_tokens = x.shape[1]
    r = min(state.requested[self._tome_layer], max_r(num_tokens, state.protected))
    state.tokens_per_layer.append(num_tokens)
    state.r_per_layer.append(r)
    if r > 0:
        if state.size is None:
            state.size = torch.ones_like(x[..., :1])
        x, state.size, slot = torch.ops.tome_export.bipartite_merge(
            metric, x, state.size, r, state.protected, state.b_first
        )
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
    split: str | None = None,
) -> nn.Module:
    """Patch ``model`` in place with ToMe; ``r`` constant or ``schedule``. Returns ``model``.

    ``split``: ``"official"`` (facebookresearch/ToMe's A/B split; the default for class /
    distillation-token models) or ``"prefix"`` (default with register tokens)."""
    sched = schedules.coerce(r, schedule)
    blocks = [m for m in model.modules() if looks_like_vit_block(m)]
    if not blocks:
        raise UserError(
            f"{type(model).__name__} has no attention blocks to patch: method 'tome' needs "
            "timm-style blocks (norm1, attn with qkv, norm2, mlp)"
        )
    for block in blocks:
        feature = unsupported_feature(block)
        if feature is not None:
            raise UserError(
                f"{type(block).__name__}: the ToMe patcher does not implement {feature}; "
                "use --r 0 to export unmerged, or another method"
            )
    chosen, protected, b_first = resolve_split(split, *prefix_tokens(model))
    state = TomeState(sched, depth=len(blocks), protected=protected, prop_attn=prop_attn, split=chosen, b_first=b_first)
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


def remove_tome(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_tome` in place: original block classes, no state, no hook."""
    for module in model.modules():
        if type(module) in _PATCHED_CLASSES.values():
            module.__class__ = type(module).__mro__[1]
        for name in ("_tome_state", "_tome_layer"):
            module.__dict__.pop(name, None)
    hook = model.__dict__.pop("_tome_hook", None)
    if hook is not None:
        hook.remove()
    return model


def _outputs(value) -> list[torch.Tensor]:
    """Every tensor in a model's output (tuples, dicts, dataclasses / ModelOutput)."""
    from tome_export.outputs import flatten_outputs

    return [t for _, t in flatten_outputs(value)]


def check_r0_equivalence(
    model: nn.Module, inputs: list[tuple[torch.Tensor, ...]], atol: float = R0_ATOL, **options
) -> float:
    """The r=0 gate: patch ``model`` with r=0 and compare with its unpatched outputs.

    Returns the max abs error (≤ ``atol``) and leaves ``model`` unpatched. Raises
    UserError naming the block class when the patched model is a different model, or
    when a patched block refuses its call (the patcher does not claim that block)."""
    with torch.no_grad():
        reference = [_outputs(model(*batch)) for batch in inputs]
    options = {k: v for k, v in options.items() if k in ("prop_attn", "split")}
    apply_tome(model, r=0, **options)
    block = next(type(m).__mro__[1].__name__ for m in model.modules() if type(m) in _PATCHED_CLASSES.values())
    try:
        with torch.no_grad():
            patched = [_outputs(model(*batch)) for batch in inputs]
    finally:
        remove_tome(model)
    err = 0.0
    for want, got in zip(reference, patched):
        if len(want) != len(got):
            err = float("inf")
            break
        for a, b in zip(want, got):
            if a.shape != b.shape:
                err = float("inf")
            elif a.numel():
                err = max(err, float((a.double() - b.double()).abs().max()))
    if not err <= atol:
        raise UserError(
            f"{block}: the ToMe patcher at r=0 does not reproduce the unpatched model (max abs err {err:.3g} > "
            f"{atol:g}), so it does not understand this block; use --r 0 to export unmerged, or another method"
        )
    return err
