"""TensorRT-readiness check (onnx-tensorrt's restrictions) and the trt target's pieces.

No TensorRT here: these test the static check, the plugin-graph verification runtime and
the build scripts' content; nothing below claims to run TensorRT."""

from __future__ import annotations

import os
import subprocess
import sys
import types

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto as T
from onnx import helper as h

from tome_export.devices import get_device
from tome_export.graph_passes.trt_readiness import check_trt_readiness
from tome_export.merging.bipartite import merge_tokens
from tome_export.runtimes.onnxruntime import OnnxRuntimeRunner
from tome_export.targets.tensorrt import mark_plugin_nodes, trtexec_command, write_build_scripts


def _model(nodes, inputs, outputs, initializers=(), domains=()):
    graph = h.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    opsets = [h.make_opsetid("", 18), *(h.make_opsetid(d, 1) for d in domains)]
    return h.make_model(graph, opset_imports=opsets)


def _vi(name, dtype, shape):
    return h.make_tensor_value_info(name, dtype, shape)


def _merge_graph(b=2, n=17, d=8, c=6, r=5, p=1):
    node = h.make_node(
        "BipartiteMerge", ["m", "x", "s"], ["xo", "so", "slot"], domain="tome_export",
        r=r, protected=p, mode="weighted_mean", name="merge0",
    )  # fmt: skip
    return _model(
        [node],
        [_vi("m", T.FLOAT, [b, n, d]), _vi("x", T.FLOAT, [b, n, c]), _vi("s", T.FLOAT, [b, n, 1])],
        [_vi("xo", T.FLOAT, [b, n - r, c]), _vi("so", T.FLOAT, [b, n - r, 1]), _vi("slot", T.INT64, [b, n])],
        domains=["tome_export"],
    )


def _findings(report, severity):
    return [f for f in report.findings if f.severity == severity]


def test_scatter_lowering_is_not_ready_and_names_the_node(monkeypatch):
    from samples.reference_vit import vit_tiny_test
    from tome_export.exporter import scatter_lowering
    from tome_export.exporter.onnx_export import export_onnx
    from tome_export.merging import apply

    # The scatter lowering sums merged rows with ScatterElements(add) (ONE_HOT_MAX_ROWS pinned).
    monkeypatch.setattr(scatter_lowering, "ONE_HOT_MAX_ROWS", -1)
    model = apply(vit_tiny_test(depth=2), "tome", r=6)
    exported = export_onnx(model, (torch.randn(1, 3, 64, 64),), "scatter")
    report = check_trt_readiness(exported.model)
    assert not report.ready
    errors = report.errors
    # The scatter lowering adds rows with ScatterElements(reduction="add") there.
    assert errors and all(f.op_type in ("ScatterElements", "ScatterND") for f in errors)
    assert len(errors) == 4  # two per merging block (weighted values, sizes)
    scatter_names = {n.name for n in exported.model.graph.node if n.op_type in ("ScatterElements", "ScatterND")}
    assert {f.node for f in errors} <= scatter_names
    assert "--lowering dense" in errors[0].fix and "reduction" in errors[0].reason
    assert "NOT ready" in report.text()


def test_topk_rules():
    k_small = h.make_tensor("k_small", T.INT64, [1], [8])
    k_big = h.make_tensor("k_big", T.INT64, [1], [4096])
    nodes = [
        h.make_node("TopK", ["x", "k_small"], ["v0", "i0"], axis=-1, sorted=1, name="ok"),
        h.make_node("TopK", ["x", "k_small"], ["v1", "i1"], axis=-1, sorted=0, name="unsorted"),
        h.make_node("TopK", ["x", "k_big"], ["v2", "i2"], axis=-1, name="big"),
        h.make_node("TopK", ["x", "kdyn"], ["v3", "i3"], axis=-1, name="dynamic"),
    ]
    outs = [_vi(n, T.FLOAT if n[0] == "v" else T.INT64, None) for n in ("v0", "i0", "v1", "i1", "v2", "i2", "v3", "i3")]
    model = _model(nodes, [_vi("x", T.FLOAT, [1, 5000]), _vi("kdyn", T.INT64, [1])], outs, [k_small, k_big])
    report = check_trt_readiness(model)
    by_node = {f.node: f for f in report.errors}
    assert set(by_node) == {"unsorted", "big", "dynamic"}
    assert "sorted=1" in by_node["unsorted"].reason
    assert "4096" in by_node["big"].reason and "3840" in by_node["big"].reason


def test_scatternd_reduction_rejected_plain_scatter_ok():
    nodes = [
        h.make_node("ScatterND", ["d", "i", "u"], ["o1"], reduction="add", name="nd_add"),
        h.make_node("ScatterND", ["d", "i", "u"], ["o2"], name="nd_plain"),
        h.make_node("ScatterElements", ["d", "i2", "u2"], ["o3"], axis=0, name="se_plain"),
    ]
    inputs = [
        _vi("d", T.FLOAT, [4, 3]), _vi("i", T.INT64, [2, 1]), _vi("u", T.FLOAT, [2, 3]),
        _vi("i2", T.INT64, [2, 3]), _vi("u2", T.FLOAT, [2, 3]),
    ]  # fmt: skip
    model = _model(nodes, inputs, [_vi(o, T.FLOAT, [4, 3]) for o in ("o1", "o2", "o3")])
    report = check_trt_readiness(model)
    assert [f.node for f in report.errors] == ["nd_add"]
    assert "rejected" in report.errors[0].reason


def test_custom_domains_unsupported_ops_and_dtypes():
    nodes = [
        h.make_node("Foo", ["x"], ["y"], domain="com.example", name="foo"),
        h.make_node("Unique", ["x"], ["u"], name="uniq"),
        h.make_node("Cast", ["x"], ["xd"], to=T.DOUBLE, name="to_double"),
    ]
    model = _model(
        nodes,
        [_vi("x", T.FLOAT, ["batch", 4])],
        [_vi("y", T.FLOAT, None), _vi("u", T.FLOAT, None), _vi("xd", T.DOUBLE, None)],
        domains=["com.example"],
    )
    report = check_trt_readiness(model)
    assert {f.node for f in report.errors} == {"foo", "uniq"}
    warnings = {f.node: f for f in _findings(report, "warning")}
    assert "float64" in warnings["to_double"].reason
    assert "x" in warnings and "optimization profile" in warnings["x"].reason


def test_int64_is_narrowed_before_trt10_only():
    model = _model(
        [h.make_node("Add", ["a", "b"], ["c"], name="add64")],
        [_vi("a", T.INT64, [2]), _vi("b", T.INT64, [2])],
        [_vi("c", T.INT64, [2])],
    )
    assert any("narrows" in f.reason for f in check_trt_readiness(model, trt_version="8.6").findings)
    assert not check_trt_readiness(model, trt_version="10.3").findings


def test_merge_plugin_node_is_ready_with_plugin_and_runs_on_ort_reference():
    model = _merge_graph()
    assert mark_plugin_nodes(model) == 1
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in model.graph.node[0].attribute}
    assert attrs["plugin_namespace"] == b"tome_export" and attrs["aot"] == 1
    report = check_trt_readiness(model)
    assert report.ready and report.plugins == ["tome_export::BipartiteMerge"]
    assert _findings(report, "plugin")[0].node == "merge0"
    rng = np.random.default_rng(0)
    feeds = {
        "m": rng.standard_normal((2, 17, 8), dtype=np.float32),
        "x": rng.standard_normal((2, 17, 6), dtype=np.float32),
        "s": (rng.random((2, 17, 1)) + 0.5).astype(np.float32),
    }
    got = OnnxRuntimeRunner(model).run(feeds)
    ref = merge_tokens(*(torch.from_numpy(feeds[k]) for k in "mxs"), 5, 1)
    np.testing.assert_allclose(got["xo"], ref[0].numpy(), atol=1e-6)
    np.testing.assert_array_equal(got["slot"], ref[2].numpy())
    # A graph without the plugin registered: the check says it will not build.
    assert not check_trt_readiness(model, plugins=()).ready


@pytest.mark.parametrize(
    ("device", "expected", "absent"),
    [
        ("jetson-agx-orin", ["--fp16", "--useDLACore=0", "--allowGPUFallback", "--memPoolSize=workspace:4096M"], []),
        ("jetson-orin-nano", ["--fp16", "--memPoolSize=workspace:1024M"], ["--useDLACore=0"]),
        ("nvidia-sm90", ["--fp16", "--timingCacheFile=timing.cache"], ["--useDLACore=0"]),
    ],
)
def test_trtexec_command_follows_profile(device, expected, absent):
    ctx = types.SimpleNamespace(device=get_device(device), manifest={}, precision=None)
    command = trtexec_command(ctx, "model.onnx", "model.plan")
    assert command[:3] == ["trtexec", "--onnx=model.onnx", "--saveEngine=model.plan"]
    assert all(flag in command for flag in expected) and not any(flag in command for flag in absent)


@pytest.mark.parametrize("plugin_nodes", [0, 2])
def test_build_scripts_written(tmp_path, plugin_nodes):
    ctx = types.SimpleNamespace(device=get_device("jetson-orin-nx"), bundle_dir=tmp_path, manifest={}, precision=None)
    written = write_build_scripts(ctx, "model.onnx", plugin_nodes)
    script = (tmp_path / "build_engine.sh").read_text()
    assert (tmp_path / "build_engine.py").is_file()
    if plugin_nodes:
        assert "--merge-plugin" in script and "trtexec" not in script.splitlines()[-1]
        assert {"tome_merge_plugin.py", "triton_merge.py"} <= set(written)
        # Self-contained: the bundled plugin imports and compiles its kernel without tome-export.
        probe = subprocess.run(
            [sys.executable, "-c", "import tome_merge_plugin as p; print(p.compile_merge_kernel((8, 7)).metadata.name)"],
            capture_output=True, text=True, cwd=tmp_path, env={"PATH": os.environ.get("PATH", "")},
        )  # fmt: skip
        assert probe.returncode == 0, probe.stderr[-2000:]
        assert probe.stdout.strip() == "bipartite_merge_kernel"
    else:
        assert script.splitlines()[-1].startswith("trtexec --onnx=model.onnx")
    # The standalone builder says TensorRT is missing with exit 3, no traceback.
    done = subprocess.run(
        [sys.executable, str(tmp_path / "build_engine.py"), "model.onnx", "model.plan"],
        capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        assert done.returncode == 3 and "TensorRT" in done.stderr and "Traceback" not in done.stderr
