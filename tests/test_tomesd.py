"""tomesd-style merging (our implementation): the op, its ONNX lowerings, a tiny UNet end to end."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import tome_export
from tome_export.errors import UserError
from tome_export.exporter.lowerings import LOWERINGS
from tome_export.exporter.onnx_export import export_onnx
from tome_export.merging import merge_state
from tome_export.merging.tomesd import max_ratio, partition, tokens_merged

pytest.importorskip("diffusers")


@settings(max_examples=25, deadline=None)
@given(
    h=st.integers(2, 9),
    w=st.integers(2, 9),
    sx=st.integers(1, 3),
    sy=st.integers(1, 3),
    fraction=st.floats(0.0, 1.0),
    batch=st.integers(1, 2),
    seed=st.sampled_from([-1, 0, 7]),
)
def test_merge_is_the_mean_of_each_slot(h, w, sx, sy, fraction, batch, seed):
    if sx > w or sy > h:
        return
    sources, destinations = partition(h, w, sx, sy, seed)
    assert len(destinations) == (h // sy) * (w // sx) and sorted(sources + destinations) == list(range(h * w))
    r = tokens_merged(h * w, fraction * max_ratio(sx, sy), len(sources))
    if r == 0:
        return
    generator = torch.Generator().manual_seed(h * 100 + w)
    x = torch.randn(batch, h * w, 5, generator=generator)
    metric = torch.randn(batch, h * w, 4, generator=generator)
    merged, slot = torch.ops.tome_export.tomesd_merge(metric, x, h, w, sx, sy, r, seed)
    assert merged.shape == (batch, h * w - r, 5) and slot.shape == (batch, h * w)
    for b in range(batch):
        counts = torch.bincount(slot[b], minlength=h * w - r)
        assert (counts >= 1).all()  # every output row stands for at least one token
        expected = torch.zeros(h * w - r, 5).index_add_(0, slot[b], x[b]) / counts[:, None]
        torch.testing.assert_close(merged[b], expected, atol=1e-5, rtol=1e-5)
        assert set(slot[b, list(destinations)].tolist()) == set(range(h * w - r - len(destinations), h * w - r))


class _MergeOp(nn.Module):
    def __init__(self, h: int, w: int, sx: int, sy: int, r: int) -> None:
        super().__init__()
        self.geometry = (h, w, sx, sy, r)

    def forward(self, metric, x):
        return torch.ops.tome_export.tomesd_merge(metric, x, *self.geometry, -1)


LOWERINGS_HERE = [name for name in ("scatter", "dense") if name in LOWERINGS]


@pytest.mark.parametrize("lowering", LOWERINGS_HERE)
@pytest.mark.parametrize("geometry", [(8, 8, 2, 2, 48), (7, 9, 3, 2, 20)])
def test_op_lowering_matches_eager(lowering, geometry):
    h, w, sx, sy, r = geometry
    module = _MergeOp(h, w, sx, sy, r)
    example = (torch.randn(2, h * w, 8), torch.randn(2, h * w, 16))
    exported = export_onnx(module, example, lowering=lowering)
    session = ort.InferenceSession(exported.model.SerializeToString(), providers=["CPUExecutionProvider"])
    for seed in range(3):
        generator = torch.Generator().manual_seed(seed)
        inputs = (torch.randn(2, h * w, 8, generator=generator), torch.randn(2, h * w, 16, generator=generator))
        merged, slot = module(*inputs)
        got = session.run(None, {n: t.numpy() for n, t in zip(exported.input_names, inputs)})
        assert np.abs(got[0] - merged.numpy()).max() <= 1e-5
        assert np.array_equal(got[1], slot.numpy())


def test_dense_lowering_available():
    assert "tome_export::tomesd_merge" in LOWERINGS["dense"].translations


def test_ratio_out_of_range_is_a_user_error():
    from samples.tiny_unet import tiny_unet

    with pytest.raises(UserError, match="ratio 0.8 outside"):
        tome_export.apply(tiny_unet(), method="tomesd", ratio=0.8)
    with pytest.raises(UserError, match="BasicTransformerBlock"):
        tome_export.apply(nn.Linear(2, 2), method="tomesd", ratio=0.5)


def test_cli_ratio_out_of_range_exits_2_and_writes_nothing(cli, tmp_path):
    out = tmp_path / "bundle"
    result = cli("samples.tiny_unet:tiny_unet", "--method", "tomesd", "--ratio", "0.9", "-o", str(out))
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: tomesd ratio 0.9 outside [0, 0.75]")
    assert len(result.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_max_downsample_and_random_destinations_eager():
    from samples.tiny_unet import tiny_unet

    model = tiny_unet()
    inputs = (torch.randn(1, 4, 16, 16), torch.tensor([10]), torch.randn(1, 8, 32))
    tome_export.apply(model, method="tomesd", ratio=0.5, max_downsample=2)
    with torch.no_grad():
        model(*inputs)
    # down, mid and up blocks: 16×16 ones and the 8×8 mid block now merge too
    assert merge_state(model).tokens_per_layer == [256, 64, 256, 256]
    tome_export.apply(model, method="tomesd", ratio=0.5, use_rand=True, seed=3)
    with torch.no_grad():
        first = [s.clone() for s in (model(*inputs), *merge_state(model).slots)]
        second = [s.clone() for s in (model(*inputs), *merge_state(model).slots)]
    assert not torch.equal(first[1], second[1])  # a fresh destination choice each forward
    with pytest.raises(UserError, match="eager-only"):
        export_onnx(model, inputs)


def test_tiny_unet_exports_and_verifies(tmp_path):
    from tome_export.pipeline import ExportOptions, export

    path, manifest = export(
        ExportOptions(model="samples.tiny_unet:tiny_unet", method="tomesd", ratio=0.5, out=str(tmp_path / "unet"))
    )
    merge = manifest["merge"]
    assert merge["method"] == "tomesd" and merge["r_per_layer"] == [128, 128, 128]
    assert [i["dtype"] for i in manifest["inputs"]] == ["float32", "int64", "float32"]
    check = manifest["verification"]
    assert check["passed"] and check["max_abs_err"] <= 1e-4
    assert check["decision_agreement"] == [1.0, 1.0, 1.0]
    assert json.loads((path / "manifest.json").read_text())["merge"]["ratio"] == 0.5


def test_several_inputs_integer_and_0dim_timestep():
    from samples.tiny_unet import tiny_unet
    from tome_export.inputs import make_inputs
    from tome_export.pipeline import parse_input_shape

    shapes = parse_input_shape("2,4,16,16;scalar;2,8,32")
    assert shapes == [(2, 4, 16, 16), (), (2, 8, 32)]
    model = tiny_unet()
    sample, timestep, text = make_inputs(model, shapes, seed=1)
    assert timestep.shape == () and timestep.dtype == torch.int64 and 0 <= int(timestep) < 1000
    assert sample.dtype == text.dtype == torch.float32
    assert torch.equal(make_inputs(model, shapes, seed=1)[1], timestep)  # seeded
    tome_export.apply(model, method="tomesd", ratio=0.5)
    with torch.no_grad():
        assert model(sample, timestep, text).shape == (2, 4, 16, 16)
    assert [s.shape for s in merge_state(model).slots] == [(2, 256)] * 3


class _TimestepTable(torch.nn.Module):
    """Declares no input specs; looks its 0-dim timestep up in an embedding table."""

    def __init__(self) -> None:
        super().__init__()
        self.table = torch.nn.Embedding(1000, 8)
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, x, timestep):
        return self.proj(x + self.table(timestep))


def test_undeclared_scalar_input_is_an_integer_timestep(tmp_path, monkeypatch):
    """``scalar`` on the command line works for a model that declares nothing: the 0-dim
    input is an int64 timestep in [0, 1000), so an embedding lookup exports and verifies."""
    import sys
    import types

    from click.testing import CliRunner

    from tome_export.cli import main
    from tome_export.inputs import make_inputs

    inputs = make_inputs(_TimestepTable(), [(1, 4, 8), ()], seed=0)
    assert inputs[1].dtype == torch.int64 and inputs[1].shape == () and 0 <= int(inputs[1]) < 1000
    module = types.ModuleType("undeclared_scalar_model")
    module.build = lambda: _TimestepTable().eval()
    monkeypatch.setitem(sys.modules, "undeclared_scalar_model", module)
    out = tmp_path / "bundle"
    result = CliRunner().invoke(
        main, ["undeclared_scalar_model:build", "--r", "0", "--input-shape", "1,4,8;scalar", "-o", str(out)]
    )
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert [i["dtype"] for i in manifest["inputs"]] == ["float32", "int64"]
    assert manifest["verification"]["passed"]
