"""Exported ONNX (scatter lowering) vs the eager patched model, on ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tome_export
from samples.reference_vit import vit_tiny_test
from tome_export.exporter.onnx_export import export_onnx
from tome_export.merging import bipartite


def run_onnx(model_proto, feeds):
    session = ort.InferenceSession(model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


class MergeOnly(torch.nn.Module):
    def __init__(self, r: int, protected: int) -> None:
        super().__init__()
        self.r, self.protected = r, protected

    def forward(self, metric, x, size):
        return torch.ops.tome_export.bipartite_merge(metric, x, size, self.r, self.protected)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    batch=st.integers(1, 3),
    protected=st.integers(0, 2),
    body=st.integers(2, 30),
    channels=st.integers(1, 16),
    r_fraction=st.floats(0.0, 1.0),
    seed=st.integers(0, 1000),
)
def test_merge_op_lowering_matches_eager(batch, protected, body, channels, r_fraction, seed):
    tokens = protected + body
    r = round(r_fraction * bipartite.max_r(tokens, protected))
    g = torch.Generator().manual_seed(seed)
    metric = torch.randn(batch, tokens, 6, generator=g)
    x = torch.randn(batch, tokens, channels, generator=g)
    size = torch.randint(1, 5, (batch, tokens, 1), generator=g).float()
    module = MergeOnly(r, protected)
    exported = export_onnx(module, (metric, x, size))
    got = run_onnx(exported.model, {"metric": metric.numpy(), "x": x.numpy(), "size": size.numpy()})
    want = bipartite.merge_tokens(metric, x, size, r, protected)
    for g_out, w_out in zip(got, want):
        assert g_out.shape == tuple(w_out.shape)
        np.testing.assert_allclose(g_out, w_out.numpy(), atol=1e-5, rtol=0)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    batch=st.integers(1, 2),
    img=st.sampled_from([32, 48, 64]),
    class_token=st.booleans(),
    distilled=st.booleans(),
    schedule=st.one_of(
        st.integers(1, 20).map(lambda r: {"r": r}),
        st.lists(st.integers(0, 12), min_size=1, max_size=3).map(lambda s: {"schedule": s}),
        st.tuples(st.integers(1, 10), st.sampled_from([-0.5, 0.0, 0.5])).map(lambda s: {"schedule": s}),
    ),
)
def test_patched_vit_exports_exactly(batch, img, class_token, distilled, schedule):
    model = vit_tiny_test(img_size=img, depth=3, class_token=class_token, distilled=distilled)
    tome_export.apply(model, **schedule)
    x = torch.randn(batch, 3, img, img)
    exported = export_onnx(model, (x,))
    with torch.no_grad():
        want = model(x)
        want_slots = [s.numpy() for s in model._tome_state.slots]
    got = run_onnx(exported.with_decisions, {"x": x.numpy()})
    np.testing.assert_allclose(got[0], want.numpy(), atol=1e-5, rtol=0)
    assert len(got) == 1 + len(want_slots)
    for g_slot, w_slot in zip(got[1:], want_slots):
        np.testing.assert_array_equal(g_slot, w_slot)
    # the shipped graph has only the model's own output
    assert [o.name for o in exported.model.graph.output] == ["output"]


def test_token_counts_are_static_and_planned():
    model = tome_export.apply(vit_tiny_test(distilled=True), schedule=[30, 5, 0, 40])
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    info = model._tome_state.info()
    # 64 patches + 2 prefix tokens; r capped at (N - 2) // 2 per layer
    assert info["tokens_per_layer"] == [66, 36, 31, 31]
    assert info["r_per_layer"] == [30, 5, 0, 14]
    assert info["tokens_out"] == 17


def test_timm_vit_and_deit_distilled_export():
    timm = pytest.importorskip("timm")
    from timm.models.deit import VisionTransformerDistilled
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    for cls in (VisionTransformer, VisionTransformerDistilled):
        model = cls(img_size=48, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=7).eval()
        tome_export.apply(model, r=6)
        x = torch.randn(2, 3, 48, 48)
        exported = export_onnx(model, (x,))
        with torch.no_grad():
            want = model(x)
        got = run_onnx(exported.model, {exported.input_names[0]: x.numpy()})
        np.testing.assert_allclose(got[0], want.numpy(), atol=1e-5, rtol=0)
        assert model._tome_state.protected == (2 if cls is VisionTransformerDistilled else 1)
    assert timm.__version__


def test_r_zero_patch_is_the_unmerged_model():
    model = vit_tiny_test()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        plain = model(x)
        tome_export.apply(model, r=0)
        patched = model(x)
    torch.testing.assert_close(patched, plain, atol=1e-5, rtol=0)
    assert model._tome_state.slots == []
