"""Benchmark: TDTM speedup and dynamic loading on the reference STDiT (ONNX Runtime, CPU).

One export through the real pipeline (``--method tdtm --dynamic-loading``) of
``samples.stdit:stdit_bench`` (4 blocks, C=1152, 8 frames × 32 tokens, ~470 MB fp32), then:

(a) TDTM: one transformer block (``blocks/block_02.onnx`` vs ``blocks/merged_block_02.onnx``)
    and a full forward, merged vs full, interleaved, medians; a denoising loop (full graph
    every step vs merged graph in the first ``merge_steps``), next to the theoretical MAC ratio.
(b) Dynamic loading, in worker processes that import no PyTorch model: latency of
    all-resident vs load-on-demand without prefetch vs with prefetch (interleaved, medians);
    peak RSS over the process's baseline RSS vs the budget, one process per mode.

Timing: ``bench/harness.py`` (interleaved, medians; ORT sessions of (a) without thread spinning;
the dynamic runner's block sessions are the runtime's own, one compute thread each).
Usage: PYTHONPATH=$PWD python bench/bench_video.py [--budget 320MB] [--runs 5] [--keep DIR]
Prints progress on stderr and ONE JSON object last on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.harness import emit, interleaved, log, ort_runner  # noqa: E402

NUM_STEPS, MERGE_STEPS = 8, 4
THREADS = 1  # dynamic-loading runs: 1 compute thread, the other core loads (2-core box)


def feeds_for(session) -> dict:
    rng = np.random.default_rng(0)
    feeds = {}
    for i in session.get_inputs():
        shape = [d if isinstance(d, int) else 1 for d in i.shape]
        feeds[i.name] = (rng.standard_normal(shape) * (500 if i.name == "timestep" else 1)).astype(np.float32)
    return feeds


def median_s(named: dict, runs: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds per variant, interleaved by the harness."""
    return {name: t.median_ms / 1e3 for name, t in interleaved(named, runs, warmup).items()}


# -- (b) workers ---------------------------------------------------------------------------


def worker(mode: str, bundle: Path, budget: int, runs: int) -> dict:
    from tome_export.runtimes.dynamic import DynamicRunner

    manifest = json.loads((bundle / "manifest.json").read_text())
    feeds = {
        "x": np.random.default_rng(0).standard_normal((1, 256, 8)).astype(np.float32),
        "timestep": np.array([500.0], np.float32),
        "text": np.random.default_rng(1).standard_normal((1, 16, 256)).astype(np.float32),
    }
    if mode == "timing":
        huge = 10**12
        # Each runner gets its own copy of the block files: a session maps its weights file,
        # which pins that file's page cache, and would turn another runner's loads into
        # page-cache hits (on-demand runners drop a block's pages when they unload it).
        copies = {}
        for name in ("all_resident", "on_demand_no_prefetch", "on_demand_prefetch"):
            copies[name] = Path(tempfile.mkdtemp(prefix=f"{name}_", dir=bundle.parent))
            shutil.copytree(bundle / "blocks", copies[name] / "blocks")
        settings = {
            "all_resident": {"budget_bytes": huge},
            "on_demand_no_prefetch": {"budget_bytes": budget, "prefetch": False},
            "on_demand_prefetch": {"budget_bytes": budget, "prefetch": True},
        }
        runners = {
            name: DynamicRunner.from_manifest(copies[name], manifest, intra_op_threads=THREADS, **settings[name])
            for name in settings
        }
        per_block = {name: [] for name in runners}

        def runner_total_s(name: str, _outputs) -> float:
            """The runner's own clock for a timed run; its per-block stats are kept too."""
            stats = runners[name].last_stats
            per_block[name].append(stats.blocks)
            return stats.total_s

        # one warm-up round: all-resident loads everything once there
        timings = interleaved(
            {name: (lambda r=runner: r.run(feeds)) for name, runner in runners.items()},
            runs,
            warmup=1,
            elapsed_s=runner_total_s,
        )
        for runner in runners.values():
            runner.close()
        for copy in copies.values():
            shutil.rmtree(copy, ignore_errors=True)
        samples = {name: [ms / 1e3 for ms in t.samples_ms] for name, t in timings.items()}
        result = {name: t.median_ms / 1e3 for name, t in timings.items()}
        blocks = {}
        for name, runs_blocks in per_block.items():
            count = len(runs_blocks[0])
            blocks[name] = [
                {
                    key: round(statistics.median(getattr(r[i], key) for r in runs_blocks), 4)
                    for key in ("load_s", "wait_s", "compute_s")
                }
                for i in range(count)
            ]
        return {"median_s": result, "samples_s": samples, "per_block_median": blocks}
    runner = DynamicRunner.from_manifest(
        bundle, manifest, budget_bytes=budget, prefetch=(mode == "rss_prefetch"), intra_op_threads=THREADS
    )
    peaks, totals = [], []
    for _ in range(runs):
        runner.run(feeds)
        peaks.append(runner.last_stats.peak_rss_bytes)
        totals.append(runner.last_stats.total_s)
    stats = runner.last_stats
    return {
        "baseline_rss_bytes": stats.baseline_rss_bytes,
        "peak_rss_bytes": max(peaks),
        "peak_rss_over_baseline_bytes": max(peaks) - stats.baseline_rss_bytes,
        "peak_resident_accounted_bytes": stats.peak_resident_block_bytes,
        "median_s": statistics.median(totals),
    }


def run_worker(mode: str, bundle: Path, budget: int, runs: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, __file__, "--worker", mode, "--bundle", str(bundle), "--budget-bytes", str(budget)]
    done = subprocess.run([*cmd, "--runs", str(runs)], env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"worker {mode} failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- main ----------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--budget", default="320MB")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--keep", default=None, help="Reuse/keep the exported bundle here.")
    parser.add_argument("--worker", default=None)
    parser.add_argument("--bundle", default=None)
    parser.add_argument("--budget-bytes", type=int, default=None)
    args = parser.parse_args()
    if args.worker:
        emit(worker(args.worker, Path(args.bundle), args.budget_bytes, args.runs))
        return

    import onnxruntime as ort

    from tome_export.graph_passes.split import parse_bytes
    from tome_export.merging.tdtm import block_flops
    from tome_export.pipeline import ExportOptions, export
    from tome_export.progress import Progress

    budget = parse_bytes(args.budget)
    started = time.perf_counter()
    workdir = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_video_")) / "bundle"
    if not (workdir / "manifest.json").is_file():
        log(f"exporting samples.stdit:stdit_bench → {workdir}")
        options = ExportOptions(
            model="samples.stdit:stdit_bench",
            method="tdtm",
            merge_steps=MERGE_STEPS,
            num_steps=NUM_STEPS,
            dynamic_loading=True,
            memory_budget=args.budget,
            seeds=1,
            out=str(workdir),
        )
        export(options, Progress(quiet=False))
    export_s = time.perf_counter() - started
    manifest = json.loads((workdir / "manifest.json").read_text())
    model_bytes = sum(b["bytes"] for b in manifest["dynamic_loading"]["blocks"])

    # (a) TDTM, ORT's default thread count, no spinning.
    log("(a) TDTM: one block and a full forward, merged vs full")
    sessions = {
        "block_full": ort_runner(workdir / "blocks/block_02.onnx").session,
        "block_merged": ort_runner(workdir / "blocks/merged_block_02.onnx").session,
        "full": ort_runner(workdir / "model.onnx").session,
        "merged": ort_runner(workdir / "model_merged.onnx").session,
    }
    # The two graphs name their tensors differently: random feeds per session, same shapes.
    block_feeds = {n: feeds_for(sessions[f"block_{n}"]) for n in ("full", "merged")}
    block = median_s(
        {name: (lambda n=name: sessions[f"block_{n}"].run(None, block_feeds[n])) for name in ("full", "merged")},
        runs=max(args.runs * 4, 20),
    )
    feeds = feeds_for(sessions["full"])
    forward = median_s({name: (lambda n=name: sessions[n].run(None, feeds)) for name in ("full", "merged")}, args.runs)
    log(f"(a) denoising loop, {NUM_STEPS} steps, TDTM in the first {MERGE_STEPS}")

    def loop(use_tdtm: bool) -> None:
        for step in range(NUM_STEPS):
            sessions["merged" if use_tdtm and step < MERGE_STEPS else "full"].run(None, feeds)

    loops = median_s({"no_merging": lambda: loop(False), "tdtm": lambda: loop(True)}, runs=1, warmup=0)
    flops = block_flops(num_frames=8, spatial=32, dim=1152, text_tokens=16)
    loop_theory = NUM_STEPS / (MERGE_STEPS / forward["full"] * forward["merged"] + (NUM_STEPS - MERGE_STEPS))
    sessions.clear()

    # (b) dynamic loading, fresh processes.
    log(f"(b) dynamic loading, budget {budget / 1e6:.0f} MB, model weights {model_bytes / 1e6:.0f} MB")
    rss_no_prefetch = run_worker("rss_no_prefetch", workdir, budget, 2)
    rss_prefetch = run_worker("rss_prefetch", workdir, budget, 2)
    timing = run_worker("timing", workdir, budget, args.runs)
    med = timing["median_s"]
    result = {
        "machine": "2-core x86 CPU shared with other jobs (noisy), ONNX Runtime " + ort.__version__ + ", fp32, batch 1",
        "model": {
            "name": "samples.stdit:stdit_bench",
            "weights_bytes": model_bytes,
            "frames": 8,
            "spatial_tokens": 32,
            "dim": 1152,
            "depth": 4,
            "export_s": round(export_s, 1),
        },
        "tdtm": {
            "one_block_ms": {k: round(v * 1e3, 2) for k, v in block.items()},
            "one_block_speedup": round(block["full"] / block["merged"], 3),
            "one_block_theoretical_mac_ratio": round(flops["ratio"], 3),
            "forward_ms": {k: round(v * 1e3, 1) for k, v in forward.items()},
            "forward_speedup": round(forward["full"] / forward["merged"], 3),
            "denoising_loop": {
                "num_steps": NUM_STEPS,
                "merge_steps": MERGE_STEPS,
                "s": {k: round(v, 2) for k, v in loops.items()},
                "speedup": round(loops["no_merging"] / loops["tdtm"], 3),
                "expected_from_forward_medians": round(loop_theory, 3),
            },
            "shared_weights": manifest["shared_weights"],
        },
        "dynamic_loading": {
            "budget_bytes": budget,
            "blocks": [
                {"bytes": b["bytes"], "activation_bytes": b["activation_bytes"], "scope": b["scope"]}
                for b in manifest["dynamic_loading"]["blocks"]
            ],
            "intra_op_threads": THREADS,
            "latency_s": {k: round(v, 3) for k, v in med.items()},
            "prefetch_over_all_resident": round(med["on_demand_prefetch"] / med["all_resident"], 3),
            "no_prefetch_over_all_resident": round(med["on_demand_no_prefetch"] / med["all_resident"], 3),
            "per_block_median_s": timing["per_block_median"],
            "peak_rss": {
                "no_prefetch": rss_no_prefetch,
                "prefetch": rss_prefetch,
                "prefetch_over_budget": round(rss_prefetch["peak_rss_over_baseline_bytes"] / budget, 3),
                "no_prefetch_over_budget": round(rss_no_prefetch["peak_rss_over_baseline_bytes"] / budget, 3),
            },
            "runs": args.runs,
        },
        "goals": {
            "prefetch_le_1.15x_all_resident": med["on_demand_prefetch"] <= 1.15 * med["all_resident"],
            "no_prefetch_slower_than_prefetch": med["on_demand_no_prefetch"] > med["on_demand_prefetch"],
            "peak_rss_le_budget_plus_10pct": rss_prefetch["peak_rss_over_baseline_bytes"] <= 1.1 * budget
            and rss_no_prefetch["peak_rss_over_baseline_bytes"] <= 1.1 * budget,
        },
        "total_s": round(time.perf_counter() - started, 1),
    }
    emit(result)


if __name__ == "__main__":
    main()
