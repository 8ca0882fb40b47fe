"""The default ToMe split is facebookresearch/ToMe's, checked against an independent
re-implementation of the published algorithm (Bolya et al., "Token Merging: Your ViT but
Faster", ICLR 2023, Algorithm/§3 and the reference code's semantics):

- A/B alternate over *all* tokens (A = even positions, B = odd);
- the class token (A[0]) gets a -inf score row, a distillation token (B[0]) a -inf column;
- every A token's best B edge; the r best edges merge (sum of size-weighted values and
  sizes into the B token, then divide); kept A tokens sorted back into position order;
- with a distillation token the output is [cls, dist, other kept A, other B];
- proportional attention adds log(size) to the attention logits; the metric is the
  keys averaged over heads.

The reference below is written from that description, not from tome-export's code, and
runs the timm model's own modules (qkv, proj, norms, mlp) so only the merging differs.
"""

from __future__ import annotations

import math

import pytest
import torch

import tome_export
from tome_export.errors import UserError
from tome_export.merging import merge_state
from tome_export.merging.tome import remove_tome

timm = pytest.importorskip("timm")

SMALL = dict(img_size=64, patch_size=8, embed_dim=48, depth=4, num_heads=3)


def reference_merge(metric, x, size, r, class_token, distill_token):
    """One published bipartite soft matching + weighted average step."""
    protected = int(class_token) + int(distill_token)
    r = min(r, (x.shape[1] - protected) // 2)
    if r <= 0:
        return x, size
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[:, ::2], metric[:, 1::2]
    scores = a @ b.transpose(-1, -2)
    if class_token:
        scores[:, 0, :] = -math.inf
    if distill_token:
        scores[:, :, 0] = -math.inf
    best, best_b = scores.max(dim=-1)
    order = best.argsort(dim=-1, descending=True)
    merged_a, kept_a = order[:, :r], order[:, r:].sort(dim=-1).values
    destinations = best_b.gather(1, merged_a)

    def merge(t):
        ta, tb = t[:, ::2], t[:, 1::2]
        channels = t.shape[-1]
        kept = ta.gather(1, kept_a[..., None].expand(-1, -1, channels))
        moved = ta.gather(1, merged_a[..., None].expand(-1, -1, channels))
        tb = tb.scatter_reduce(1, destinations[..., None].expand(-1, -1, channels), moved, reduce="sum")
        if distill_token:
            return torch.cat([kept[:, :1], tb[:, :1], kept[:, 1:], tb[:, 1:]], dim=1)
        return torch.cat([kept, tb], dim=1)

    summed = merge(x * size)
    new_size = merge(size)
    return summed / new_size, new_size


def reference_forward(model, images, r, class_token, distill_token):
    """The timm model's forward with the published ToMe in every block."""
    x = model.patch_embed(images)
    x = model._pos_embed(x)
    x = model.norm_pre(x)
    size = None
    for block in model.blocks:
        attn = block.attn
        h = block.norm1(x)
        batch, tokens, _ = h.shape
        qkv = attn.qkv(h).reshape(batch, tokens, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        logits = (q @ k.transpose(-2, -1)) * attn.scale
        if size is not None:
            logits = logits + size.log()[:, None, None, :, 0]
        out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(batch, tokens, -1)
        x = x + block.ls1(attn.proj(out))
        if size is None:
            size = torch.ones_like(x[..., :1])
        x, size = reference_merge(k.mean(1), x, size, r, class_token, distill_token)
        x = x + block.ls2(block.mlp(block.norm2(x)))
    x = model.norm(x)
    return model.forward_head(x)


@pytest.mark.parametrize(
    "name, distilled",
    [("vit_tiny_patch16_224", False), ("deit_tiny_distilled_patch16_224", True), ("deit3_small_patch16_224", False)],
)
@pytest.mark.parametrize("r", [3, 7])
def test_default_split_is_the_published_tome(name, distilled, r):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **SMALL).eval()
    for p in model.parameters():  # non-trivial layer scale / biases, not their init values
        p.data += 0.02 * torch.randn_like(p)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = reference_forward(model, images, r, class_token=True, distill_token=distilled)
        tome_export.apply(model, "tome", r=r)
        got = model(images)
    state = merge_state(model)
    assert state.split == "official"
    err = (got - want).abs().max().item()
    assert err <= 1e-5, err
    # The prefix split is a different model for a class-token-only ViT (and the same for DeiT-distilled).
    remove_tome(model)
    with torch.no_grad():
        tome_export.apply(model, "tome", r=r, split="prefix")
        prefix = model(images)
    if distilled:
        assert (prefix - want).abs().max().item() <= 1e-5
    else:
        assert (prefix - want).abs().max().item() > 1e-4  # 10× the tolerance above


def test_register_tokens_use_the_prefix_split():
    model = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, **{**SMALL, "patch_size": 8}).eval()
    tome_export.apply(model, "tome", r=4)
    state = merge_state(model)
    assert (state.split, state.protected, state.b_first) == ("prefix", 5, False)
    remove_tome(model)
    with pytest.raises(UserError, match="register"):
        tome_export.apply(model, "tome", r=4, split="official")
