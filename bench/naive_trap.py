"""The naive-export trap, measured: a ViT-S/16 with a hand-written scatter_reduce(mean)
merge after every block (r=8), exported by plain ``torch.onnx.export(dynamo=True)`` and by
tome-export, both run on ONNX Runtime CPU against eager PyTorch. Accuracy only, nothing is
timed; sessions come from ``bench/harness.py`` like every bench script's. Prints one JSON object.
"""

from __future__ import annotations

import contextlib
import io
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import emit, ort_runner  # noqa: E402
from samples.reference_vit import vit_small_patch16_224  # noqa: E402
from tome_export.exporter.onnx_export import export_onnx  # noqa: E402


def naive_merge(x: torch.Tensor, r: int) -> torch.Tensor:
    """ToMe-style merge as commonly hand-written (class token kept first)."""
    cls, body = x[:, :1], x[:, 1:]
    metric = body / body.norm(dim=-1, keepdim=True)
    a, b = metric[:, ::2], metric[:, 1::2]
    node_max, node_idx = (a @ b.transpose(-1, -2)).max(dim=-1)
    edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
    unm_idx, src_idx = edge_idx[:, r:], edge_idx[:, :r]
    dst_idx = node_idx[..., None].gather(1, src_idx)
    src, dst = body[:, ::2], body[:, 1::2]
    c = x.shape[-1]
    unm = src.gather(1, unm_idx.expand(-1, -1, c))
    moved = src.gather(1, src_idx.expand(-1, -1, c))
    dst = dst.scatter_reduce(1, dst_idx.expand(-1, -1, c), moved, reduce="mean")
    return torch.cat([cls, unm, dst], dim=1)


class NaiveToMeViT(torch.nn.Module):
    def __init__(self, r: int = 8) -> None:
        super().__init__()
        self.vit, self.r = vit_small_patch16_224(), r

    def forward(self, x):
        v = self.vit
        x = v.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([v.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + v.pos_embed
        for block in v.blocks:
            x = naive_merge(block(x), self.r)
        return v.head(v.norm(x)[:, 0])


def ort_run(proto, x):
    session = ort_runner(proto).session
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def main() -> None:
    model = NaiveToMeViT().eval()
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(x).numpy()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        naive = torch.onnx.export(model, (x,), dynamo=True).model_proto
    ours = export_onnx(model, (x,))
    emit(
        {
            "bench": "naive_trap_vit_s16_r8",
            "plain_dynamo_max_abs_err": float(np.abs(ort_run(naive, x) - want).max()),
            "tome_export_max_abs_err": float(np.abs(ort_run(ours.model, x) - want).max()),
            "rewrites": len(ours.rewrites),
            "output_max_abs": float(np.abs(want).max()),
        }
    )


if __name__ == "__main__":
    main()
