"""ToDo (token downsampling): eager vs the paper's reference operation, the factor-1 gate,
and a graph without scatter or custom ops."""

from __future__ import annotations

import onnx
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import tome_export
from tome_export.errors import UserError
from tome_export.exporter.onnx_export import export_onnx
from tome_export.inputs import make_inputs
from tome_export.merging.todo import downsample_tokens, downsampled_size

pytest.importorskip("diffusers")


def reference_downsample(x, h, w, new_h, new_w):
    """The public ToDo implementations' ``up_or_downsample`` (F.interpolate, nearest-exact)."""
    batch = x.shape[0]
    grid = x.reshape(batch, h, w, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(new_h, new_w), mode="nearest-exact").permute(0, 2, 3, 1)
    return grid.reshape(batch, new_h * new_w, -1)


@settings(max_examples=40, deadline=None)
@given(h=st.integers(1, 20), w=st.integers(1, 20), factor=st.sampled_from([1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 8.0]))
def test_downsampling_is_the_reference_nearest_exact(h, w, factor):
    x = torch.randn(2, h * w, 3)
    new_h, new_w = downsampled_size(h, w, factor)
    assert torch.equal(downsample_tokens(x, h, w, new_h, new_w), reference_downsample(x, h, w, new_h, new_w))


def _unet_and_inputs(factory="sd15_tiny", seed=3):
    from samples import tiny_unet
    from tome_export.exporter.diffusers_source import adapt

    model = adapt(getattr(tiny_unet, factory)())
    return model, make_inputs(model, model.default_input_shapes, seed)


def test_factor_1_is_the_unpatched_unet():
    model, inputs = _unet_and_inputs()
    with torch.no_grad():
        plain = model(*inputs)
        tome_export.apply(model, method="todo", downsample=1)
        patched = model(*inputs)
    assert torch.equal(plain, patched)
    assert model._tome_state.r_per_layer == [0, 0, 0] and model._tome_state.kv_tokens_per_layer == [256] * 3


def test_patched_unet_is_attention_on_reference_downsampled_keys():
    """The whole UNet with ToDo equals the UNet whose self-attentions get the reference
    (F.interpolate) downsampled tokens as keys/values — the paper's method, independently."""
    model, inputs = _unet_and_inputs()
    calls = []

    def reference_hook(attn, args, kwargs):
        hidden = args[0]
        if hidden.shape[1] == 256:  # 16×16 latent, the highest resolution
            kwargs["encoder_hidden_states"] = reference_downsample(hidden, 16, 16, 8, 8)
            calls.append(1)
        return args, kwargs

    handles = [
        m.attn1.register_forward_pre_hook(reference_hook, with_kwargs=True)
        for m in model.modules()
        if type(m).__name__ == "BasicTransformerBlock"
    ]
    with torch.no_grad():
        expected = model(*inputs)
    for handle in handles:
        handle.remove()
    tome_export.apply(model, method="todo", downsample=2)
    with torch.no_grad():
        got = model(*inputs)
    assert len(calls) == 3 and torch.equal(got, expected)
    with torch.no_grad():
        tome_export.apply(model, method="todo", downsample=1)
        assert (model(*inputs) - got).abs().max() > 1e-4  # downsampling changes the output


def test_graph_has_no_scatter_no_custom_op_and_static_shapes():
    model, inputs = _unet_and_inputs()
    tome_export.apply(model, method="todo", downsample=2)
    exported = export_onnx(model, inputs)
    ops = {n.op_type for n in exported.model.graph.node}
    assert not {op for op in ops if "Scatter" in op or op in ("TopK", "NonZero")}
    assert {o.domain for o in exported.model.opset_import} <= {"", "ai.onnx"}
    onnx.checker.check_model(exported.model)
    assert exported.decision_names == []


def test_options_out_of_range():
    model, _ = _unet_and_inputs()
    for bad in (0.5, 9, float("nan")):
        with pytest.raises(UserError, match="todo downsample factor"):
            tome_export.apply(model, method="todo", downsample=bad)
    with pytest.raises(UserError, match="max_downsample"):
        tome_export.apply(model, method="todo", downsample=2, max_downsample=0)
    with pytest.raises(UserError, match="BasicTransformerBlock"):
        tome_export.apply(torch.nn.Linear(2, 2), method="todo")
