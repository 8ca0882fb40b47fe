"""The merge plugin for TensorRT for RTX: its build-time Python methods, and the blocker that keeps
engines with it from being built in TensorRT for RTX 1.7 (re-checked, so a fix shows up here)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from tome_export.targets import trt_rtx, trt_rtx_plugin

pytestmark = pytest.mark.skipif(not trt_rtx.rtx_available(), reason='TensorRT for RTX: pip install "tome-export[trt]"')
ARGS = ("samples.reference_vit:vit_tiny_test", "--r", "8", "--input-shape", "1,3,64,64", "--seeds", "1")


def test_decorator_plugin_module_is_missing_from_the_wheel():
    done = subprocess.run([sys.executable, "-c", "import tensorrt_rtx.plugin"], capture_output=True, text=True)
    assert done.returncode != 0 and "No module named 'tensorrt_rtx_bindings.plugin'" in done.stderr


def test_plugin_build_time_methods_and_registration():
    trt = trt_rtx.load()
    plugin = trt_rtx_plugin._plugin_class(trt)(8, 1)
    assert plugin.get_output_data_types([trt.DataType.FLOAT] * 3) == [trt.DataType.FLOAT, trt.DataType.FLOAT, trt.DataType.INT64]
    fields = {f.name for f in plugin.get_fields_to_serialize()}
    assert fields == {"r", "protected", "mode"} and plugin.clone().r == 8
    with pytest.raises(ValueError, match="weighted_mean only"):
        trt_rtx_plugin._plugin_class(trt)(8, 1, "max")
    code = textwrap.dedent(
        """
        import numpy as np, tensorrt_rtx as trt
        from tome_export.targets import trt_rtx_plugin as P
        P.register(); P.register()
        creator = trt.get_plugin_registry().get_creator("BipartiteMerge", "1", "tome_export")
        fields = trt.PluginFieldCollection([trt.PluginField("r", np.array([5], np.int32), trt.PluginFieldType.INT32)])
        print(creator.create_plugin("m", fields, trt.TensorRTPhase.BUILD).r)
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "5", done.stderr[-1500:]


@pytest.mark.skipif(trt_rtx_plugin.blocked_reason() is None, reason="this TensorRT for RTX is not known to be blocked")
def test_parser_with_the_python_plugin_still_aborts(cli, tmp_path):
    out = tmp_path / "p"
    done = cli(*ARGS, "--target", "onnx", "--lowering", "plugin", "--split", "prefix", "-o", str(out))
    assert done.returncode == 0, done.stderr[-1500:]
    code = textwrap.dedent(
        f"""
        import onnx
        from tome_export.targets import trt_rtx, trt_rtx_plugin
        from tome_export.targets.tensorrt import mark_plugin_nodes
        model = onnx.load({str(out / "model.onnx")!r}); mark_plugin_nodes(model)
        onnx.save(model, {str(tmp_path / "marked.onnx")!r})
        print(trt_rtx.parse_onnx({str(tmp_path / "marked.onnx")!r}, trt_rtx_plugin.register).ok)
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    # When this fails, TensorRT for RTX has fixed the abort: drop its entry from trt_rtx_plugin.BLOCKED.
    assert done.returncode != 0 and "terminate called" in done.stderr, (done.returncode, done.stderr[-800:])


def test_plugin_lowering_without_an_engine_says_why(cli, tmp_path):
    out = tmp_path / "b"
    done = cli(*ARGS, "--target", "trt", "--lowering", "plugin", "-o", str(out))
    assert done.returncode == 0, done.stderr[-1500:]
    trt = json.loads((out / "manifest.json").read_text())["tensorrt"]
    assert trt["engine"] is None and "NVIDIA/TensorRT-RTX issue #1" in trt["engine_blocked"]
    assert trt["readiness"]["checked_by"].startswith("hand-written") and "--merge-plugin" in (out / "build_engine.sh").read_text()
    refused = cli(*ARGS, "--target", "trt", "--lowering", "plugin", "--build-engine", "-o", str(tmp_path / "c"))
    assert refused.returncode == 2 and "--lowering dense" in refused.stderr and not (tmp_path / "c").exists()
