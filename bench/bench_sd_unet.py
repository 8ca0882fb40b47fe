"""Stable Diffusion UNets at their real size on ONNX Runtime CPU: unmerged vs tomesd vs ToDo.

Phase 1, export: every variant is exported by the CLI in its own process under
``/usr/bin/time -v`` (wall time and peak RSS of export + verification, as a user runs it).
Phase 2, FLOPs: the eager model with forward hooks counts Linear/Conv FLOPs at the token
counts each layer actually sees, plus attention's QKᵀ and AV (Nq·Nkv·D each): the FLOP
ratio of a merged UNet, merge/downsample overhead excluded.
Phase 3, timing: rounds of (variant A, B, C) — interleaved, one ONNX Runtime session alive
at a time (an SD-1.5 session holds 3.4 GB), each created, warmed up once, timed once, freed;
no thread spinning. Medians over ``--runs`` rounds; speed-up = median unmerged / median.
Phase 4, where the time goes: one profiled run per variant, top 10 ONNX op types.

Prints one JSON object last. On 2 cores the full SD-1.5 UNet needs ≈ 9 GB and 20–40 min
(``PYTHONPATH=. python bench/bench_sd_unet.py --model sd15``); SDXL (``--model sdxl``:
tomesd/ToDo at ``--max-downsample 2``, its first attention level) ≈ 22 GB and ≈ 1 h; a quick
check at a quarter of the width: ``--width 0.25 --runs 2``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.harness import emit, interleaved, log, ort_profiling_session, ort_runner  # noqa: E402
from samples import tiny_unet  # noqa: E402

CONFIGS = {"sd15": tiny_unet.SD15_CONFIG, "sd21": tiny_unet.SD21_CONFIG, "sdxl": tiny_unet.SDXL_CONFIG}
METHOD_ARGS = {
    "none": ["--method", "none"],
    # --pin-decisions: a near-tie flipped by MatMul rounding is diagnosed, not a failure
    "tomesd": ["--method", "tomesd", "--ratio", "0.5", "--pin-decisions"],
    "todo": ["--method", "todo", "--downsample", "2"],
}


def unet() -> nn.Module:
    """Factory the CLI loads (``bench.bench_sd_unet:unet``): config from the environment."""
    config = CONFIGS[os.environ.get("BENCH_SD_MODEL", "sd15")]
    width = float(os.environ.get("BENCH_SD_WIDTH", "1"))
    latent = int(os.environ.get("BENCH_SD_LATENT", "0")) or None
    return tiny_unet.published(config, width=width, sample_size=latent)


def export_variant(method: str, out: Path, env: dict, seeds: int, extra: list[str]) -> dict:
    command = ["/usr/bin/time", "-v", sys.executable, "-m", "tome_export", "bench.bench_sd_unet:unet"]
    command += [*METHOD_ARGS[method], *extra, "--seeds", str(seeds), "-o", str(out), "-q"]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)
    result = {
        "exit": done.returncode,
        "export_s": round(wall, 1),
        "peak_rss_gb": int(rss.group(1)) / 2**20 if rss else None,
    }
    if done.returncode != 0:
        result["error"] = [line for line in done.stderr.splitlines() if line.startswith("error")][:1] or done.stderr[
            -500:
        ]
        return result
    manifest = json.loads((out / "manifest.json").read_text())
    verification = manifest["verification"]
    result.update(
        verified=verification.get("passed"),
        max_abs_err=verification.get("max_abs_err"),
        decision_agreement_min=min(verification.get("decision_agreement") or [1.0]),
        pinned=verification.get("pinned"),
        external_data=manifest.get("external_data"),
        bytes=sum(a["bytes"] for a in manifest["artifacts"].values()),
        merge={k: manifest["merge"].get(k) for k in ("tokens_per_layer", "r_per_layer", "kv_tokens_per_layer")},
    )
    return result


def count_flops(model: nn.Module, inputs: tuple) -> float:
    """FLOPs (2 per multiply-add) of Linear, Conv2d and attention cores at the token counts seen."""
    total = [0.0]

    def linear(module, args, output):
        total[0] += 2.0 * (args[0].numel() // module.in_features) * module.in_features * module.out_features

    def conv(module, args, output):
        per_output = (module.in_channels // module.groups) * module.kernel_size[0] * module.kernel_size[1]
        total[0] += 2.0 * output.numel() * per_output

    def attention(module, args, kwargs, output):
        hidden = args[0] if args else kwargs["hidden_states"]
        context = kwargs.get("encoder_hidden_states")
        context = hidden if context is None else context
        inner = module.to_q.out_features
        total[0] += 2 * 2.0 * hidden.shape[0] * hidden.shape[1] * context.shape[1] * inner

    handles = []
    for module in model.modules():
        if isinstance(module, nn.Linear):
            handles.append(module.register_forward_hook(linear))
        elif isinstance(module, nn.Conv2d):
            handles.append(module.register_forward_hook(conv))
        elif type(module).__name__ == "Attention" and hasattr(module, "to_q"):
            handles.append(module.register_forward_hook(attention, with_kwargs=True))
    with torch.no_grad():
        model(*inputs)
    for handle in handles:
        handle.remove()
    return total[0]


def flops_per_variant(methods: list[str], max_downsample: int = 1) -> dict[str, float]:
    import tome_export
    from tome_export.exporter.diffusers_source import adapt
    from tome_export.inputs import make_inputs

    with torch.device("meta"):  # shapes are all the count needs: no weights, no compute
        model = adapt(unet())
    inputs = tuple(t.to("meta") for t in make_inputs(model, model.default_input_shapes, 0))
    options = {
        "none": {},
        "tomesd": {"ratio": 0.5, "max_downsample": max_downsample},
        "todo": {"downsample": 2.0, "max_downsample": max_downsample},
    }
    flops = {}
    for method in methods:
        tome_export.apply(model, method=method, **options[method])
        flops[method] = count_flops(model, inputs)
    del model
    return flops


def _feeds(bundle: Path, seed: int) -> dict:
    import numpy as np

    manifest = json.loads((bundle / "manifest.json").read_text())
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in manifest["inputs"]:
        shape = tuple(spec["shape"])
        if spec["dtype"].startswith("int"):
            feeds[spec["name"]] = np.asarray(rng.integers(0, 1000, shape), dtype=spec["dtype"])
        else:
            feeds[spec["name"]] = rng.standard_normal(shape).astype(spec["dtype"])
    return feeds


def time_interleaved(bundles: dict[str, Path], runs: int, threads: int, warmup: bool) -> dict[str, list[float]]:
    """Rounds of every variant through the harness; one session alive at a time (the UNets are
    GBs), so each variant times only its own run (session creation and the warm-up run excluded)."""
    import gc

    rounds = defaultdict(int)

    def variant(name: str, bundle: Path):
        def run() -> float:
            runner, feeds = ort_runner(str(bundle / "model.onnx"), threads), _feeds(bundle, rounds[name])
            rounds[name] += 1
            if warmup:
                runner.run(feeds)  # first-run allocations
            start = time.perf_counter()
            runner.run(feeds)
            elapsed = time.perf_counter() - start
            log(f"  {name}: {elapsed * 1000:.0f} ms")
            del runner
            gc.collect()
            return elapsed

        return run

    timings = interleaved(
        {name: variant(name, bundle) for name, bundle in bundles.items()},
        runs,
        warmup=0,
        elapsed_s=lambda name, returned: returned,
    )
    return {name: [ms / 1000 for ms in timing.samples_ms] for name, timing in timings.items()}


def top_ops(bundle: Path, threads: int, workdir: Path, count: int = 10) -> list[dict]:
    session = ort_profiling_session(bundle / "model.onnx", threads, str(workdir / f"profile_{bundle.name}"))
    feeds = _feeds(bundle, 0)
    session.run(None, feeds)
    events = json.loads(Path(session.end_profiling()).read_text())
    per_op = defaultdict(float)
    for event in events:
        if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time"):
            per_op[event["args"].get("op_name", "?")] += event["dur"] / 1000  # ms, one run
    total = sum(per_op.values())
    ranked = sorted(per_op.items(), key=lambda item: -item[1])[:count]
    return [{"op": op, "ms": round(ms, 1), "share": round(ms / total, 3)} for op, ms in ranked]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(CONFIGS), default="sd15")
    parser.add_argument("--width", type=float, default=1.0, help="scale every block's channels (memory checks)")
    parser.add_argument("--latent", type=int, default=0, help="latent side (default: the config's)")
    parser.add_argument("--methods", default="none,tomesd,todo")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seeds", type=int, default=1, help="verification seeds per export")
    parser.add_argument(
        "--no-warmup", action="store_true", help="time each fresh session's first run (full size: ~30 s runs)"
    )
    parser.add_argument("--workdir", default=None, help="where bundles go (default: a temporary folder)")
    parser.add_argument(
        "--max-downsample",
        type=int,
        default=None,
        help="tomesd/ToDo depth (default 1; SDXL: 2, its first attention level)",
    )
    parser.add_argument("--export-args", default="", help="extra CLI options")
    args = parser.parse_args()
    methods = args.methods.split(",")
    max_downsample = args.max_downsample or (2 if args.model == "sdxl" else 1)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_sd_unet."))
    workdir.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "BENCH_SD_MODEL": args.model,
        "BENCH_SD_WIDTH": str(args.width),
        "BENCH_SD_LATENT": str(args.latent),
    }
    os.environ.update({k: env[k] for k in ("BENCH_SD_MODEL", "BENCH_SD_WIDTH", "BENCH_SD_LATENT")})
    exports, bundles = {}, {}
    for method in methods:
        out = workdir / method
        print(f"exporting {method} …", file=sys.stderr, flush=True)
        depth = [] if method == "none" else ["--max-downsample", str(max_downsample)]
        exports[method] = export_variant(method, out, env, args.seeds, [*args.export_args.split(), *depth])
        print(f"  {exports[method]}", file=sys.stderr, flush=True)
        if exports[method]["exit"] == 0:
            bundles[method] = out
    print("counting FLOPs …", file=sys.stderr, flush=True)
    flops = flops_per_variant(methods, max_downsample)
    print(f"  GFLOPs { ({k: round(v / 1e9, 1) for k, v in flops.items()}) }", file=sys.stderr, flush=True)
    print(f"timing {list(bundles)} interleaved, {args.runs} rounds …", file=sys.stderr, flush=True)
    times = time_interleaved(bundles, args.runs, args.threads, not args.no_warmup)
    medians = {name: statistics.median(values) * 1000 for name, values in times.items()}
    base = "none"
    result = {
        "bench": "sd_unet",
        "model": args.model,
        "width": args.width,
        "latent": args.latent or CONFIGS[args.model]["sample_size"],
        "max_downsample": max_downsample,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {args.threads} ORT threads",
        "runs": args.runs,
        "exports": exports,
        "median_ms": {k: round(v, 1) for k, v in medians.items()},
        "all_ms": {k: [round(t * 1000, 1) for t in v] for k, v in times.items()},
        "gflops": {k: round(v / 1e9, 1) for k, v in flops.items()},
    }
    if base in medians:
        result["speedup"] = {k: round(medians[base] / v, 3) for k, v in medians.items()}
        result["flop_ratio"] = {k: round(flops[base] / flops[k], 3) for k in medians}
        result["speedup_over_flop_ratio"] = {
            k: round(result["speedup"][k] / result["flop_ratio"][k], 3) for k in medians
        }
    print("profiling …", file=sys.stderr, flush=True)
    result["top_ops"] = {name: top_ops(bundle, args.threads, workdir) for name, bundle in bundles.items()}
    emit(result)


if __name__ == "__main__":
    main()
