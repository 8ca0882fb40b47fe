"""`--target trt` end to end: TensorRT for RTX engines built here (no GPU), the standard-TensorRT
script path for Jetson / data-centre profiles, and what happens without TensorRT."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tome_export.targets import trt_rtx

REPO = Path(__file__).resolve().parent.parent
ARGS = ("samples.reference_vit:vit_tiny_test", "--r", "8", "--input-shape", "1,3,64,64", "--seeds", "1")
needs_rtx = pytest.mark.skipif(not trt_rtx.rtx_available(), reason='TensorRT for RTX: pip install "tome-export[trt]"')


def cli_without_tensorrt(*args: str) -> subprocess.CompletedProcess:
    """The CLI in a process where ``tensorrt_rtx`` and ``tensorrt`` cannot be imported."""
    code = (
        "import sys; sys.modules['tensorrt_rtx'] = None; sys.modules['tensorrt'] = None; "
        "from tome_export.cli import entry; sys.argv = ['tome-export', *sys.argv[1:]]; entry()"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, "-c", code, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@needs_rtx
def test_trt_builds_a_tensorrt_for_rtx_engine(cli, tmp_path):
    out = tmp_path / "b"
    done = cli(*ARGS, "--target", "trt", "-o", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    manifest = json.loads((out / "manifest.json").read_text())
    trt = manifest["tensorrt"]
    assert trt["flavour"] == "TensorRT for RTX" and trt["version"].startswith("1.")
    assert trt["readiness"]["checked_by"].startswith("TensorRT for RTX") and trt["readiness"]["ready"]
    engine = trt["engines"][0]
    assert trt["engine"] == engine["artifact"] == "model.engine" and engine["built_from"] == "model.onnx"
    assert engine["sha256"] == _sha256(out / "model.engine") == manifest["artifacts"]["model.engine"]["sha256"]
    assert engine["bytes"] == (out / "model.engine").stat().st_size > 100_000
    assert engine["precision"] == manifest["precision"] == "fp32" and engine["build_seconds"] > 0
    assert engine["compute_capabilities"] == list(trt_rtx.DEFAULT_CAPABILITIES)
    assert manifest["verification"]["passed"]
    layers = json.loads((out / engine["layers_file"]).read_text())["layers"]
    assert len(layers) == engine["engine_layers"] > 10
    covered = {node for layer in layers for node in layer["onnx_nodes"]}
    assert any("TopK" in node for node in covered) and any("conv" in node for node in covered)
    assert all(layer["output_dtypes"] for layer in layers)
    script = (out / "compare_engine.sh").read_text()
    assert "POLYGRAPHY_USE_TENSORRT_RTX=1" in script and "--model-type engine --trt" in script
    assert not (out / "build_engine.sh").exists()  # the engine is built; scripts are for standard TensorRT
    if shutil.which("polygraphy"):  # its ONNX Runtime half runs here; the engine half needs an RTX GPU
        ran = subprocess.run(["sh", str(out / "compare_engine.sh")], capture_output=True, text=True, timeout=300)
        assert (out / "polygraphy_onnxrt.json").is_file() and (out / "polygraphy_inputs.json").is_file()
        assert ran.returncode != 0 and "Could not deserialize engine" in ran.stdout + ran.stderr


@needs_rtx
def test_rtx_device_profile_builds_fp16_with_the_merge_metric_in_fp32(cli, tmp_path):
    out = tmp_path / "b"
    done = cli(*ARGS, "--device", "nvidia-rtx-ada-laptop", "-o", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    manifest = json.loads((out / "manifest.json").read_text())
    engine = manifest["tensorrt"]["engines"][0]
    # the export's precision pass made model.onnx fp16 (merge kept fp32) and verified it against eager
    assert engine["precision"] == "fp16" and engine["built_from"] == manifest["artifact"] == "model.onnx"
    assert engine["fp16"]["kept_fp32_nodes"] > 0 and manifest["precision_detail"]["precision"] == "fp16"
    assert engine["compute_capabilities"] == ["SM89"]
    assert engine["layer_precisions"].get("Half", 0) > 0 and engine["layer_precisions"].get("Float", 0) > 0
    check = manifest["verification"]
    assert check["passed"] and check["cosine"] > 0.99 and 0 < check["max_abs_err"] < 0.1
    layers = json.loads((out / engine["layers_file"]).read_text())["layers"]
    topk = [layer for layer in layers if any("TopK" in n for n in layer["onnx_nodes"])]
    assert topk and all(dtype == "Float" for layer in topk for dtype in layer["input_dtypes"])


def test_without_tensorrt_the_bundle_has_onnx_and_scripts(tmp_path):
    out = tmp_path / "b"
    done = cli_without_tensorrt(*ARGS, "--target", "trt", "-o", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    manifest = json.loads((out / "manifest.json").read_text())
    trt = manifest["tensorrt"]
    assert trt["engine"] is None and trt["readiness"]["checked_by"].startswith("hand-written")
    assert 'pip install "tome-export[trt]"' in done.stderr
    assert "trtexec --onnx=model.onnx --saveEngine=model.plan" in (out / "build_engine.sh").read_text()
    assert not (out / "model.engine").exists()


def test_build_engine_without_tensorrt_exits_3(tmp_path):
    out = tmp_path / "b"
    done = cli_without_tensorrt(*ARGS, "--target", "trt", "--build-engine", "-o", str(out))
    assert done.returncode == 3 and 'pip install "tome-export[trt]"' in done.stderr
    assert "Traceback" not in done.stderr and not out.exists()


@needs_rtx
def test_parser_error_is_exit_2_naming_node_and_op(cli, tmp_path):
    out = tmp_path / "b"
    done = cli("tests.fixtures.factories:bitshift_net", "--method", "none", "--input-shape", "2,8",
               "--target", "trt", "-o", str(out))
    assert done.returncode == 2, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    # the first node TensorRT refuses: the uint8 Cast before the BitShift
    assert last.startswith("error: TensorRT for RTX") and "node 'node__to_copy' (Cast)" in last
    assert "Traceback" not in done.stderr and not out.exists()
    assert not list(tmp_path.iterdir())  # not even the partial folder


@needs_rtx
def test_jetson_plugin_bundle(cli, tmp_path):
    out = tmp_path / "b"
    done = cli(*ARGS, "--device", "jetson-agx-orin", "--lowering", "plugin", "-o", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["target"] == "trt" and manifest["tensorrt"]["plugins"] == ["tome_export::BipartiteMerge"]
    assert manifest["verification"]["passed"]
    assert manifest["verification"]["runtime"] == "onnxruntime CPU + reference merge op"
    assert "--merge-plugin" in (out / "build_engine.sh").read_text()
    assert (out / "tome_merge_plugin.py").is_file() and (out / "triton_merge.py").is_file()
    assert "built on the device" in done.stderr


@needs_rtx
def test_jetson_dense_graph_is_checked_by_the_real_parser(cli, tmp_path):
    out = tmp_path / "b"
    done = cli(*ARGS, "--device", "jetson-orin-nx", "-o", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    trt = json.loads((out / "manifest.json").read_text())["tensorrt"]
    assert trt["readiness"]["checked_by"].startswith("TensorRT for RTX") and trt["engine"] is None
    assert "--useDLACore=0" in (out / "build_engine.sh").read_text() and not (out / "model.engine").exists()


def test_jetson_build_engine_is_refused(cli, tmp_path):
    done = cli(*ARGS, "--device", "jetson-orin-nano", "--build-engine", "-o", str(tmp_path / "b"))
    assert done.returncode == 2 and "built on the device" in done.stderr
