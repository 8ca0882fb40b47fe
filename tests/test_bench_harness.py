"""The bench timing harness (``bench/harness.py``) and that every bench script uses it."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from bench import harness

BENCH = Path(__file__).resolve().parent.parent / "bench"
SCRIPTS = sorted(p for p in BENCH.glob("*.py") if p.name not in {"__init__.py", "harness.py", "flops.py"})


def test_interleaved_warms_up_then_round_robins_with_rotating_order():
    calls = []
    variants = {name: (lambda n=name: calls.append(n)) for name in ("a", "b", "c")}
    timings = harness.interleaved(variants, runs=3, warmup=1)
    assert calls == ["a", "b", "c", "b", "c", "a", "c", "a", "b", "a", "b", "c"]
    assert {name: len(t.samples_ms) for name, t in timings.items()} == {"a": 3, "b": 3, "c": 3}
    with pytest.raises(ValueError):
        harness.interleaved(variants, runs=0)


def test_interleaved_syncs_around_each_call_and_can_use_the_variants_own_clock():
    events = []
    variants = {"x": lambda: events.append("run") or 0.002, "y": lambda: events.append("run") or 0.004}
    timings = harness.interleaved(
        variants, runs=2, warmup=0, sync=lambda: events.append("sync"), elapsed_s=lambda name, got: got
    )
    assert events == ["sync", "run", "sync"] * 4
    assert timings["x"].samples_ms == pytest.approx([2.0, 2.0]) and timings["y"].median_ms == pytest.approx(4.0)


def test_statistics_and_ratios():
    timing = harness.Timing(list(map(float, range(1, 12))))  # 1..11 ms
    assert timing.median_ms == 6.0 and timing.p10_ms == 2.0 and timing.p90_ms == 10.0
    timings = {"base": harness.Timing([10.0, 30.0, 20.0]), "fast": harness.Timing([5.0, 5.0, 50.0])}
    assert harness.medians(timings) == {"base": 20.0, "fast": 5.0}
    assert harness.medians(timings, scale=1e-3) == {"base": 0.02, "fast": 0.005}
    assert harness.ratios(harness.medians(timings), "base") == {"fast/base": 0.25}


def test_ort_runner_sessions_do_not_spin(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    runner = harness.ort_runner(model, threads=2)
    assert harness.session_config(runner.session) == harness.SPIN_OFF
    import onnxruntime as ort

    default = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert set(harness.session_config(default).values()) == {None}  # the check can tell the difference
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    assert harness.session_config(harness.ort_runner(path).session) == harness.SPIN_OFF


def test_emit_prints_one_json_object_last(capsys):
    print("progress")
    harness.emit({"median_ms": {"a": 1.5}})
    lines = capsys.readouterr().out.strip().splitlines()
    assert json.loads(lines[-1]) == {"median_ms": {"a": 1.5}}


UNTIMED = {"naive_trap.py", "bench_trt_build.py"}  # accuracy only; engine build times (nothing runs)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_every_bench_script_times_and_prints_through_the_harness(script):
    tree = ast.parse(script.read_text())
    imported = {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module == "bench.harness"
        for alias in node.names
    }
    assert "emit" in imported, f"{script.name}: print the JSON through bench.harness.emit"
    if script.name not in UNTIMED:
        assert "interleaved" in imported, f"{script.name}: time variants with bench.harness.interleaved"
    source = ast.unparse(tree)
    own = [needle for needle in ("json.dumps(", "InferenceSession(", "SessionOptions(") if needle in source]
    assert not own, f"{script.name} builds its own {own}: use bench.harness (emit, ort_runner)"
