"""Fit the cost model's coefficients (tome_export/cost_model.py) on this machine.

For several channel counts C and token counts N it exports small random-weight ViTs
(samples/reference_vit.py, class token, patch 16; 2 blocks unmerged, 4 blocks merged with
r ≈ N/10 so the merged blocks see a range of N), times them all interleaved in one
process with plain ONNX Runtime sessions (bench/harness.py, no thread spinning), then
profiles each with ORT's profiler. Per merging layer, the merge op's time is its nodes'
kernel time plus their share of the time between kernels (profiled run − kernel sum, spread
evenly over the executed nodes: the per-op dispatch overhead that makes many small ops
expensive), scaled by (interleaved run time / profiled run time) so that merge and block
times share one clock. The merge coefficients
are fitted on those per-layer samples, the block coefficients on each model's remaining
time, both by non-negative least squares on relative error. Every time is the 25th percentile
of its runs, and a sample the first fit misses by > 35% is left out of the second: on a
shared machine the least disturbed runs are the ones that describe the machine.

    python bench/calibrate_cost_model.py [--quick] [--runs 20] [--write]

``--write`` stores the fit in tome_export/cost_coefficients.json under --profile
(default onnxruntime-cpu), with this machine named; without it the file is untouched.
Re-run it after the merge lowering changes. One JSON object is printed last.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402
from scipy.optimize import nnls  # noqa: E402

import tome_export  # noqa: E402
from bench.harness import emit, interleaved, log, machine, ort_profiling_session, ort_runner  # noqa: E402
from samples.reference_vit import VisionTransformer  # noqa: E402
from tome_export import cost_model as cm  # noqa: E402
from tome_export.exporter.onnx_export import export_onnx  # noqa: E402
from tome_export.profiling.breakdown import node_attribution  # noqa: E402

FULL = [(c, img) for c in (192, 384, 768) for img in (112, 224, 384)] + [(384, 512)]
QUICK = [(384, 112), (384, 224)]
PROFILED_RUNS = 10
QUANTILE = 25  # of runs: robust to other processes taking the CPU now and then
OUTLIER = 0.35  # samples the first fit misses by more than this (relative) are left out of the second


def build(dim: int, img: int, depth: int, r: int) -> tuple[torch.nn.Module, cm.ModelShape, list[int], list[int]]:
    torch.manual_seed(0)
    model = VisionTransformer(img_size=img, patch_size=16, dim=dim, depth=depth, num_heads=dim // 64, num_classes=10)
    tome_export.apply(model.eval(), method="tome", r=r)
    with torch.no_grad():
        model(torch.randn(1, 3, img, img))
    state = model._tome_state
    shape = cm.shape_of(model, 1, patch_tokens=(img // 16) ** 2)
    return model, shape, list(state.tokens_per_layer), list(state.r_per_layer)


def profile(path: Path, feeds: dict, prefix: str) -> dict:
    """Per profiled run: kernel sum, node count, and per layer the merge nodes' kernel ms and count;
    each reduced to its QUANTILE over the runs (on a shared machine the least disturbed runs)."""
    session = ort_profiling_session(path, None, prefix)
    for _ in range(2 + PROFILED_RUNS):
        session.run(None, feeds)
    events = json.loads(Path(session.end_profiling()).read_text())
    table = node_attribution(onnx.load(str(path), load_external_data=False))
    runs = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])[2:]
    kernels = [e for e in events if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")]
    totals, counts, gaps, durations, merge_ms, merge_nodes = [], [], [], [], {}, {}
    for index, run in enumerate(runs):
        start, stop = run["ts"], run["ts"] + run["dur"]
        total, count = 0.0, 0
        for k in kernels:
            if not start <= k["ts"] <= stop:
                continue
            name = k["name"].removesuffix("_kernel_time")
            info = table.get(name) or table.get(name.split("/", 1)[0])
            total, count = total + k["dur"] / 1e3, count + 1
            if info is not None and info.is_merge:
                merge_ms.setdefault(info.layer, [0.0] * len(runs))[index] += k["dur"] / 1e3
                merge_nodes.setdefault(info.layer, [0] * len(runs))[index] += 1
        totals.append(total)
        counts.append(count)
        durations.append(run["dur"] / 1e3)
        gaps.append(max(0.0, run["dur"] / 1e3 - total) / max(1, count))
    quantile = lambda values: float(np.percentile(values, QUANTILE))  # noqa: E731
    return {
        "kernel_ms": quantile(totals),
        "nodes": quantile(counts),
        "run_ms": quantile(durations),
        "gap_per_node_ms": quantile(gaps),
        "merge_ms": {layer: quantile(v) for layer, v in merge_ms.items()},
        "merge_nodes": {layer: quantile(v) for layer, v in merge_nodes.items()},
    }


def fit(rows: list[dict[str, float]], targets: list[float], terms: tuple[str, ...]) -> tuple[dict[str, float], dict]:
    """Non-negative least squares on relative error (every sample weighs the same), then once
    more without the samples the first fit misses by more than OUTLIER (disturbed runs)."""
    a = np.array([[row[t] for t in terms] for row in rows], dtype=float)
    y = np.array(targets, dtype=float)
    scale = a.max(axis=0)
    scale[scale == 0] = 1.0
    keep = np.ones(len(y), dtype=bool)
    for _ in range(2):
        coef, _ = nnls((a[keep] / scale) / y[keep, None], np.ones(int(keep.sum())))
        residuals = (a @ (coef / scale) - y) / y
        keep = np.abs(residuals) <= OUTLIER
    coef = coef / scale
    report = {"residuals": [round(float(v), 3) for v in residuals], "left_out": int((~keep).sum())}
    return {t: float(c) for t, c in zip(terms, coef)}, report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="two configurations, few runs: checks the script works")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--write", action="store_true", help="store the fit in cost_coefficients.json")
    parser.add_argument("--profile", default="onnxruntime-cpu", help="table entry to write")
    parser.add_argument("--machine", default=None, help="machine description stored with the fit")
    args = parser.parse_args()
    runs = 5 if args.quick else args.runs
    merge_rows, merge_ms, model_rows, model_ms, samples = [], [], [], [], []
    with tempfile.TemporaryDirectory(prefix="tome-calibrate-") as tmp:
        variants = {}
        for dim, img in QUICK if args.quick else FULL:
            tokens = (img // 16) ** 2 + 1
            for depth, r in ((2, 0), (4, max(1, tokens // 10))):
                model, shape, n_layers, r_layers = build(dim, img, depth, r)
                x = torch.randn(1, 3, img, img)
                path = Path(tmp) / f"c{dim}-n{tokens}-r{r}.onnx"
                exported = export_onnx(model, (x,))
                onnx.save(exported.model, str(path))
                feeds = {exported.input_names[0]: x.numpy()}
                variants[path.stem] = (ort_runner(str(path)), feeds, shape, n_layers, r_layers, path, dim)
                log(f"exported C={dim} N={tokens} depth {depth} r={r}")
                del model, exported
        # Every model in one interleaved round-robin: load changes on a shared machine hit all alike.
        log(f"timing {len(variants)} models interleaved, {runs} rounds")
        timings = interleaved({k: (lambda v=v: v[0].session.run(None, v[1])) for k, v in variants.items()}, runs, 2)
        for key, (_, feeds, shape, n_layers, r_layers, path, dim) in variants.items():
            run_ms = timings[key].percentile(QUANTILE)
            prof = profile(path, feeds, str(Path(tmp) / f"prof-{path.stem}"))
            # The profiled runs ran alone (and under the profiler): scale their merge times to the
            # interleaved timing's conditions so merge and block times share one clock.
            load = run_ms / prof["run_ms"]
            merged_total = 0.0
            for index, (n, r) in enumerate(zip(n_layers, r_layers)):
                layer = f"blocks.{index}"
                if r > 0 and layer in prof["merge_ms"]:
                    ms = load * (prof["merge_ms"][layer] + prof["gap_per_node_ms"] * prof["merge_nodes"][layer])
                    merge_rows.append(cm.merge_features(n, r, shape))
                    merge_ms.append(ms)
                    merged_total += ms
                    samples.append({"kind": "merge", "C": dim, "N": n, "r": r, "ms": round(ms, 4)})
            features = {t: 0.0 for t in cm.BLOCK_TERMS}
            for index, (n, r) in enumerate(zip(n_layers, r_layers)):
                for t, v in cm.block_features(n, r, shape, after_merge=any(r_layers[:index])).items():
                    features[t] += v
            features["linear_gflop"] += shape.stem_gflop
            features["model"] = 1.0
            model_rows.append(features)
            model_ms.append(run_ms - merged_total)
            samples.append(
                {"kind": "model", "C": dim, "N": n_layers[0], "depth": len(r_layers), "r": r_layers[0], "ms": round(run_ms, 3)}
            )
    merge_coef, merge_res = fit(merge_rows, merge_ms, cm.MERGE_TERMS)
    block_terms = (*cm.BLOCK_TERMS, "model")
    block_coef, block_res = fit(model_rows, model_ms, block_terms)
    model_fixed = block_coef.pop("model")
    coefficients = cm.Coefficients(
        name=args.profile,
        machine=args.machine or f"{platform.machine()} {machine()['cpus']} cpus, {platform.processor() or platform.system()}",
        runtime=f"onnxruntime {ort.__version__} CPU EP, scatter lowering, fp32, default threads, no spinning",
        calibrated=dt.date.today().isoformat(),
        devices=("cpu",),
        targets=("onnx",),
        block=block_coef,
        merge=merge_coef,
        model_fixed_ms=model_fixed,
    )
    if args.write:
        cm.write_coefficients(coefficients)
        log(f"wrote {args.profile} to {cm.COEFFICIENTS_FILE}")
    emit(
        {
            "bench": "calibrate_cost_model",
            "machine": machine(),
            "quick": args.quick,
            "runs": runs,
            "coefficients": cm.coefficients_to_json(coefficients),
            "fit": {"merge": merge_res, "model": block_res},
            "samples": samples,
            "written": args.write,
        }
    )


if __name__ == "__main__":
    main()
