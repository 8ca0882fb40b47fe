"""ONNX Runtime CPU: ViT at r ∈ {0, 16} × {fp32, int8 dynamic, int8 static}, speed and fidelity.

Every variant is the project's export (``export_onnx``) converted by the same function the
export path uses (``precision.convert``: merge nodes kept fp32; static calibrated on 8
random inputs at seeds 1000-1007). Timed with ``bench/harness.py``: sessions without
thread spinning, interleaved round-robin (warm-up, then the median of --runs runs each). Fidelity columns, on --fidelity-seeds
random inputs: cosine vs the same model in eager fp32, cosine vs the UNMERGED eager fp32
model (what a user gets end to end), and per-layer merge-decision agreement (worst layer).
Goals (issue 14): r=16 int8 ≥ 2.4× r=0 fp32 and ≥ 1.5× r=0 int8. One JSON object last.

Usage: python bench/bench_precision.py [--runs 30] [--model small|base] [--r 0,16]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import tome_export  # noqa: E402
from bench.harness import emit, interleaved, log, machine, ort_runner  # noqa: E402
from samples import reference_vit  # noqa: E402
from tome_export.exporter.onnx_export import export_onnx  # noqa: E402
from tome_export.merging import merge_state  # noqa: E402
from tome_export.precision import TOLERANCES, PrecisionPlan  # noqa: E402
from tome_export.targets.precision_pass import convert  # noqa: E402
from tome_export.verify import cosine  # noqa: E402

PRECISIONS = (("fp32", None), ("int8", "dynamic"), ("int8", "static"))
SHAPE = (1, 3, 224, 224)


def inputs(seed: int) -> torch.Tensor:
    return torch.randn(*SHAPE, generator=torch.Generator().manual_seed(seed))


def fidelity(model, unmerged, graph, decision_names: list[str], seeds: range) -> dict:
    runner = ort_runner(graph)
    same, end_to_end, agreement = [], [], []
    for seed in seeds:
        x = inputs(seed)
        with torch.no_grad():
            want, reference = model(x).numpy(), unmerged(x).numpy()
        state = merge_state(model)
        got = runner.run({runner.input_names[0]: x.numpy()})
        same.append(cosine(got["output"], want))
        end_to_end.append(cosine(got["output"], reference))
        for layer, name in enumerate(decision_names):
            agreement.append(float((got[name] == state.slots[layer].numpy()).mean()))
    return {
        "cosine_vs_eager_fp32": round(min(same), 6),
        "cosine_vs_unmerged_fp32": round(min(end_to_end), 6),
        "decision_agreement_worst_layer": round(min(agreement), 4) if agreement else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--model", default="small", choices=("small", "base"))
    parser.add_argument("--r", default="0,16")
    parser.add_argument("--fidelity-seeds", type=int, default=4)
    args = parser.parse_args()
    build = getattr(reference_vit, f"vit_{args.model}_patch16_224")
    unmerged = build()
    calibration = [{"x": inputs(seed).numpy()} for seed in range(1000, 1008)]
    variants = []
    for r in (int(v) for v in args.r.split(",")):
        model = tome_export.apply(build(), method="tome", r=r) if r else build()
        exported = export_onnx(model, (inputs(0),))
        for precision, mode in PRECISIONS:
            plan = PrecisionPlan(precision, mode, True, TOLERANCES[precision])
            graph, _ = convert(exported.with_decisions, plan, "onnx", calibration if mode == "static" else None)
            label = f"r={r} {precision}" + (f" {mode}" if mode else "")
            row = {"label": label, "r": r, "precision": precision, "int8_mode": mode}
            row.update(fidelity(model, unmerged, graph, exported.decision_names, range(args.fidelity_seeds)))
            session = ort_runner(graph).session
            feeds = {"x": inputs(0).numpy()}
            row["run"] = lambda session=session, names=exported.output_names, feeds=feeds: session.run(names, feeds)
            variants.append(row)
            log(f"prepared {label}: cosine {row['cosine_vs_eager_fp32']}")
    timings = interleaved({row["label"]: row["run"] for row in variants}, runs=args.runs, warmup=args.warmup)
    by_label = {row["label"]: row for row in variants}
    medians = {label: timings[label].median_ms for label in by_label}
    results = {}
    for label, row in by_label.items():
        base_int8 = medians.get(f"r=0 int8 {row['int8_mode']}") if row["int8_mode"] else None
        results[label] = {
            "ort_cpu_ms": round(medians[label], 2),
            "speedup_vs_r0_fp32": round(medians["r=0 fp32"] / medians[label], 3) if "r=0 fp32" in medians else None,
            "speedup_vs_r0_same_precision": round((base_int8 or medians.get("r=0 fp32", np.nan)) / medians[label], 3),
            **{k: v for k, v in row.items() if k.startswith(("cosine", "decision"))},
        }
    goals = {}
    for mode in ("dynamic", "static"):
        key = f"r=16 int8 {mode}"
        if key in results and "r=0 fp32" in results:
            goals[key] = {
                "vs_r0_fp32": results[key]["speedup_vs_r0_fp32"],
                "goal_2.4x": results[key]["speedup_vs_r0_fp32"] >= 2.4,
                "vs_r0_int8": results[key]["speedup_vs_r0_same_precision"],
                "goal_1.5x": results[key]["speedup_vs_r0_same_precision"] >= 1.5,
            }
    emit(
        {
            "bench": "precision_onnx_cpu",
            "model": f"reference vit_{args.model}_patch16_224 (random weights)",
            "machine": machine(),
            "onnxruntime": ort.__version__,
            "torch": torch.__version__,
            "runs": args.runs,
            "results": results,
            "goals": goals,
        }
    )


if __name__ == "__main__":
    main()
