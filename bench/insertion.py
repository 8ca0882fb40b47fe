"""Graph-level ToMe insertion vs the eager patcher on the same ViT (random weights).

Times the insertion itself (torch.export + rewrite + fake propagation), then runs the
ONNX graphs exported both ways on ONNX Runtime CPU — interleaved, warm-up first,
medians — and the merged graphs' agreement. Prints one JSON object last.

    PYTHONPATH=$PWD python bench/insertion.py [--model small|tiny] [--r 16] [--runs 30]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import numpy as np
import torch

import tome_export
from samples import reference_vit
from tome_export.exporter.insert import insert_merges
from tome_export.exporter.onnx_export import export_onnx
from tome_export.runtimes.onnxruntime import OnnxRuntimeRunner

MODELS = {
    "small": (reference_vit.vit_small_patch16_224, (1, 3, 224, 224)),
    "tiny": (reference_vit.vit_tiny_test, (1, 3, 64, 64)),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=sorted(MODELS), default="small")
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    factory, shape = MODELS[args.model]
    torch.set_num_threads(2)
    model = factory()
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))

    start = time.perf_counter()
    graph_model = insert_merges(copy.deepcopy(model), (x,), r=args.r)
    insert_s = time.perf_counter() - start
    eager_model = tome_export.apply(copy.deepcopy(model), r=args.r)

    runners, onnx_export_s = {}, {}
    for name, variant in (("eager_patch", eager_model), ("graph_insert", graph_model)):
        start = time.perf_counter()
        exported = export_onnx(variant, (x,))
        onnx_export_s[name] = time.perf_counter() - start
        runners[name] = (OnnxRuntimeRunner(exported.with_decisions, intra_op_threads=2), exported)
    results = {name: runner.run({exported.input_names[0]: x.numpy()}) for name, (runner, exported) in runners.items()}
    out_a = results["eager_patch"][runners["eager_patch"][1].output_names[0]]
    out_b = results["graph_insert"][runners["graph_insert"][1].output_names[0]]
    decisions_equal = all(
        np.array_equal(results["eager_patch"][a], results["graph_insert"][b])
        for a, b in zip(runners["eager_patch"][1].decision_names, runners["graph_insert"][1].decision_names)
    )

    times = {name: [] for name in runners}
    for _ in range(3):
        for runner, exported in runners.values():
            runner.run({exported.input_names[0]: x.numpy()})
    for _ in range(args.runs):  # interleaved so load changes hit both alike
        for name, (runner, exported) in runners.items():
            start = time.perf_counter()
            runner.run({exported.input_names[0]: x.numpy()})
            times[name].append((time.perf_counter() - start) * 1e3)
    medians = {name: statistics.median(values) for name, values in times.items()}
    print(
        json.dumps(
            {
                "model": args.model,
                "input_shape": list(shape),
                "r": args.r,
                "runs": args.runs,
                "insert_s": round(insert_s, 2),
                "onnx_export_s": {k: round(v, 2) for k, v in onnx_export_s.items()},
                "ort_cpu_median_ms": {k: round(v, 3) for k, v in medians.items()},
                "graph_over_eager_ratio": round(medians["graph_insert"] / medians["eager_patch"], 3),
                "max_abs_diff_between_exports": float(np.abs(out_a - out_b).max()),
                "decisions_equal": bool(decisions_equal),
                "machine": "2-core CPU, shared with other jobs (noisy)",
            }
        )
    )


if __name__ == "__main__":
    main()
