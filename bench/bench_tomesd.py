"""tomesd merge cost at Stable Diffusion scale on ONNX Runtime CPU.

Variants, timed interleaved in one process by ``bench/harness.py`` (warm-up, then medians;
ORT sessions without thread spinning):
- ``merge_op[<lowering>]``: ``tome_export::tomesd_merge`` alone, N=64×64=4096 tokens,
  C=320, ratio 0.5 (r=2048), per available lowering (scatter; dense if registered);
- ``block_unmerged`` / ``block_tomesd[<lowering>]``: one SD-1.x-like transformer (diffusers
  ``Transformer2DModel``: GroupNorm, proj_in, one ``BasicTransformerBlock`` with 8 heads of
  40, cross-attention to 77×768 text tokens, GEGLU MLP, proj_out) at 64×64 latents, without
  and with our tomesd merging (ratio 0.5, merge before / unmerge after self-attention).

Prints one JSON object last. Usage: ``PYTHONPATH=. python bench/bench_tomesd.py [--runs 20]``.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import onnxruntime as ort
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import tome_export  # noqa: E402
from bench.harness import emit, interleaved, medians, ort_runner  # noqa: E402
from tome_export.exporter.lowerings import LOWERINGS  # noqa: E402
from tome_export.exporter.onnx_export import export_onnx  # noqa: E402

SIDE, CHANNELS, TEXT_TOKENS, TEXT_DIM, RATIO = 64, 320, 77, 768, 0.5


class MergeOnly(nn.Module):
    def __init__(self, r: int) -> None:
        super().__init__()
        self.r = r

    def forward(self, x):
        return torch.ops.tome_export.tomesd_merge(x, x, SIDE, SIDE, 2, 2, self.r, -1)


class SDTransformer(nn.Module):
    """diffusers Transformer2DModel shaped like SD 1.x's highest-resolution one."""

    def __init__(self) -> None:
        super().__init__()
        from diffusers.models.transformers.transformer_2d import Transformer2DModel

        torch.manual_seed(0)
        self.inner = Transformer2DModel(
            num_attention_heads=8,
            attention_head_dim=CHANNELS // 8,
            in_channels=CHANNELS,
            cross_attention_dim=TEXT_DIM,
            norm_num_groups=32,
        ).eval()

    def forward(self, sample, encoder_hidden_states):
        return self.inner(sample, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]


def session(model: nn.Module, example: tuple, lowering: str, threads: int):
    exported = export_onnx(model, example, lowering=lowering)
    runner = ort_runner(exported.model, threads=threads)
    feed = {n: t.numpy() for n, t in zip(exported.input_names, example)}
    return lambda: runner.run(feed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lowerings = [name for name in ("scatter", "dense") if name in LOWERINGS]
    tokens = SIDE * SIDE
    r = int(tokens * RATIO)
    x = torch.randn(args.batch, tokens, CHANNELS)
    sample = torch.randn(args.batch, CHANNELS, SIDE, SIDE)
    text = torch.randn(args.batch, TEXT_TOKENS, TEXT_DIM)

    variants, export_s = {}, {}
    for lowering in lowerings:
        start = time.perf_counter()
        variants[f"merge_op[{lowering}]"] = session(MergeOnly(r), (x,), lowering, args.threads)
        export_s[f"merge_op[{lowering}]"] = time.perf_counter() - start
    start = time.perf_counter()
    variants["block_unmerged"] = session(SDTransformer(), (sample, text), "scatter", args.threads)
    export_s["block_unmerged"] = time.perf_counter() - start
    for lowering in lowerings:
        start = time.perf_counter()
        merged = tome_export.apply(SDTransformer(), method="tomesd", ratio=RATIO)
        variants[f"block_tomesd[{lowering}]"] = session(merged, (sample, text), lowering, args.threads)
        export_s[f"block_tomesd[{lowering}]"] = time.perf_counter() - start

    timings = interleaved(variants, args.runs, args.warmup)
    median = {name: t.median_ms for name, t in timings.items()}
    result = {
        "bench": "tomesd",
        "machine": f"{platform.processor() or platform.machine()}, {args.threads} ORT threads (shared, noisy)",
        "onnxruntime": ort.__version__,
        "tokens": tokens,
        "channels": CHANNELS,
        "ratio": RATIO,
        "r": r,
        "batch": args.batch,
        "runs": args.runs,
        "median_ms": medians(timings),
        "p10_p90_ms": {k: [round(t.p10_ms, 3), round(t.p90_ms, 3)] for k, t in timings.items()},
        "export_s": {k: round(v, 1) for k, v in export_s.items()},
    }
    for lowering in lowerings:
        op, block = median[f"merge_op[{lowering}]"], median[f"block_tomesd[{lowering}]"]
        result[f"merge_op_share_of_merged_block[{lowering}]"] = round(op / block, 4)
        result[f"block_speedup[{lowering}]"] = round(median["block_unmerged"] / block, 3)
    result["goal_merge_op_share_le_10pct"] = result["merge_op_share_of_merged_block[scatter]"] <= 0.10
    emit(result)


if __name__ == "__main__":
    main()
