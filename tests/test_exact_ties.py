"""Exact ties: eager's unstable sorts vs the exported graph's stable TopK.

An unstable sort may put equal values in any order (PyTorch's CPU kernel does differ from
the stable order on long rows of ties), the exported graph puts them lower index first.
Verification runs eager with sorts made stable (``tracer.stable_sorts``) — one of the
orders eager may legally produce — so the verdict no longer depends on the kernel's luck.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from tome_export.exporter.onnx_export import export_onnx
from tome_export.exporter.tracer import stable_sorts
from tome_export.runtimes.onnxruntime import OnnxRuntimeRunner
from tome_export.verify import verify


class PickByRank(nn.Module):
    """Foreign merge-like code: rank scores with an unstable argsort, keep the best k rows."""

    tome_input_specs = [{"dtype": "int64", "low": 0, "high": 3}, None]  # long rows of exact ties

    def forward(self, scores, values):
        order = scores.argsort(dim=-1, descending=True)[:, :700]
        return values.gather(1, order)


def _inputs(seed: int):
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 3, (2, 3000), generator=generator)
    return scores, torch.randn(2, 3000, generator=generator)


def test_stable_sorts_give_the_stable_order_and_count_tie_changes():
    scores, _ = _inputs(0)
    with stable_sorts() as counts:
        ranked = scores.argsort(dim=-1, descending=True)
        top = torch.topk(scores, 5, largest=False)
        already = scores.sort(stable=True)
    assert torch.equal(ranked, torch.sort(scores, dim=-1, descending=True, stable=True).indices)
    assert torch.equal(top.indices, torch.sort(scores, dim=-1, stable=True).indices[:, :5])
    assert torch.equal(already.indices, torch.sort(scores, stable=True).indices)
    assert counts.made_stable == 2 and counts.tie_order_changed >= 1


def test_verdict_under_exact_ties_is_deterministic():
    model = PickByRank().eval()
    exported = export_onnx(model, _inputs(0))
    runner = OnnxRuntimeRunner(exported.model)
    scores, values = _inputs(1)
    got = runner.run({"scores": scores.numpy(), "values": values.numpy()})["output"]
    unstable = model(scores, values).numpy()
    assert np.abs(got - unstable).max() > 0.1  # the kernel's own tie order is another model
    shapes = [(2, 3000), (2, 3000)]
    results = [
        verify(model, runner.run, exported.input_names, exported.output_names, [], shapes, seeds=[1, 2])
        for _ in range(2)
    ]
    for result in results:
        assert result.passed and result.max_abs_err == 0.0
        assert result.exact_ties["tie_order_differed"] >= 1
        assert "exact ties" in result.summary()
