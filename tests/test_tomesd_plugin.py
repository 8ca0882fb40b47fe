"""tomesd with the plugin lowering (one tome_export.TomesdMerge node) and decision pinning."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from tome_export.contract import PLUGIN_DOMAIN, TOMESD_OP_TYPE
from tome_export.errors import UserError
from tome_export.exporter.lowerings import LOWERINGS, Lowering, merge_scatter
from tome_export.exporter.onnx_export import export_onnx
from tome_export.merging.pinning import forced_decisions
from tome_export.merging.tomesd import merge_tokens, partition
from tome_export.runtimes.onnxruntime import OnnxRuntimeRunner

pytest.importorskip("onnxruntime_extensions")


class _MergeOp(nn.Module):
    def __init__(self, h: int, w: int, sx: int, sy: int, r: int, seed: int = -1) -> None:
        super().__init__()
        self.geometry = (h, w, sx, sy, r, seed)

    def forward(self, metric, x):
        return torch.ops.tome_export.tomesd_merge(metric, x, *self.geometry)


def _inputs(seed: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(2, tokens, 8, generator=generator), torch.randn(2, tokens, 16, generator=generator)


@pytest.mark.parametrize("geometry", [(8, 8, 2, 2, 48, -1), (7, 9, 3, 2, 20, 5), (4, 4, 2, 2, 0, -1)])
def test_plugin_node_matches_eager(geometry):
    module = _MergeOp(*geometry)
    tokens = geometry[0] * geometry[1]
    exported = export_onnx(module, _inputs(0, tokens), lowering="plugin")
    onnx.checker.check_model(exported.model, full_check=True)
    nodes = [n for n in exported.model.graph.node if n.domain == PLUGIN_DOMAIN]
    assert [n.op_type for n in nodes] == [TOMESD_OP_TYPE]
    attributes = {a.name: a.i for a in nodes[0].attribute}
    assert attributes == dict(zip(("h", "w", "sx", "sy", "r", "seed"), geometry))
    assert exported.custom_domains == [PLUGIN_DOMAIN]
    runner = OnnxRuntimeRunner(exported.model)
    for seed in range(1, 4):
        inputs = _inputs(seed, tokens)
        merged, slot = module(*inputs)
        got = list(runner.run({n: t.numpy() for n, t in zip(exported.input_names, inputs)}).values())
        assert np.abs(got[0] - merged.numpy()).max() <= 1e-5
        assert np.array_equal(got[1], slot.numpy())


def test_pinned_eager_reproduces_the_exported_decision():
    """A slot map read back from the exported graph for other inputs drives the eager op."""
    h, w, sx, sy, r = 8, 8, 2, 2, 40
    module = _MergeOp(h, w, sx, sy, r)
    exported = export_onnx(module, _inputs(0, h * w), lowering="plugin")
    runner = OnnxRuntimeRunner(exported.model)
    names = exported.input_names
    forced_slot = list(runner.run({n: t.numpy() for n, t in zip(names, _inputs(1, h * w))}).values())[1]
    metric, x = _inputs(2, h * w)
    _, own_slot = module(metric, x)
    assert not np.array_equal(own_slot.numpy(), forced_slot)  # a decision eager would not make here
    with torch.no_grad(), forced_decisions([forced_slot]) as forced:
        merged, slot = module(metric, x)
    assert np.array_equal(slot.numpy(), forced_slot)
    assert forced.used == 1 and forced.tie_gaps[0] > 0.01
    # Independently: every output position is the mean of the input tokens mapped to it.
    counts = torch.zeros(2, h * w - r).scatter_add(1, slot, torch.ones(2, h * w))
    sums = torch.zeros(2, h * w - r, 16).scatter_add(1, slot[..., None].expand(-1, -1, 16), x)
    assert torch.allclose(merged, sums / counts[..., None], atol=1e-5)
    # Pinned to the graph's own decision for these inputs, eager equals the graph's output.
    got = list(runner.run({n: t.numpy() for n, t in zip(names, (metric, x))}).values())
    with torch.no_grad(), forced_decisions([got[1]]) as forced:
        merged, slot = module(metric, x)
    assert np.abs(got[0] - merged.numpy()).max() <= 1e-5 and np.array_equal(got[1], slot.numpy())
    assert forced.tie_gaps == [0.0]


def test_invalid_tomesd_slot_map_is_refused():
    metric, x = _inputs(0, 16)
    _, slot = merge_tokens(metric, x, 4, 4, 2, 2, 6)
    sources, _ = partition(4, 4, 2, 2)
    broken = slot.clone()
    broken[:, sources[0]] = slot.max()  # one more source merged than r allows
    with pytest.raises(ValueError, match="wrong number of sources"), forced_decisions([broken]):
        torch.ops.tome_export.tomesd_merge(metric, x, 4, 4, 2, 2, 6, -1)


@pytest.fixture
def lowering_without_tomesd(monkeypatch):
    lowering = Lowering("bipartite_only", "test", {"tome_export::bipartite_merge": merge_scatter})
    monkeypatch.setitem(LOWERINGS, lowering.name, lowering)
    return lowering.name


def test_missing_translation_is_a_one_line_user_error(lowering_without_tomesd):
    module = _MergeOp(4, 4, 2, 2, 6)
    with pytest.raises(UserError) as caught:
        export_onnx(module, _inputs(0, 16), lowering=lowering_without_tomesd)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("lowering 'bipartite_only' has no translation for tome_export::tomesd_merge; use ")
    assert "scatter" in message and "plugin" in message


def test_tiny_unet_plugin_export_verifies_pinned(tmp_path):
    pytest.importorskip("diffusers")
    from tome_export.pipeline import ExportOptions, export

    path, manifest = export(
        ExportOptions(
            model="samples.tiny_unet:tiny_unet",
            method="tomesd",
            ratio=0.5,
            lowering="plugin",
            pin_decisions=True,
            out=str(tmp_path / "unet"),
        )
    )
    shipped = onnx.load(path / "model.onnx")
    assert [n.op_type for n in shipped.graph.node if n.domain == PLUGIN_DOMAIN] == [TOMESD_OP_TYPE] * 3
    check = manifest["verification"]
    assert check["passed"] and check["max_abs_err"] <= 1e-5
    assert check["decision_agreement"] == [1.0, 1.0, 1.0]
    assert check["pinned"]["diagnosis"] == "match" and check["pinned"]["max_abs_err"] <= 1e-5


def test_pinning_a_block_that_merges_twice_uses_one_decision():
    """merge_attn + merge_mlp: one slot output per block; its second merge repeats the first."""
    pytest.importorskip("diffusers")
    from samples.tiny_unet import UNetNoise, raw_tiny_unet
    from tome_export.merging.tomesd import apply_tomesd

    model = UNetNoise(apply_tomesd(raw_tiny_unet(), ratio=0.5, merge_mlp=True)).eval()
    generator = torch.Generator().manual_seed(0)
    inputs = (torch.randn(1, 4, 16, 16, generator=generator), torch.tensor([10]), torch.randn(1, 8, 32))
    with torch.no_grad():
        free = model(*inputs)
        own = [s.clone() for s in model.unet._tome_state.slots]
        with forced_decisions(own) as forced:
            pinned = model(*inputs)
    assert len(own) == 3 and forced.used == 3 and forced.tie_gaps == [0.0] * 3
    assert torch.allclose(free, pinned, atol=1e-6)
