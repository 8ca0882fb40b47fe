"""The trap tome-export exists for: scatter_reduce(mean) exports to a wrong graph."""

from __future__ import annotations

import contextlib
import io
import warnings

import numpy as np
import onnxruntime as ort
import torch

from tome_export.exporter.onnx_export import export_onnx


class HandWrittenMerge(torch.nn.Module):
    """A ToMe-style merge as people write it: argsort, gather, scatter_reduce(mean)."""

    def __init__(self, r: int) -> None:
        super().__init__()
        self.r = r
        self.proj = torch.nn.Linear(16, 16)

    def forward(self, x):
        x = self.proj(x)
        metric = x / x.norm(dim=-1, keepdim=True)
        a, b = metric[:, ::2], metric[:, 1::2]
        node_max, node_idx = (a @ b.transpose(-1, -2)).max(dim=-1)
        edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
        unm_idx, src_idx = edge_idx[:, self.r :], edge_idx[:, : self.r]
        dst_idx = node_idx[..., None].gather(1, src_idx)
        src, dst = x[:, ::2], x[:, 1::2]
        channels = x.shape[-1]
        unm = src.gather(1, unm_idx.expand(-1, -1, channels))
        src = src.gather(1, src_idx.expand(-1, -1, channels))
        dst = dst.scatter_reduce(1, dst_idx.expand(-1, -1, channels), src, reduce="mean")
        return torch.cat([unm, dst], dim=1)


def run(model_bytes: bytes, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def test_plain_dynamo_export_is_silently_wrong_and_ours_is_right():
    torch.manual_seed(0)
    # r large enough that several sources share a destination (duplicates).
    model = HandWrittenMerge(r=24).eval()
    x = torch.randn(2, 64, 16)
    with torch.no_grad():
        want = model(x).numpy()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        naive = torch.onnx.export(model, (x,), dynamo=True)
    naive_err = np.abs(run(naive.model_proto.SerializeToString(), x) - want).max()
    assert naive_err > 1e-2, "the stock exporter is expected to drop all but one write"

    ours = export_onnx(model, (x,))
    ours_err = np.abs(run(ours.model.SerializeToString(), x) - want).max()
    assert ours_err <= 1e-5
    assert ours.rewrites and ours.rewrites[0]["reduce"] == "mean"
