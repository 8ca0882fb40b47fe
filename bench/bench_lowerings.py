"""Merge lowerings on ONNX Runtime CPU: the merge op alone and whole models, per lowering.

Scales: ViT-S (N=197, C=384, r=16), ViT-B (N=197, C=768, r=16), Stable Diffusion's
highest-resolution transformer block (N=4096, C=320, r=2048 = ratio 0.5). Whole models:
ViT-S/16 and ViT-B/16 at r=16, and an SD transformer block (self-attention with
tomesd-style merge before / unmerge after, cross-attention, GEGLU feed-forward) — a whole
UNet is the diffusion work's benchmark. Random weights. Variants are interleaved in one
process (``bench/harness.py``: round-robin, warm-up first, medians; ORT sessions without
thread spinning); every variant is also checked against eager PyTorch. The merge op's share of a ViT block / SD block uses the default
lowering of the ONNX target. ONE JSON object is printed last.

    PYTHONPATH=$PWD python bench/bench_lowerings.py [--runs 20] [--sd-runs 10] [--large-runs 10]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import emit, interleaved, log, machine, medians, ort_runner, ratios  # noqa: E402
from samples.reference_vit import Block, vit_base_patch16_224, vit_small_patch16_224  # noqa: E402
from tome_export.exporter.dense_lowering import dense_cost  # noqa: E402
from tome_export.exporter.onnx_export import export_onnx  # noqa: E402
from tome_export.merging import apply, bipartite  # noqa: E402
from tome_export.targets import get_target  # noqa: E402

LOWERINGS = ("scatter", "dense", "plugin")
DEFAULT_LOWERING = get_target("onnx").default_lowering

# name: (batch, tokens, channels, metric dim, r, protected)
OP_SCALES = {
    "vit_s": (1, 197, 384, 64, 16, 1),
    "vit_b": (1, 197, 768, 64, 16, 1),
    "sd": (1, 4096, 320, 320, 2048, 0),
}


class MergeOnly(nn.Module):
    """Just the merge op: what a lowering costs on its own."""

    def __init__(self, r: int, protected: int) -> None:
        super().__init__()
        self.r, self.protected = r, protected

    def forward(self, metric, x, size):
        return torch.ops.tome_export.bipartite_merge(metric, x, size, self.r, self.protected)


class OneVitBlock(nn.Module):
    """One ViT block on a token sequence (class token first), patchable by ``apply``."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.Sequential(Block(dim, heads, 4.0))

    def forward(self, tokens):
        return self.blocks(tokens)


class SDTransformerBlock(nn.Module):
    """SD 1.x's highest-resolution BasicTransformerBlock shape (C=320, 8 heads, context 77×768)
    with the merge before self-attention and the unmerge after, as tomesd does."""

    def __init__(self, r: int, dim: int = 320, heads: int = 8, context_dim: int = 768) -> None:
        super().__init__()
        self.r, self.heads = r, heads
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q1, self.k1, self.v1, self.o1 = (nn.Linear(dim, dim, bias=False) for _ in range(4))
        self.q2 = nn.Linear(dim, dim, bias=False)
        self.k2, self.v2 = nn.Linear(context_dim, dim, bias=False), nn.Linear(context_dim, dim, bias=False)
        self.o2 = nn.Linear(dim, dim)
        self.ff_in, self.ff_out = nn.Linear(dim, 8 * dim), nn.Linear(4 * dim, dim)

    def attend(self, q, k, v):
        batch, tokens, dim = q.shape
        split = lambda t: t.reshape(batch, t.shape[1], self.heads, dim // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(q), split(k), split(v)
        weights = (q @ k.transpose(-2, -1) * (dim // self.heads) ** -0.5).softmax(dim=-1)
        return (weights @ v).transpose(1, 2).reshape(batch, tokens, dim)

    def forward(self, x, context):
        h = self.norm1(x)
        slot = None
        if self.r:
            h, _, slot = torch.ops.tome_export.bipartite_merge(h, h, torch.ones_like(h[..., :1]), self.r, 0)
        h = self.o1(self.attend(self.q1(h), self.k1(h), self.v1(h)))
        if slot is not None:
            h = bipartite.unmerge(h, slot)
        x = x + h
        h = self.norm2(x)
        x = x + self.o2(self.attend(self.q2(h), self.k2(context), self.v2(context)))
        hidden, gate = self.ff_in(self.norm3(x)).chunk(2, dim=-1)
        return x + self.ff_out(hidden * nn.functional.gelu(gate))


def export_runner(model: nn.Module, inputs: tuple[torch.Tensor, ...], lowering: str):
    """Exported (shipped graph) → runner, feeds, and max abs error against eager."""
    exported = export_onnx(model, inputs, lowering)
    runner = ort_runner(exported.model)
    feeds = {name: t.numpy() for name, t in zip(exported.input_names, inputs)}
    with torch.no_grad():
        eager = model(*inputs)
    eager = list(eager) if isinstance(eager, (tuple, list)) else [eager]
    got = runner.run(feeds)
    err = max(
        float(np.abs(got[name].astype(np.float64) - ref.numpy()).max()) if ref.dtype.is_floating_point else 0.0
        for name, ref in zip(exported.output_names, eager)
    )
    return runner, feeds, err


def interleaved_medians(variants: dict, runs: int) -> dict[str, float]:
    """Median ms per (runner, feeds) variant, timed by the harness (3 warm-up rounds)."""
    calls = {name: (lambda r=runner, f=feeds: r.run(f)) for name, (runner, feeds) in variants.items()}
    return medians(interleaved(calls, runs, warmup=3))


def bench_merge_op(runs: int, sd_runs: int, errors: dict, keep: dict) -> dict:
    """``keep`` receives the default lowering's runner per scale, for the block share."""
    results = {}
    for scale, (batch, tokens, channels, dim, r, protected) in OP_SCALES.items():
        generator = torch.Generator().manual_seed(0)
        inputs = (
            torch.randn(batch, tokens, dim, generator=generator),
            torch.randn(batch, tokens, channels, generator=generator),
            torch.ones(batch, tokens, 1),
        )
        variants = {}
        for lowering in LOWERINGS:
            runner, feeds, err = export_runner(MergeOnly(r, protected), inputs, lowering)
            variants[lowering] = (runner, feeds)
            errors[f"merge_op/{scale}/{lowering}"] = err
        keep[scale] = variants[DEFAULT_LOWERING]
        median_ms = interleaved_medians(variants, sd_runs if scale == "sd" else runs)
        results[scale] = {
            "shape": {"batch": batch, "tokens": tokens, "channels": channels, "r": r, "protected": protected},
            "median_ms": median_ms,
            "ratios": ratios(median_ms, "scatter"),
            "dense_extra_mflops": dense_cost(batch, tokens, channels, r, protected)["extra_mflops"],
        }
        log(f"merge op {scale}: {median_ms}")
    return results


def bench_models(runs: int, large_runs: int, errors: dict) -> dict:
    cases = {
        "vit_s16_r16": (lambda: apply(vit_small_patch16_224(), "tome", r=16), (torch.randn(1, 3, 224, 224),), runs),
        "vit_b16_r16": (
            lambda: apply(vit_base_patch16_224(), "tome", r=16),
            (torch.randn(1, 3, 224, 224),),
            large_runs,
        ),
        "sd_block_ratio0.5": (
            lambda: SDTransformerBlock(r=2048).eval(),
            (torch.randn(1, 4096, 320), torch.randn(1, 77, 768)),
            large_runs,
        ),
    }
    results = {}
    for name, (build, inputs, count) in cases.items():
        torch.manual_seed(0)
        model = build().eval()
        variants = {}
        for lowering in LOWERINGS:
            runner, feeds, err = export_runner(model, inputs, lowering)
            variants[lowering] = (runner, feeds)
            errors[f"model/{name}/{lowering}"] = err
        # The unmerged model for scale (lowering-independent).
        torch.manual_seed(0)
        baseline = build().eval()
        if name.startswith("vit"):
            baseline._tome_state.requested = [0] * len(baseline._tome_state.requested)
        else:
            baseline.r = 0
        variants["unmerged"] = export_runner(baseline, inputs, DEFAULT_LOWERING)[:2]
        median_ms = interleaved_medians(variants, count)
        results[name] = {"median_ms": median_ms, "ratios": ratios(median_ms, "scatter")}
        log(f"model {name}: {median_ms}")
    return results


def bench_block_share(runs: int, sd_runs: int, merge_runners: dict, errors: dict) -> dict:
    """Merge op time (default lowering) over the time of the block it sits in; the two are
    timed interleaved so they see the same machine load."""
    torch.manual_seed(0)
    vit_block = apply(OneVitBlock(384, 6).eval(), "tome", r=16)
    vit_runner = export_runner(vit_block, (torch.randn(1, 197, 384),), DEFAULT_LOWERING)
    errors[f"block/vit_s/{DEFAULT_LOWERING}"] = vit_runner[2]
    vit = interleaved_medians({"block": vit_runner[:2], "merge": merge_runners["vit_s"]}, runs)
    torch.manual_seed(0)
    sd_block = SDTransformerBlock(r=2048).eval()
    sd_runner = export_runner(sd_block, (torch.randn(1, 4096, 320), torch.randn(1, 77, 768)), DEFAULT_LOWERING)
    errors[f"block/sd/{DEFAULT_LOWERING}"] = sd_runner[2]
    sd = interleaved_medians({"block": sd_runner[:2], "merge": merge_runners["sd"]}, sd_runs)
    vit_ms, vit_merge, sd_ms, sd_merge = vit["block"], vit["merge"], sd["block"], sd["merge"]
    log(f"block share: ViT-S {vit}, SD {sd}")
    return {
        "lowering": DEFAULT_LOWERING,
        "vit_s_block_ms": vit_ms,
        "vit_s_merge_ms": vit_merge,
        "vit_s_merge_share": round(vit_merge / vit_ms, 4),
        "vit_goal": "<= 0.03",
        "sd_block_ms": sd_ms,
        "sd_merge_ms": sd_merge,
        "sd_merge_share": round(sd_merge / sd_ms, 4),
        "sd_goal": "<= 0.10",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20, help="timed runs per variant at ViT scale")
    parser.add_argument("--sd-runs", type=int, default=10, help="timed runs per variant at SD scale")
    parser.add_argument("--large-runs", type=int, default=10, help="timed runs per variant, ViT-B and SD block models")
    args = parser.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    started = time.perf_counter()
    errors: dict[str, float] = {}
    merge_runners: dict = {}
    merge_op = bench_merge_op(args.runs, args.sd_runs, errors, merge_runners)
    share = bench_block_share(args.runs, args.sd_runs, merge_runners, errors)
    models = bench_models(args.runs, args.large_runs, errors)
    import onnxruntime

    emit(
        {
            "benchmark": "bench_lowerings",
            "machine": machine(),
            "onnxruntime": onnxruntime.__version__,
            "torch": torch.__version__,
            "runs": {"vit": args.runs, "sd": args.sd_runs, "large_models": args.large_runs},
            "merge_op": merge_op,
            "block_share": share,
            "models": models,
            "max_abs_err_vs_eager": {k: float(f"{v:.3g}") for k, v in errors.items()},
            "wall_s": round(time.perf_counter() - started, 1),
        }
    )


if __name__ == "__main__":
    main()
