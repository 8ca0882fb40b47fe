"""Profiling: latency statistics, ORT breakdown accounting, the SQLite store, report, tune, CLI errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import REPO
from tome_export.cli import run as cli_run
from tome_export.errors import UserError
from tome_export.profiling import ResultStore, latency_stats, medians_consistent, profile_bundle
from tome_export.profiling.breakdown import INSERTED, NodeInfo, breakdown, node_attribution
from tome_export.profiling.report import summarize, table
from tome_export.profiling.store import default_db_path, read_results_file, results_document
from tome_export.profiling.tune import choose, parse_budget, tune

pytest_plugins = ["tests.bundle_fixtures"]  # the session-wide tiny_bundle fixture
TINY = "samples.reference_vit:vit_tiny_test"

# -- accounting ----------------------------------------------------------------------------


def _kernel(name: str, op: str, ts: int, dur: int) -> dict:
    return {"cat": "Node", "name": f"{name}_kernel_time", "ts": ts, "dur": dur, "args": {"op_name": op}}


def test_breakdown_accounts_every_kernel_by_layer_and_merge():
    table_ = {
        "node_MatMul_1": NodeInfo("blocks.0", False),
        "node_TopK_2": NodeInfo("blocks.0", True),
        "node_ScatterElements_3": NodeInfo("blocks.1", True),
    }
    events = []
    for start in (0, 1000):  # two runs of 100 µs; kernels fill 94 and 99 µs
        events.append({"cat": "Session", "name": "model_run", "ts": start, "dur": 100})
        events += [
            _kernel("node_MatMul_1/MatMulAddFusion", "FusedMatMul", start + 1, 45),  # renamed by ORT fusion
            _kernel("node_TopK_2", "TopK", start + 46, 20),
            _kernel("node_ScatterElements_3", "ScatterElements", start + 66, 25),
            _kernel("gemm_input_reshape_token_7", "Reshape", start + 91, 9 if start else 4),  # inserted by ORT
        ]
    events.append(_kernel("node_TopK_2", "TopK", 5000, 999))  # outside any run: ignored
    result = breakdown(events, table_)
    assert result["profiled_runs"] == 2
    assert result["by_layer"] == pytest.approx({"blocks.0": 0.065, "blocks.1": 0.025, INSERTED: 0.0065})
    assert result["merge_ms"] == pytest.approx(0.045)
    assert result["merge_share"] == pytest.approx(0.045 / 0.0965)
    assert sum(result["by_op"].values()) == pytest.approx(0.0965)
    assert result["coverage"] == pytest.approx(0.94) and result["consistent"]  # fastest run: a tie → the first
    gappy = [e for e in events if not e["name"].startswith("node_ScatterElements")]
    assert not breakdown(gappy, table_)["consistent"]  # kernels cover 69% of the run


@settings(max_examples=25, deadline=None)
@given(st.lists(st.floats(0.0005, 0.05), min_size=3, max_size=60))
def test_latency_stats_are_ordered_and_self_consistent(seconds):
    stats = latency_stats(seconds)
    assert stats["min"] <= stats["p10"] <= stats["median"] <= stats["p90"] <= stats["max"]
    assert stats["spread"] == pytest.approx(stats["p90"] - stats["p10"])
    assert medians_consistent(stats, stats)
    shifted = {**stats, "median": stats["median"] + stats["spread"] + 1.0}
    assert not medians_consistent(stats, {**shifted, "spread": stats["spread"]})


def test_merge_nodes_found_from_exporter_metadata(tiny_bundle):
    model = onnx.load(str(tiny_bundle / "model.onnx"))
    table_ = node_attribution(model)
    merge_layers = {info.layer for info in table_.values() if info.is_merge}
    assert merge_layers == {"blocks.0", "blocks.1", "blocks.2", "blocks.3"}
    merge_ops = {n.op_type for n in model.graph.node if table_[n.name].is_merge}
    # the lean scatter graph: TopK picks edges, rows are gathered, merged rows summed by
    # ScatterElements(add) (or a one-hot MatMul where ONE_HOT_MAX_ROWS allows)
    assert {"TopK", "GatherElements"} <= merge_ops and merge_ops & {"MatMul", "ScatterElements"}
    assert not any(table_[n.name].is_merge for n in model.graph.node if n.op_type == "Softmax")


# -- measuring a real bundle ---------------------------------------------------------------


def test_profile_record_breakdown_and_derived_fields(tiny_bundle):
    # No timing is asserted: CI runs tests in parallel on 2 cores, so two profiles of the same
    # bundle can differ 3x; the repeatability rule itself is tested on fixed numbers above.
    (rec,) = profile_bundle(tiny_bundle, runs=10, warmup=2, with_fidelity=False)
    b = rec["breakdown"]
    assert set(b["by_layer"]) >= {"blocks.0", "blocks.3"}
    assert 0 < b["merge_share"] < 1 and 0 < b["coverage"] <= 1.05
    assert sum(b["by_layer"].values()) == pytest.approx(sum(b["by_op"].values()))
    assert rec["throughput_per_s"] == pytest.approx(2 / (rec["latency_ms"]["median"] / 1e3))
    assert rec["latency_ms"]["p10"] <= rec["latency_ms"]["median"] <= rec["latency_ms"]["p90"]
    assert rec["memory"]["rss_increase_mb"] is not None


@pytest.fixture(scope="module")
def sweep_db(tiny_bundle, tmp_path_factory) -> tuple[Path, list[dict]]:
    db = tmp_path_factory.mktemp("db") / "results.sqlite"
    records = profile_bundle(tiny_bundle, runs=10, warmup=2, sweep=[0, 8], trust_source=True)  # r=8 is the bundle itself
    with ResultStore(db) as store:
        store.add(records)
    return db, records


def test_sweep_reexports_and_measures_fidelity(sweep_db):
    _, (unmerged, merged) = sweep_db
    assert (unmerged["r"], merged["r"]) == (0, 8)
    assert unmerged["batch_size"] == merged["batch_size"] == 2 and unmerged["input_shape"] == [[2, 3, 64, 64]]
    assert unmerged["fidelity"]["cosine"] == pytest.approx(1.0, abs=1e-6)
    assert unmerged["fidelity"]["top1_agreement"] == 1.0 and unmerged["breakdown"]["merge_ms"] == 0
    assert merged["fidelity"]["cosine"] < unmerged["fidelity"]["cosine"] and merged["breakdown"]["merge_ms"] > 0
    assert merged["r_per_layer"] == [8, 8, 8, 8] and unmerged["r_per_layer"] == []


def test_tune_picks_best_fidelity_within_budget_from_stored_points(sweep_db):
    db, (unmerged, merged) = sweep_db
    with ResultStore(db) as store:
        roomy = tune(TINY, "cpu", 1e6, [0, 8], store)
        tight = tune(TINY, "cpu", 1e-6, [0, 8], store)
    assert roomy["met"] and roomy["choice"]["r"] == 0 and all(p["from"] == "database" for p in roomy["points"])
    assert not tight["met"] and tight["fastest"]["median_ms"] == min(
        unmerged["latency_ms"]["median"], merged["latency_ms"]["median"]
    )
    points = [
        {"r": 0, "median_ms": 30, "cosine": 1.0},
        {"r": 8, "median_ms": 19, "cosine": 0.99},
        {"r": 16, "median_ms": 12, "cosine": 0.9},
    ]
    assert choose(points, 20)["r"] == 8 and choose(points, 10) is None
    assert parse_budget("20ms") == 20 and parse_budget("0.02s") == 20 and parse_budget("500us") == 0.5
    with pytest.raises(UserError):
        parse_budget("fast")


def test_cli_tune_exits_1_when_no_candidate_meets_the_budget(sweep_db, capsys):
    db, _ = sweep_db
    args = ["tune", TINY, "--device", "cpu", "--candidates", "0,8", "--input-shape", "2,3,64,64", "--db", str(db)]
    assert cli_run([*args, "--latency-budget", "1us", "-q"]) == 1
    assert cli_run([*args, "--latency-budget", "1000s", "-q"]) == 0
    capsys.readouterr()


def test_report_json_import_roundtrip_and_plots(sweep_db, tmp_path, capsys):
    db, records = sweep_db
    assert cli_run(["report", "--db", str(db), "--json", "--plots", str(tmp_path / "plots"), "-q"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert len(document["results"]) == len(records) and len(document["summary"]) == 2
    for png in ("latency_vs_ratio.png", "layers_cpu_samples.reference_vit_vit_tiny_test_bs2.png"):
        assert (tmp_path / "plots" / png).read_bytes()[:4] == b"\x89PNG"
    # The same document, "measured on a Jetson", imports into another database.
    for rec in document["results"]:
        rec.update(device="jetson-orin-nano", id=rec["id"] + "-jetson")
    (tmp_path / "jetson.json").write_text(json.dumps(results_document(document["results"])))
    other = tmp_path / "other.sqlite"
    assert cli_run(["import-results", str(tmp_path / "jetson.json"), "--db", str(other), "-q"]) == 0
    assert cli_run(["import-results", str(tmp_path / "jetson.json"), "--db", str(other)]) == 0
    assert "imported 0 new" in capsys.readouterr().err
    assert cli_run(["report", "--db", str(other), "--import", str(db.parent / "none.json")]) == 2
    with ResultStore(other) as store:
        assert len(store.records()) == 2
        store.add(records)
        rows = summarize(store.records())
    assert {row["device"] for row in rows} == {"cpu", "jetson-orin-nano"}
    text = table(rows)
    assert "jetson-orin-nano" in text and "1.00×" in text  # speed-up of r=0 against itself


def test_bad_results_file(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"schema": "tome-export-results", "schema_version": 1, "results": [{"device": "x"}]}))
    with pytest.raises(UserError, match="result #0 lacks"):
        read_results_file(path)


# -- the store under concurrent writers ------------------------------------------------------

_WRITER = """
import sys, uuid
from tome_export.profiling.store import ResultStore
store = ResultStore(sys.argv[1])
for i in range(int(sys.argv[3])):
    store.add([{"id": uuid.uuid4().hex, "created": "2026-01-01T00:00:00", "device": sys.argv[2], "model": "m",
                "method": "tome", "schedule": f"r={i}", "r": i, "target": "onnx", "tool_version": "t",
                "batch_size": 1, "latency_ms": {"median": 1.0}}])
"""


def test_store_survives_two_concurrent_writers(tmp_path):
    db, per_writer = tmp_path / "shared.sqlite", 150
    env = {"PYTHONPATH": str(REPO)}
    writers = [
        subprocess.Popen([sys.executable, "-c", _WRITER, str(db), name, str(per_writer)], env=env, cwd=REPO)
        for name in ("writer-a", "writer-b")
    ]
    assert [w.wait(timeout=120) for w in writers] == [0, 0]
    with ResultStore(db) as store:
        assert len(store.records(device="writer-a")) == per_writer
        assert len(store.records(device="writer-b")) == per_writer


def test_default_db_respects_xdg_cache_home(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_db_path() == tmp_path / "tome-export" / "results.sqlite"


# -- bad input: one line, exit 2 -------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--sweep", "r=-1", "--trust-source"], "out of range"),
        (["--sweep", "r=33", "--trust-source"], "r must be in 0..32"),
        (["--sweep", "r=0,8"], "pass --trust-source"),
        (["--sweep", "ratio=3"], "use r=0,8,16"),
        (["--device", "no-such-device"], "unknown device 'no-such-device'"),
        (["--db", "FILE/sub/results.sqlite"], "cannot write the results database"),
    ],
)
def test_profile_bad_input_is_one_line_exit_2(tiny_bundle, tmp_path, capsys, args, message):
    (tmp_path / "FILE").write_text("a file, not a folder")
    args = [a.replace("FILE", str(tmp_path / "FILE")) for a in args]
    if "--db" not in args:
        args += ["--db", str(tmp_path / "r.sqlite")]
    assert cli_run(["profile", str(tiny_bundle), *args, "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0], err


def test_profile_not_a_bundle_and_tune_bad_budget(tmp_path, capsys):
    assert cli_run(["profile", str(tmp_path), "--db", str(tmp_path / "r.sqlite")]) == 2
    assert (
        cli_run(["tune", TINY, "--device", "cpu", "--latency-budget", "soon", "--db", str(tmp_path / "r.sqlite")]) == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert "manifest.json is missing" in err[0] and "--latency-budget 'soon'" in err[1]


def test_cli_profile_json_on_stdout_progress_on_stderr(tiny_bundle, tmp_path, cli):
    result = cli(
        "profile",
        str(tiny_bundle),
        "--runs",
        "5",
        "--warmup",
        "1",
        "--no-fidelity",
        "--json",
        "--db",
        str(tmp_path / "r.sqlite"),
    )
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["schema"] == "tome-export-results" and len(document["results"]) == 1
    assert "measuring r=8, batch 2" in result.stderr
