"""Models over 2 GB without 2 GB: the external-data path forced with a small threshold.

The same code runs for an SD-1.5 UNet (3.4 GB of fp32 weights) with the default threshold:
weights streamed to ``model.onnx.data`` next to the graph, verification on ONNX Runtime
from the file, runtime.load, dynamic loading.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

import tome_export.runtime as runtime
from tome_export.exporter.onnx_export import export_onnx
from tome_export.graph_passes.external_data import external_files, uses_external_data
from tome_export.inputs import make_inputs
from tome_export.pipeline import ExportOptions, export

pytest.importorskip("diffusers")


def _tiny_unet_options(out, **options) -> ExportOptions:
    """The tiny tomesd UNet with its weights forced into external data (threshold 0)."""
    return ExportOptions(
        model="samples.tiny_unet:tiny_unet", method="tomesd", ratio=0.5, out=str(out), external_data_threshold=0, **options
    )


def test_threshold_decides_and_weights_leave_the_proto(tmp_path):
    from samples.reference_vit import vit_tiny_test

    model = vit_tiny_test().eval()
    example = (torch.randn(1, 3, 64, 64),)
    inline = export_onnx(model, example, external_data=tmp_path / "a.onnx.data")  # default threshold: ~1.8 GB
    assert inline.external_data is None and not uses_external_data(inline.model)
    assert not (tmp_path / "a.onnx.data").exists()
    forced = export_onnx(model, example, external_data=tmp_path / "b.onnx.data", external_threshold=0)
    assert forced.external_data == tmp_path / "b.onnx.data" and forced.external_data.stat().st_size > 0
    assert external_files(forced.model) == ["b.onnx.data"] == external_files(forced.with_decisions)
    assert forced.model.ByteSize() < inline.model.ByteSize() / 2


def test_unet_bundle_with_external_weights_end_to_end(tmp_path):
    out = tmp_path / "unet"
    _, manifest = export(
        _tiny_unet_options(
            out,
            dynamic_loading=True,
            memory_budget="5MB",
        )
    )
    assert manifest["external_data"] == "model.onnx.data"
    assert {"model.onnx", "model.onnx.data"} <= set(manifest["artifacts"])  # checksummed like every artifact
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # the verification graph is gone
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert external_files(graph) == ["model.onnx.data"]
    assert manifest["verification"]["passed"] and manifest["verification"]["max_abs_err"] <= 1e-4
    assert manifest["dynamic_loading"]["verification"]["identical"]
    assert json.loads((out / "manifest.json").read_text())["artifacts"]["model.onnx.data"]["bytes"] > 1_000_000

    import tome_export
    from samples.tiny_unet import tiny_unet

    eager = tome_export.apply(tiny_unet(), method="tomesd", ratio=0.5)
    inputs = make_inputs(eager, eager.default_input_shapes, 7)
    with torch.no_grad():
        expected = eager(*inputs).numpy()
    names = [spec["name"] for spec in manifest["inputs"]]
    got = runtime.load(out).run({n: t.numpy() for n, t in zip(names, inputs)})["output"]
    assert np.abs(got - expected).max() <= 1e-4


def test_fp16_of_a_model_with_external_weights(tmp_path):
    """fp16 (the RTX devices' default precision) of a graph past protobuf's limit: the weights
    are read from the external file, converted, and written back to it — half the bytes, no
    stray files — and the bundle verifies and runs (SD-1.5 on --target trt takes this path)."""
    out = tmp_path / "unet"
    _, manifest = export(
        _tiny_unet_options(out, precision="fp16")
    )
    assert manifest["external_data"] == "model.onnx.data"
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.onnx", "model.onnx.data"]
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert external_files(graph) == ["model.onnx.data"]
    halves = [t for t in graph.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16]
    assert halves and any(t.data_location == onnx.TensorProto.EXTERNAL for t in halves)
    inline = sum(len(t.raw_data) for t in graph.graph.initializer)  # only tensors under 1 KB stay inline
    assert inline < 0.1 * (out / "model.onnx.data").stat().st_size
    assert manifest["verification"]["passed"]
    assert "skipped" in manifest["verification"]["unmerged_same_precision"]  # no second full export
    fp32 = tmp_path / "fp32"
    export(_tiny_unet_options(fp32))
    assert (out / "model.onnx.data").stat().st_size < 0.6 * (fp32 / "model.onnx.data").stat().st_size
    from samples.tiny_unet import tiny_unet

    model = tiny_unet()
    inputs = make_inputs(model, model.default_input_shapes, 3)
    names = [spec["name"] for spec in manifest["inputs"]]
    got = runtime.load(out).run({n: t.numpy() for n, t in zip(names, inputs)})["output"]
    assert np.isfinite(got).all()


def test_int8_of_a_model_with_external_weights_is_refused(tmp_path):
    from tome_export.errors import UserError

    out = tmp_path / "unet"
    options = _tiny_unet_options(out, precision="int8")
    with pytest.raises(UserError, match="use --precision fp16"):
        export(options)
    assert not out.exists() and not list(tmp_path.iterdir())


def test_trt_engine_from_a_graph_with_external_weights(tmp_path):
    """--target trt on a graph past protobuf's limit (SD-1.5's path): the parser check and the
    engine build read the graph beside its fp16 weights; nothing hidden is left behind."""
    pytest.importorskip("tensorrt_rtx")
    out = tmp_path / "unet"
    _, manifest = export(
        _tiny_unet_options(
            out,
            target="trt",
            device="nvidia-rtx-ada-desktop",
        )
    )
    trt = manifest["tensorrt"]
    assert trt["readiness"]["checked_by"].startswith("TensorRT for RTX") and trt["precision"] == "fp16"
    assert (out / "model.engine").stat().st_size == trt["engines"][0]["bytes"] > 0
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    assert manifest["external_data"] == "model.onnx.data" and manifest["verification"]["passed"]
