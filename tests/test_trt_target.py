"""`--target trt` end to end, with the `dense` and `plugin` ONNX lowerings (TensorRT itself is
not needed: without it the bundle carries the build scripts)."""

from __future__ import annotations

import json

import pytest

ARGS = ("samples.reference_vit:vit_tiny_test", "--r", "8", "--input-shape", "1,3,64,64", "--seeds", "1")


def _tensorrt_missing() -> bool:
    from tome_export.targets.tensorrt import tensorrt_available

    return not tensorrt_available()


def test_trt_dense_bundle_without_tensorrt(cli, tmp_path):
    out = tmp_path / "b"
    done = cli(*ARGS, "--target", "trt", "-o", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    manifest = json.loads((out / "manifest.json").read_text())
    trt = manifest["tensorrt"]
    assert trt["readiness"]["ready"] and trt["plugins"] == []
    assert manifest["verification"]["passed"]
    script = (out / "build_engine.sh").read_text()
    assert "trtexec --onnx=model.onnx --saveEngine=model.plan" in script
    if _tensorrt_missing():
        assert "TensorRT is not installed here" in done.stderr and trt["engine"] is None


def test_trt_build_engine_without_tensorrt_exits_3(cli, tmp_path):
    if not _tensorrt_missing():
        pytest.skip("TensorRT is installed")
    out = tmp_path / "b"
    done = cli(*ARGS, "--target", "trt", "--build-engine", "-o", str(out))
    assert done.returncode == 3 and "pip install 'tome-export[trt]'" in done.stderr
    assert "Traceback" not in done.stderr and not out.exists()


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


def test_jetson_build_engine_is_refused(cli, tmp_path):
    done = cli(*ARGS, "--device", "jetson-orin-nano", "--build-engine", "-o", str(tmp_path / "b"))
    assert done.returncode == 2 and "built on the device" in done.stderr
