"""The cost model: predictions on known schedules, the export warning, tune's pruning, profile's column."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tome_export import cost_model as cm
from tome_export.profiling.report import summarize, table

pytest_plugins = ["tests.bundle_fixtures"]
TINY = "samples.reference_vit:vit_tiny_test"
VIT_S = cm.ModelShape(dim=384, heads=6, mlp_ratio=4.0)
# Every FLOP costs the same and the merge nothing: time is proportional to FLOPs.
FLOPS_ONLY = cm.Coefficients(name="flops-only", block={"linear_gflop": 1.0, "attention_gflop": 1.0})
EXPENSIVE_MERGE = cm.Coefficients(
    name="expensive-merge", block={"linear_gflop": 1.0, "attention_gflop": 1.0}, merge={"fixed": 1e3}
)


def _plan(tokens: int, depth: int, r: int, protected: int = 1):
    return cm.constant_plan(tokens, depth, r, protected)


def _block_flops(n: int, r: int, c: int, hidden: int) -> int:
    """By hand: QKV (3C) + projection (C) at n tokens, MLP at n − r, QKᵀ and AV at n."""
    return 2 * n * c * 3 * c + 2 * n * c * c + 2 * 2 * (n - r) * c * hidden + 2 * 2 * n * n * c


def test_flop_ratio_of_a_known_schedule_by_hand():
    tokens, r_per_layer = [100, 90, 80], [10, 10, 0]
    prediction = cm.predict(tokens, r_per_layer, VIT_S, FLOPS_ONLY)
    merged = sum(_block_flops(n, r, 384, 1536) for n, r in zip(tokens, r_per_layer))
    unmerged = 3 * _block_flops(100, 0, 384, 1536)
    assert prediction.flops == pytest.approx(merged) and prediction.unmerged_flops == pytest.approx(unmerged)
    assert prediction.flop_ratio == pytest.approx(unmerged / merged)
    assert cm.predict([197] * 12, [0] * 12, VIT_S, FLOPS_ONLY).speedup == pytest.approx(1.0)


@settings(max_examples=40, deadline=None)
@given(
    tokens=st.integers(4, 3000),
    depth=st.integers(1, 24),
    r=st.integers(0, 200),
    heads=st.sampled_from([1, 3, 6, 12]),
    mlp_ratio=st.sampled_from([2.0, 4.0, 8 / 3]),
    stem=st.floats(0, 5),
)
def test_without_merge_cost_the_prediction_is_the_flop_ratio(tokens, depth, r, heads, mlp_ratio, stem):
    shape = cm.ModelShape(dim=64 * heads, heads=heads, mlp_ratio=mlp_ratio, stem_gflop=stem)
    prediction = cm.predict(*_plan(tokens, depth, r), shape, FLOPS_ONLY)
    assert prediction.speedup == pytest.approx(prediction.flop_ratio, rel=1e-9)
    assert prediction.speedup >= 1.0 - 1e-12 and sum(prediction.merge_ms) == 0


def test_shipped_coefficients_say_tiny_r_on_huge_n_does_not_pay_and_vit_s_r16_does():
    shipped = cm.coefficients_for("cpu", "onnx")
    assert shipped is not None and shipped.machine and shipped.calibrated
    assert all(v >= 0 for v in (*shipped.block.values(), *shipped.merge.values()))
    huge = cm.predict(*_plan(4097, 12, 1), VIT_S, shipped)  # 1024×1024 / 16: r=1 saves nothing
    assert huge.speedup < 1.0 and sum(huge.merge_ms) > 0
    vit_s16 = cm.predict(*_plan(197, 12, 16), VIT_S, shipped)
    assert vit_s16.speedup > 1.3 and vit_s16.speedup < vit_s16.flop_ratio * 1.1
    dinov2_r32 = cm.predict(*_plan(1370, 12, 32), VIT_S, shipped)
    assert dinov2_r32.speedup > cm.predict(*_plan(1370, 12, 8), VIT_S, shipped).speedup


def test_warning_line_says_why_and_what_to_try():
    line = cm.warning_line(*_plan(4097, 12, 1), 1, VIT_S, EXPENSIVE_MERGE)
    assert line is not None and "\n" not in line
    assert line.startswith("warning: r=1 on 4097 tokens saves 0% of FLOPs and the merge costs")
    assert "expect ≈" in line and ("try --r ≥" in line or "--r 0" in line)
    assert cm.warning_line(*_plan(197, 12, 16), 1, VIT_S, FLOPS_ONLY) is None
    assert cm.warning_line(*_plan(197, 12, 0), 1, VIT_S, EXPENSIVE_MERGE) is None  # nothing merged: nothing to say
    # With the merge free, a larger r is suggested whenever the asked one saves too little.
    small = cm.warning_line(*_plan(197, 12, 1), 1, VIT_S, FLOPS_ONLY)
    assert small is not None and "try --r ≥ " in small


def test_coefficients_table_round_trips(tmp_path):
    import json

    path = tmp_path / "table.json"
    path.write_text(json.dumps({"profiles": {"other": {"devices": ["apple-a17-pro"], "targets": ["coreml"]}}}))
    cm.write_coefficients(EXPENSIVE_MERGE, path)
    assert cm.coefficients_for("cpu", "onnx", path) == EXPENSIVE_MERGE
    assert cm.coefficients_for("apple-a17-pro", "coreml", path).name == "other"  # other entries kept
    assert cm.coefficients_for("jetson-orin-nano", "trt", path) is None


def test_bundle_records_its_shape_and_profile_shows_predicted_next_to_measured(tiny_bundle):
    from tome_export.bundle import read_manifest

    manifest = read_manifest(tiny_bundle)
    entry = manifest["merge"]["cost_model"]
    assert entry["shape"] == {"dim": 64, "heads": 4, "mlp_ratio": 4.0, "stem_gflop": pytest.approx(2 * 64 * 64 * 192 / 1e9)}
    predicted = cm.predicted_for(manifest, "cpu")
    assert predicted is not None and predicted["speedup_vs_r0"] == pytest.approx(entry["predicted_speedup"], rel=1e-3)
    assert cm.predicted_for(manifest, "jetson-orin-nano") is None  # no coefficients for it
    # A tampered manifest is not believed: bad numbers give no prediction, never an exception.
    for bad in ({"dim": "64"}, {"dim": -1}, {"dim": math.nan}, {"heads": 0}, None):
        shape = None if bad is None else {**entry["shape"], **bad}
        tampered = {**manifest, "merge": {**manifest["merge"], "cost_model": {"shape": shape}}}
        assert cm.predicted_for(tampered, "cpu") is None
    tampered = {**manifest, "merge": {**manifest["merge"], "tokens_per_layer": ["65", 57]}}
    assert cm.predicted_for(tampered, "cpu") is None
    record = {
        "device": "cpu", "model": TINY, "method": "tome", "target": "onnx", "tool_version": "t", "batch_size": 2,
        "created": "2026-11-24T00:00:00+00:00", "latency_ms": {"median": 2.0}, "predicted": {"speedup_vs_r0": 1.23},
    }  # fmt: skip
    rows = summarize(
        [{**record, "schedule": "r=0", "r": 0, "predicted": None}, {**record, "schedule": "r=8", "r": 8}]
    )
    text = table(rows)
    assert "predicted" in text.splitlines()[0] and "1.23×" in text


def test_export_warns_in_one_line_when_merging_does_not_pay(cli, tmp_path):
    result = cli(TINY, "--r", "1", "-o", str(tmp_path / "r1"), "--seeds", "1", "-q")
    assert result.returncode == 0, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: r=1 on 65 tokens saves"), result.stderr
    assert "expect ≈0." in lines[0] and "Traceback" not in result.stderr and (tmp_path / "r1" / "manifest.json").is_file()


def test_export_hook_does_not_warn_for_vit_s_r16_and_the_cli_prints_nothing_without_a_merge(cli, tmp_path):
    import torch

    from samples.reference_vit import vit_small_patch16_224
    from tome_export.merging import apply, merge_state

    model = apply(vit_small_patch16_224(), "tome", r=16)  # what export() hands the hook, minus the export
    with torch.no_grad():
        model(torch.zeros(1, 3, 224, 224))
    entry = cm.manifest_entry(model, merge_state(model).info(), [(1, 3, 224, 224)], "cpu", "onnx")
    assert entry["warning"] is None and entry["predicted_speedup"] > 1.3
    assert entry["shape"]["dim"] == 384 and entry["shape"]["heads"] == 6
    result = cli(TINY, "--r", "0", "-o", str(tmp_path / "r0"), "--seeds", "1", "-q")
    assert result.returncode == 0 and result.stderr.strip() == "", result.stderr


def _counting_export(monkeypatch) -> list[int]:
    import tome_export.pipeline as pipeline

    exported, real = [], pipeline.export

    def export(options, progress=None):
        exported.append(options.r)
        return real(options, progress)

    monkeypatch.setattr(pipeline, "export", export)
    return exported


def test_tune_does_not_export_a_candidate_predicted_not_to_pay(tmp_path, monkeypatch):
    from tome_export.profiling import ResultStore
    from tome_export.profiling.tune import tune

    exported = _counting_export(monkeypatch)
    with ResultStore(tmp_path / "r.sqlite") as store:
        decision = tune(TINY, "cpu", 1e6, [0, 2], store, runs=3, warmup=1, coefficients=EXPENSIVE_MERGE)
    assert exported == [0]
    assert [p["r"] for p in decision["points"]] == [0] and decision["choice"]["r"] == 0
    assert [p["r"] for p in decision["pruned"]] == [2] and "slower than the unmerged" in decision["pruned"][0]["why"]


def test_tune_skips_candidates_predicted_over_budget_but_measures_the_fastest(tmp_path, monkeypatch):
    from tome_export.profiling import ResultStore
    from tome_export.profiling.tune import tune

    exported = _counting_export(monkeypatch)
    with ResultStore(tmp_path / "r.sqlite") as store:
        decision = tune(TINY, "cpu", 1e-6, [0, 8, 16], store, runs=3, warmup=1, coefficients=FLOPS_ONLY)
    assert exported == [0, 16]  # r=0 anchors the prediction; r=16 is predicted fastest: measured
    assert not decision["met"] and decision["fastest"]["r"] in (0, 16)
    assert [p["r"] for p in decision["pruned"]] == [8] and "over the" in decision["pruned"][0]["why"]
    assert decision["pruned"][0]["predicted_ms"] > 0
