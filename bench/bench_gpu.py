"""GPU benchmarks for the issue-4 goals (needs an NVIDIA GPU; exits cleanly without one).

1. ONNX Runtime CUDA EP, unmerged vs merged ViT, batch 1 and 32, with CUDA graphs;
2. the fused Triton merge kernel vs the unfused PyTorch ops (``merge_tokens``) at N=4096.
Variants interleaved in one process by ``bench/harness.py`` (warm-up, then medians; GPU work
synchronized around every timed call); prints ONE JSON object last. ``CudaGraphRunner``'s
sessions are the runtime's own (ORT thread spinning left at its default: the work is on the GPU).

    PYTHONPATH=. python bench/bench_gpu.py [--runs 50] [--model vit_small]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import emit, interleaved, medians  # noqa: E402
from tome_export.errors import first_line  # noqa: E402


def _gpu_or_exit() -> None:
    import torch

    if not torch.cuda.is_available():
        emit({"skipped": "no CUDA GPU here; run this on an NVIDIA GPU"})
        sys.exit(0)


def bench_kernel(runs: int) -> dict:
    import torch

    from tome_export.kernels.triton_merge import merge_tokens_triton
    from tome_export.merging.bipartite import merge_tokens

    batch, tokens, dim, channels, r = 2, 4096, 64, 320, 2048
    gen = torch.Generator(device="cuda").manual_seed(0)
    metric = torch.randn(batch, tokens, dim, device="cuda", generator=gen)
    x = torch.randn(batch, tokens, channels, device="cuda", generator=gen)
    size = torch.ones(batch, tokens, 1, device="cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    ref, got = merge_tokens(metric, x, size, r, 0), merge_tokens_triton(metric, x, size, r, 0)
    agree = float((ref[2] == got[2]).float().mean())
    variants = {
        "torch_unfused": lambda: merge_tokens(metric, x, size, r, 0),
        "triton_fused": lambda: merge_tokens_triton(metric, x, size, r, 0),
    }
    median_ms = medians(interleaved(variants, runs, warmup=5, sync=torch.cuda.synchronize), digits=4)
    return {
        "shape": {"B": batch, "N": tokens, "D": dim, "C": channels, "r": r},
        "median_ms": median_ms,
        "speedup_triton_vs_torch": median_ms["torch_unfused"] / median_ms["triton_fused"],
        "slot_agreement": agree,
    }


def bench_ort(runs: int, model_name: str) -> dict:
    import timm
    import torch

    from tome_export.exporter.onnx_export import export_onnx
    from tome_export.merging import apply
    from tome_export.runtimes.ort_cuda import CudaGraphRunner

    results = {}
    for batch in (1, 32):
        runners = {}
        for r in (0, 16):
            model = timm.create_model(model_name, pretrained=False).eval()
            model = apply(model, "tome", r=r) if r else model
            x = torch.randn(batch, 3, 224, 224)
            exported = export_onnx(model, (x,), "dense" if r else "scatter")
            runner = CudaGraphRunner(exported.model, cuda_graph=True, tf32=True)
            feeds = {exported.input_names[0]: x.numpy()}
            runners[f"r{r}"] = (runner, feeds)
        calls = {name: (lambda r=runner, f=feeds: r.run(f)) for name, (runner, feeds) in runners.items()}
        median_ms = medians(interleaved(calls, runs, warmup=10), digits=4)
        results[f"batch{batch}"] = {
            "median_ms": median_ms,
            "speedup_merged": median_ms["r0"] / median_ms["r16"],
            "cuda_graph": {name: runner.cuda_graph for name, (runner, _) in runners.items()},
        }
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--model", default="vit_small_patch16_224")
    args = parser.parse_args()
    _gpu_or_exit()
    import torch

    report = {"device": torch.cuda.get_device_name(0), "kernel_n4096": bench_kernel(args.runs)}
    try:
        report["ort_cuda"] = bench_ort(args.runs, args.model)
    except Exception as exc:  # onnxruntime-gpu / timm missing: keep the kernel numbers
        report["ort_cuda"] = {"skipped": first_line(exc)}
    emit(report)


if __name__ == "__main__":
    main()
