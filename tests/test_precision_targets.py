"""--precision through the whole export for every target: trt (ONNX graph + readiness),
coreml (conversion), a tiny diffusion UNet on onnx; manifests carry the figures."""

from __future__ import annotations

import onnx
import pytest

from tome_export.options import ExportOptions
from tome_export.pipeline import export

TINY = "samples.reference_vit:vit_tiny_test"


def _export(tmp_path, **kwargs) -> dict:
    options = ExportOptions(out=str(tmp_path / "bundle"), **kwargs)
    _, manifest = export(options)
    return manifest


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_trt_graph_at_reduced_precision_passes_readiness(tmp_path, precision):
    manifest = _export(
        tmp_path, model=TINY, r=8, target="trt", device="jetson-orin-nano", precision=precision, min_cosine=0.5
    )
    assert manifest["precision"] == precision
    assert manifest["tensorrt"]["readiness"]["ready"]
    detail = manifest["precision_detail"]
    assert detail["fp32_nodes"] and detail["merge_kept_fp32"]
    graph = onnx.load(str(tmp_path / "bundle" / "model.onnx"))
    ops = {n.op_type for n in graph.graph.node}
    assert ("DequantizeLinear" in ops) == (precision == "int8")
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in graph.graph.initializer) == (precision == "fp16")
    verification = manifest["verification"]
    assert verification["passed"] and len(verification["decision_agreement"]) == 4
    assert "cosine" in verification["unmerged_same_precision"]


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_coreml_conversion_at_reduced_precision(tmp_path, precision):
    pytest.importorskip("coremltools")
    import coremltools as ct

    manifest = _export(
        tmp_path,
        model=TINY,
        r=8,
        target="coreml",
        device="apple-a17-pro",
        precision=precision,
        min_cosine=0.8,
        unmerged_baseline=False,
    )
    assert manifest["verification"]["passed"] and manifest["precision"] == precision
    spec = ct.models.MLModel(str(tmp_path / "bundle" / "model.mlpackage"), skip_model_load=True).get_spec()
    function = spec.mlProgram.functions["main"]
    ops = list(function.block_specializations[function.opset].operations)
    fp32, fp16 = 11, 10  # MIL proto data types
    similarity = [o for o in ops if o.type == "matmul" and o.outputs[0].type.tensorType.dataType == fp32]
    assert len(similarity) == 4  # one similarity per merging block, kept fp32
    assert any(o.type == "matmul" and o.outputs[0].type.tensorType.dataType == fp16 for o in ops)
    assert all(o.outputs[0].type.tensorType.dataType == fp32 for o in ops if o.type == "reduce_max")
    dequantize = [o for o in ops if o.type.startswith("constexpr_")]
    assert bool(dequantize) == (precision == "int8")


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_tiny_unet_onnx_at_reduced_precision(tmp_path, precision):
    pytest.importorskip("diffusers")
    manifest = _export(
        tmp_path,
        model="samples.tiny_unet:tiny_unet",
        method="tomesd",
        ratio=0.5,
        precision=precision,
        min_cosine=0.9,
        seeds=2,
    )
    verification = manifest["verification"]
    assert verification["passed"] and verification["decision_agreement"]
    detail = manifest["precision_detail"]
    assert detail["fp32_nodes"]
    assert "cosine" in verification["unmerged_same_precision"], verification["unmerged_same_precision"]


def test_profile_sweeps_precision(tmp_path):
    from tome_export.profiling import profile_bundle

    _export(tmp_path, model=TINY, r=8, min_cosine=0.5)  # the bundle's tolerance carries to the re-exports
    records = profile_bundle(tmp_path / "bundle", runs=2, warmup=1, precisions=["fp32", "int8"], with_fidelity=True,
                             trust_source=True)
    assert [rec["precision"] for rec in records] == ["fp32", "int8"]
    assert all(rec["r"] == 8 and rec["fidelity"] is not None for rec in records)
    assert records[0]["fidelity"] != records[1]["fidelity"]  # the int8 re-export really is another graph
