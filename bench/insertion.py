"""Graph-level ToMe insertion vs the eager patcher on the same ViT (random weights).

Times the insertion itself (torch.export + rewrite + fake propagation), then runs the
ONNX graphs exported both ways on ONNX Runtime CPU — interleaved by ``bench/harness.py``,
warm-up first, medians, no thread spinning — and the merged graphs' agreement. Prints one JSON object last.

    PYTHONPATH=$PWD python bench/insertion.py [--model small|tiny] [--r 16] [--runs 30]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import tome_export  # noqa: E402
from bench.harness import emit, interleaved, medians, ort_runner  # noqa: E402
from samples import reference_vit  # noqa: E402
from tome_export.exporter.insert import insert_merges  # noqa: E402
from tome_export.exporter.onnx_export import export_onnx  # noqa: E402

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
        runners[name] = (ort_runner(exported.with_decisions, threads=2), exported)
    results = {name: runner.run({exported.input_names[0]: x.numpy()}) for name, (runner, exported) in runners.items()}
    out_a = results["eager_patch"][runners["eager_patch"][1].output_names[0]]
    out_b = results["graph_insert"][runners["graph_insert"][1].output_names[0]]
    decisions_equal = all(
        np.array_equal(results["eager_patch"][a], results["graph_insert"][b])
        for a, b in zip(runners["eager_patch"][1].decision_names, runners["graph_insert"][1].decision_names)
    )

    feeds = {name: {exported.input_names[0]: x.numpy()} for name, (_, exported) in runners.items()}
    calls = {name: (lambda r=runner, f=feeds[name]: r.run(f)) for name, (runner, _) in runners.items()}
    median_ms = medians(interleaved(calls, args.runs, warmup=3))
    emit(
        {
            "model": args.model,
            "input_shape": list(shape),
            "r": args.r,
            "runs": args.runs,
            "insert_s": round(insert_s, 2),
            "onnx_export_s": {k: round(v, 2) for k, v in onnx_export_s.items()},
            "ort_cpu_median_ms": median_ms,
            "graph_over_eager_ratio": round(median_ms["graph_insert"] / median_ms["eager_patch"], 3),
            "max_abs_diff_between_exports": float(np.abs(out_a - out_b).max()),
            "decisions_equal": bool(decisions_equal),
            "machine": "2-core CPU, shared with other jobs (noisy)",
        }
    )


if __name__ == "__main__":
    main()
