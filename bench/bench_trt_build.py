"""TensorRT for RTX engine builds (ahead of time, no GPU): build time and engine size.

ToMe ViT-S/16 (timm's vit_small_patch16_224, random weights; the reference ViT-S/16 in
samples/ without timm), dense lowering, r in {0, 16}, precisions fp32 / fp16 (merge metric in
fp32, graph_passes/fp16.py) / int8 (ONNX Runtime QDQ, float bias, graph_passes/int8_qdq.py).
Builds run one after another in one process (a build is not a latency: no interleaving
needed); each is built --repeats times and the median reported. Engines are BUILT here, not
run. Prints one JSON object last. Usage: python bench/bench_trt_build.py [--repeats 1] [--r 0,16]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import tome_export  # noqa: E402
from bench.harness import emit  # noqa: E402
from tome_export.exporter.onnx_export import export_onnx  # noqa: E402
from tome_export.graph_passes.fp16 import to_fp16  # noqa: E402
from tome_export.graph_passes.int8_qdq import quantize_qdq  # noqa: E402
from tome_export.targets import trt_rtx  # noqa: E402
from tome_export.targets.common import save_onnx  # noqa: E402


def vit_s16():
    try:
        import timm

        torch.manual_seed(0)
        return "timm:vit_small_patch16_224", timm.create_model("vit_small_patch16_224").eval()
    except ImportError:
        from samples.reference_vit import vit_small_patch16_224

        return "samples.reference_vit:vit_small_patch16_224", vit_small_patch16_224()


def graphs(folder: Path, r: int) -> dict[str, Path]:
    name, model = vit_s16()
    tome_export.apply(model, method="tome", r=r)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    exported = export_onnx(model, (x,), "dense", 18)
    export_s = time.perf_counter() - start
    paths = {"fp32": folder / f"r{r}_fp32.onnx", "fp16": folder / f"r{r}_fp16.onnx", "int8": folder / f"r{r}_int8.onnx"}
    save_onnx(exported.model, paths["fp32"])
    save_onnx(to_fp16(exported.model)[0], paths["fp16"])
    rng = np.random.default_rng(0)
    calibration = [{"x": rng.standard_normal((1, 3, 224, 224)).astype(np.float32)} for _ in range(4)]
    quantize_qdq(paths["fp32"], paths["int8"], calibration)
    print(f"{name} r={r}: exported in {export_s:.1f} s", file=sys.stderr)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--r", default="0,16")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for r in (int(v) for v in args.r.split(",")):
            for precision, path in graphs(folder, r).items():
                times, size, layers = [], 0, {}
                for _ in range(args.repeats):
                    built = trt_rtx.build_engine(path, folder / "model.engine")
                    times.append(built.seconds)
                    size, layers = built.bytes, trt_rtx.precision_summary(built.layers)
                rows.append(
                    {
                        "r": r,
                        "precision": precision,
                        "onnx_mb": round(sum(p.stat().st_size for p in folder.glob(f"{path.name}*")) / 2**20, 1),
                        "build_s_median": round(statistics.median(times), 2),
                        "engine_mb": round(size / 2**20, 1),
                        "engine_layer_precisions": layers,
                        "network_nodes": len(onnx.load(str(path), load_external_data=False).graph.node),
                    }
                )
                print(rows[-1], file=sys.stderr)
    emit(
            {
                "benchmark": "tensorrt_for_rtx_engine_build",
                "tensorrt": f"{trt_rtx.FLAVOUR} {trt_rtx.version()}",
                "compute_capabilities": list(trt_rtx.DEFAULT_CAPABILITIES),
                "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
                "cpus": __import__("os").cpu_count(),
                "gpu": "none (ahead-of-time build; engines are not run here)",
                "repeats": args.repeats,
                "rows": rows,
            }
    )


if __name__ == "__main__":
    main()
