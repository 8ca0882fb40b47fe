"""Decision-pinned verification: a flipped near-tie is told apart from a broken lowering."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from onnxscript import opset18 as op
from torch import nn

from tome_export.contract import PLUGIN_DOMAIN
from tome_export.exporter.lowerings import LOWERINGS, Lowering, merge_scatter
from tome_export.exporter.onnx_export import export_onnx
from tome_export.merging import bipartite
from tome_export.merging.pinning import decision_from_slots, forced_decisions
from tome_export.runtimes.onnxruntime import OnnxRuntimeRunner
from tome_export.verify import verify


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 3),
    protected=st.integers(0, 2),
    tokens=st.integers(2, 30),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_decision_round_trips_through_slot_map(batch, protected, tokens, seed, data):
    tokens += protected
    r = data.draw(st.integers(0, bipartite.max_r(tokens, protected)))
    generator = torch.Generator().manual_seed(seed)
    metric = torch.randn(batch, tokens, 5, generator=generator)
    x, size = torch.randn(batch, tokens, 3, generator=generator), torch.rand(batch, tokens, 1, generator=generator) + 1
    decision = bipartite.match(metric, r, protected)
    slot = bipartite.slots(decision)
    rebuilt = decision_from_slots(slot, r, protected)
    assert torch.equal(bipartite.slots(rebuilt), slot)
    assert torch.equal(rebuilt.unm_idx, decision.unm_idx)
    for got, want in zip(bipartite.merge_weighted(rebuilt, x, size), bipartite.merge_weighted(decision, x, size)):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_invalid_slot_map_is_refused():
    slot = bipartite.slots(bipartite.match(torch.randn(1, 8, 4), 2, 0))
    broken = slot.clone()
    broken[0, 0] = 7  # a kept A token sent past the end
    with pytest.raises(ValueError, match="slot map"):
        decision_from_slots(broken, 2, 0)


def test_forced_decisions_drive_the_eager_op():
    torch.manual_seed(0)
    metric, x, size = torch.randn(2, 10, 4), torch.randn(2, 10, 3), torch.ones(2, 10, 1)
    other = bipartite.slots(bipartite.match(torch.randn(2, 10, 4), 3, 0))  # another metric's decision
    with forced_decisions([other]) as forced:
        _, _, slot = torch.ops.tome_export.bipartite_merge(metric, x, size, 3, 0)
    assert torch.equal(slot, other)
    assert not torch.equal(other, bipartite.slots(bipartite.match(metric, 3, 0)))
    assert forced.used == 1 and forced.tie_gaps[0] > 0.05
    _, _, free = torch.ops.tome_export.bipartite_merge(metric, x, size, 3, 0)
    assert torch.equal(free, bipartite.slots(bipartite.match(metric, 3, 0)))


class _State:
    """What merge_state() reads: this forward's slot maps."""

    def __init__(self) -> None:
        self.slots: list[torch.Tensor] = []


class NearTie(nn.Module):
    """Merges its input's tokens by a fixed metric with a near-tie that fp16 rounding breaks.

    A tokens 0 and 2 both prefer B token 1; token 2 is ahead by ~7e-5 in cosine (its second
    coordinate is 1 − 2e-4), so eager merges token 2. Rounded to fp16 that coordinate is
    1.0, the two scores tie, and the lower index (token 0) merges instead."""

    def __init__(self) -> None:
        super().__init__()
        metric = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0 - 2e-4, 0.0], [0.0, 0.0, 1.0]])
        self.register_buffer("metric", metric[None])
        self._tome_state = _State()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._tome_state.slots = []
        metric = self.metric.expand(x.shape[0], -1, -1)
        size = torch.ones_like(x[..., :1])
        merged, _, slot = torch.ops.tome_export.bipartite_merge(metric, x, size, 1, 0)
        self._tome_state.slots.append(slot)
        return merged * 2.0


def _metric_in_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """What an fp16 backend does to the merge: round its metric input to half precision."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    for index, node in enumerate(list(graph.node)):
        if node.domain == PLUGIN_DOMAIN:
            half, back = f"{node.input[0]}_fp16", f"{node.input[0]}_rounded"
            graph.node.insert(index, onnx.helper.make_node("Cast", [half], [back], to=onnx.TensorProto.FLOAT))
            graph.node.insert(
                index, onnx.helper.make_node("Cast", [node.input[0]], [half], to=onnx.TensorProto.FLOAT16)
            )
            node.input[0] = back
            break
    else:
        raise AssertionError("no plugin node")
    onnx.checker.check_model(model)
    return model


def _verify(model: nn.Module, graph: onnx.ModelProto, exported, shape, pin: bool):
    runner = OnnxRuntimeRunner(graph)
    return verify(
        model,
        runner.run,
        exported.input_names,
        exported.output_names,
        exported.decision_names,
        [shape],
        seeds=(0, 1),
        atol=1e-5,
        pin_decisions=pin,
    )


def test_flipped_near_tie_is_diagnosed_as_a_flip():
    model = NearTie().eval()
    shape = (2, 4, 6)
    exported = export_onnx(model, (torch.randn(*shape),), lowering="plugin")
    # fp32 graph: decisions and outputs agree.
    clean = _verify(model, exported.with_decisions, exported, shape, pin=True)
    assert clean.passed and clean.pinned["diagnosis"] == "match"
    # fp16-rounded metric: the near-tie flips, outputs differ a lot …
    flipped_graph = _metric_in_fp16(exported.with_decisions)
    unpinned = _verify(model, flipped_graph, exported, shape, pin=False)
    assert not unpinned.passed and unpinned.max_abs_err > 0.1
    assert min(unpinned.decision_agreement) < 1.0
    # … and pinned to the backend's decisions the error vanishes: a flip, not a bug.
    pinned = _verify(model, flipped_graph, exported, shape, pin=True)
    assert pinned.max_abs_err == pytest.approx(unpinned.max_abs_err)
    assert pinned.pinned["max_abs_err"] <= 1e-6
    assert 0 < pinned.pinned["max_tie_gap"] < 1e-3
    assert pinned.pinned["diagnosis"] == "decision_flip" and pinned.passed


def _broken_scale(metric, x, size, r: int, protected: int):
    merged_x, merged_size, slot = merge_scatter(metric, x, size, r, protected)
    return op.Mul(merged_x, op.Constant(value_float=1.01)), merged_size, slot


def _broken_match(metric, x, size, r: int, protected: int):
    return merge_scatter(x, x, size, r, protected)  # matches on the tokens instead of the keys


@pytest.fixture
def broken_lowerings():
    names = {"test_broken_scale": _broken_scale, "test_broken_match": _broken_match}
    for name, fn in names.items():
        LOWERINGS[name] = Lowering(name, "deliberately wrong (test)", {"tome_export::bipartite_merge": fn})
    yield list(names)
    for name in names:
        LOWERINGS.pop(name)


def test_broken_lowerings_are_not_excused_by_pinning(broken_lowerings):
    from samples.reference_vit import vit_tiny_test
    from tome_export.merging import apply

    model = apply(vit_tiny_test(depth=2), "tome", r=8)
    shape = (1, 3, 64, 64)
    wrong_values = export_onnx(model, (torch.randn(*shape),), lowering="test_broken_scale")
    result = _verify(model, wrong_values.with_decisions, wrong_values, shape, pin=True)
    assert min(result.decision_agreement) == 1.0  # same decisions, wrong numbers
    assert result.pinned["max_abs_err"] > 1e-3 and result.pinned["diagnosis"] == "lowering_error"
    assert not result.passed
    wrong_choice = export_onnx(model, (torch.randn(*shape),), lowering="test_broken_match")
    result = _verify(model, wrong_choice.with_decisions, wrong_choice, shape, pin=True)
    assert result.pinned["max_abs_err"] <= 1e-4  # the merge itself is right …
    assert result.pinned["diagnosis"] == "wrong_decisions" and not result.passed  # … its choices are not


def test_cli_pin_decisions_records_both_errors(cli, tmp_path):
    out = tmp_path / "bundle"
    done = cli(
        "samples.reference_vit:vit_tiny_test",
        "--r",
        "6",
        "--input-shape",
        "1,3,64,64",
        "--lowering",
        "dense",
        "--pin-decisions",
        "--seeds",
        "1",
        "-o",
        str(out),
    )
    assert done.returncode == 0, done.stderr
    assert "one-hot MatMul" in done.stderr and "pinned" in done.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    verification = manifest["verification"]
    assert verification["max_abs_err"] <= 1e-4 and verification["pinned"]["max_abs_err"] <= 1e-4
    assert verification["pinned"]["diagnosis"] == "match"
    assert manifest["lowering"] == "dense" and manifest["lowering_notes"][0]["extra_mflops"] > 0
    assert np.isfinite(verification["pinned"]["max_tie_gap"])
