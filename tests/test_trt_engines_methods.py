"""Every merge method builds a TensorRT for RTX engine here (ahead of time, no GPU): a tomesd
UNet, TDTM variants with dynamic-loading blocks (one engine per graph), fp16 and int8 QDQ graphs."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from tome_export.graph_passes.fp16 import metric_nodes, to_fp16
from tome_export.targets import trt_rtx

pytestmark = pytest.mark.skipif(not trt_rtx.rtx_available(), reason='TensorRT for RTX: pip install "tome-export[trt]"')
VIT = ("samples.reference_vit:vit_tiny_test", "--r", "8", "--input-shape", "1,3,64,64", "--seeds", "1")


def _manifest(out):
    return json.loads((out / "manifest.json").read_text())


def test_tomesd_unet_builds_an_fp16_engine(cli, tmp_path):
    out = tmp_path / "u"
    done = cli("samples.tiny_unet:tiny_unet", "--method", "tomesd", "--ratio", "0.5", "--seeds", "1",
               "--device", "nvidia-rtx-ampere-desktop", "-o", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    manifest = _manifest(out)
    assert manifest["verification"]["passed"] and manifest["merge"]["method"] == "tomesd"
    engine = manifest["tensorrt"]["engines"][0]
    assert (out / "model.engine").stat().st_size == engine["bytes"] > 100_000
    # Resize's scales stay float32 (the ONNX spec), the tomesd metric too; the rest is fp16
    # the export's precision pass made model.onnx fp16 and verified it against eager PyTorch
    assert engine["built_from"] == "model.onnx" and engine["fp16"]["kept_fp32_nodes"] > 0
    assert engine["layer_precisions"]["Half"] > engine["layer_precisions"]["Float"]
    assert manifest["verification"]["cosine"] > 0.999


def test_tdtm_variants_and_blocks_get_one_engine_each(cli, tmp_path):
    out = tmp_path / "v"
    done = cli("samples.stdit:stdit_test", "--method", "tdtm", "--merge-steps", "5", "--seeds", "1",
               "--dynamic-loading", "--memory-budget", "160KB", "--target", "trt", "-o", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    manifest = _manifest(out)
    engines = manifest["tensorrt"]["engines"]
    onnx_graphs = sorted(e["onnx"] for e in engines)
    blocks = manifest["dynamic_loading"]["blocks"] + manifest["variants"]["merged"]["dynamic_loading"]["blocks"]
    assert len(blocks) >= 4  # the budget forces more than one block per variant
    expected = sorted(["model.onnx", "model_merged.onnx", *(b["artifact"] for b in blocks)])
    assert onnx_graphs == expected
    assert manifest["variants"]["merged"]["engine"] == "model_merged.engine"
    for block in blocks:
        assert block["engine"] == block["artifact"].replace(".onnx", ".engine")
        assert manifest["artifacts"][block["engine"]]["sha256"] == next(
            e["sha256"] for e in engines if e["artifact"] == block["engine"]
        )


def test_fp16_pass_keeps_the_merge_metric_fp32_and_only_that():
    import torch

    import tome_export
    from samples.reference_vit import vit_tiny_test
    from tome_export.exporter.onnx_export import export_onnx

    model = tome_export.apply(vit_tiny_test(), method="tome", r=8)
    exported = export_onnx(model, (torch.randn(1, 3, 64, 64),), "dense", 18).model
    kept = metric_nodes(exported)
    ops = {exported.graph.node[i].op_type for i in kept}
    assert {"ReduceL2", "MatMul", "ArgMax", "TopK"} <= ops and len(kept) < len(exported.graph.node) // 4
    half, summary = to_fp16(exported)
    assert summary["kept_fp32_nodes"] == len(kept)
    float_inits = [t.name for t in half.graph.initializer if t.data_type == onnx.TensorProto.FLOAT]
    assert all(n.endswith("__fp32") or t_used_only_by_metric(exported, n, kept) for n in float_inits)
    assert half.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # interface unchanged


def t_used_only_by_metric(model, name, kept) -> bool:
    users = [i for i, n in enumerate(model.graph.node) if name in n.input]
    return bool(users) and all(i in kept for i in users)


def test_int8_qdq_with_float_bias_builds(tmp_path):
    import torch

    import tome_export
    from samples.reference_vit import vit_tiny_test
    from tome_export.exporter.onnx_export import export_onnx
    from tome_export.graph_passes.int8_qdq import quantize_qdq

    model = tome_export.apply(vit_tiny_test(), method="tome", r=8)
    exported = export_onnx(model, (torch.randn(1, 3, 64, 64),), "dense", 18).model
    onnx.save(exported, tmp_path / "m.onnx")
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.standard_normal((1, 3, 64, 64)).astype(np.float32)} for _ in range(2)]
    summary = quantize_qdq(tmp_path / "m.onnx", tmp_path / "q.onnx", feeds)
    assert summary["dequantize_nodes"] > 0 and summary["metric_nodes_excluded"] > 0
    quantized = onnx.load(tmp_path / "q.onnx")
    for node in quantized.graph.node:  # TensorRT refuses DequantizeLinear on int32 (quantized bias)
        if node.op_type == "DequantizeLinear":
            source = next((t for t in quantized.graph.initializer if t.name == node.input[0]), None)
            assert source is None or source.data_type == onnx.TensorProto.INT8
    built = trt_rtx.build_engine(tmp_path / "q.onnx", tmp_path / "q.engine")
    assert trt_rtx.precision_summary(built.layers).get("Int8", 0) > 0
