"""ONNX Runtime CPU latency of ToMe ViT-S/16 exports at several r, next to eager and FLOPs.

Exports the reference ViT-S/16 (samples/), timm's vit_small_patch16_224 (random
weights; skipped without timm) and the reference ViT-B/16 (``reference_b``) at r in
{0, 8, 13, 16}, then times every variant interleaved in one process with
``bench/harness.py`` (warm-up, then the median of --runs runs; ORT sessions without thread
spinning). ``--batch 8`` times batch 8. ``--profile`` adds, per model, ONNX Runtime's
profiler breakdown at r=0 and the largest r: ms per op type, and per block the merge op's
share and the block's speed-up over its FLOP ratio without the merge op — where the
speed-up falls short of the FLOP ratio (Gemms on few tokens, the merge op's nodes).
Prints one JSON object last.

    python bench/bench_vit_onnx.py [--runs 30] [--models reference,timm,reference_b] [--batch 1] [--profile]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import tome_export  # noqa: E402
from bench.flops import vit_block_flops, vit_flops  # noqa: E402
from bench.harness import emit, interleaved, log, ort_profiling_session, ort_runner  # noqa: E402
from samples.reference_vit import vit_base_patch16_224, vit_small_patch16_224  # noqa: E402
from tome_export.exporter.onnx_export import export_onnx  # noqa: E402
from tome_export.profiling.breakdown import breakdown, node_attribution  # noqa: E402

R_VALUES = (0, 8, 13, 16)


def build(name: str):
    if name == "reference":
        return vit_small_patch16_224()
    if name == "reference_b":
        return vit_base_patch16_224()
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_small_patch16_224", pretrained=False).eval()


def profiled(model, feeds: dict, runs: int) -> dict:
    """ONNX Runtime profiler breakdown (tome_export.profiling.breakdown): ms per run by op
    type and by layer, the merge op's nodes counted apart."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.onnx"
        path.write_bytes(model.SerializeToString())
        session = ort_profiling_session(path, None, str(Path(folder) / "profile"))
        for _ in range(runs):
            session.run(None, feeds)
        events = json.loads(Path(session.end_profiling()).read_text())
    return breakdown(events, node_attribution(model))


def per_block(base: dict, merged: dict, profiles: dict) -> dict:
    """Per transformer block of the merged model vs the same block unmerged: kernel ms
    without the merge op, the merge op's ms and share of the block, and the block's time
    ratio over its FLOP ratio ("efficiency" 1.0 = the block got exactly as much faster as
    its FLOPs shrank; < 1 = slower than its FLOPs say)."""
    state, dim = merged["state"], merged["dim"]
    rows = {}
    for i, (n, r) in enumerate(zip(state.tokens_per_layer, state.r_per_layer, strict=True)):
        layer = f"blocks.{i}"
        if layer not in profiles["r0"]["by_layer"]:
            continue
        unmerged_ms = profiles["r0"]["by_layer"][layer]
        total_ms = profiles["merged"]["by_layer"].get(layer, 0.0)
        merge_ms = profiles["merged"]["merge_by_layer"].get(layer, 0.0)
        rest_ms = total_ms - merge_ms
        n0 = base["state"].tokens_per_layer[i]
        flop_ratio = vit_block_flops(n0, n0, dim) / vit_block_flops(n, n - r, dim)
        rows[layer] = {
            "tokens": [n, n - r],
            "unmerged_ms": round(unmerged_ms, 3),
            "merged_ms": round(total_ms, 3),
            "merge_op_ms": round(merge_ms, 3),
            "merge_share_of_block": round(merge_ms / total_ms, 3) if total_ms else None,
            "flop_ratio": round(flop_ratio, 3),
            "efficiency_without_merge": round((unmerged_ms / rest_ms) / flop_ratio, 3) if rest_ms else None,
        }
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--models", default="reference,timm")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--profile", action="store_true", help="per-op-type times at r=0 and the largest r")
    args = parser.parse_args()
    x = torch.randn(args.batch, 3, 224, 224)
    variants = []
    for model_name in args.models.split(","):
        if model_name == "timm":
            try:
                import timm  # noqa: F401
            except ImportError:
                log("timm not installed: skipping timm model")
                continue
        for r in R_VALUES:
            model = build(model_name)
            tome_export.apply(model, method="tome", r=r)
            exported = export_onnx(model, (x,))
            with torch.no_grad():
                want = model(x)
            state = model._tome_state
            session = ort_runner(exported.model).session
            feeds = {exported.input_names[0]: x.numpy()}
            err = float((torch.from_numpy(session.run(None, feeds)[0]) - want).abs().max())
            dim = model.blocks[0].norm1.normalized_shape[0]
            variants.append(
                {
                    "model": model_name,
                    "r": r,
                    "session": session,
                    "feeds": feeds,
                    "onnx": exported.model,
                    "eager": model,
                    "flops": vit_flops(state.tokens_per_layer, state.r_per_layer, dim),
                    "state": state,
                    "dim": dim,
                    "max_abs_err": err,
                }
            )
            log(f"exported {model_name} r={r} (max abs err {err:.2e})")
    # Variants interleaved round-robin so every one sees the same machine load; ONNX
    # Runtime and torch eager in separate phases, since torch's OpenMP threads keep
    # spinning after a forward and would slow the ORT run that follows.
    names = [f"{v['model']}/r{v['r']}" for v in variants]
    ort_timings = interleaved(
        {n: (lambda v=v: v["session"].run(None, v["feeds"])) for n, v in zip(names, variants)}, args.runs, args.warmup
    )
    with torch.no_grad():
        eager_timings = interleaved(
            {n: (lambda v=v: v["eager"](x)) for n, v in zip(names, variants)}, args.runs, args.warmup
        )
    for name, v in zip(names, variants):
        v["ort"], v["eager_timing"] = ort_timings[name], eager_timings[name]
    results = {}
    for model_name in dict.fromkeys(v["model"] for v in variants):
        rows = [v for v in variants if v["model"] == model_name]
        base = next(v for v in rows if v["r"] == 0)
        base_ms, base_flops = base["ort"].median_ms, base["flops"]
        per_r = {}
        for v in rows:
            ort_ms, eager_ms = v["ort"].median_ms, v["eager_timing"].median_ms
            speedup, flop_ratio = base_ms / ort_ms, base_flops / v["flops"]
            per_r[str(v["r"])] = {
                "ort_cpu_ms": round(ort_ms, 2),
                "ort_cpu_p90_ms": round(v["ort"].p90_ms, 2),
                "speedup_vs_r0": round(speedup, 3),
                "flop_ratio": round(flop_ratio, 3),
                "speedup_over_flop_ratio": round(speedup / flop_ratio, 3),
                "eager_ms": round(eager_ms, 2),
                "ort_speedup_vs_eager": round(eager_ms / ort_ms, 3),
                "max_abs_err_vs_eager": v["max_abs_err"],
            }
        results[model_name] = per_r
        if args.profile:
            merged = rows[-1]
            profiles = {"r0": profiled(base["onnx"], base["feeds"], args.runs)}
            profiles["merged"] = profiled(merged["onnx"], merged["feeds"], args.runs)
            results[model_name]["profile"] = {
                "merged_r": merged["r"],
                "per_op_ms": {key: {op: round(ms, 3) for op, ms in p["by_op"].items()} for key, p in profiles.items()},
                "merge_op_ms": round(profiles["merged"]["merge_ms"], 3),
                "merge_share_of_model": round(profiles["merged"]["merge_share"], 4),
                "coverage": {key: round(p["coverage"], 3) for key, p in profiles.items()},
                "per_block": per_block(base, merged, profiles),
            }
    emit(
        {
            "bench": "vit_onnx_cpu",
            "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.processor() or platform.system()}",
            "onnxruntime": ort.__version__,
            "torch": torch.__version__,
            "runs": args.runs,
            "batch": args.batch,
            "results": results,
        }
    )


if __name__ == "__main__":
    main()
