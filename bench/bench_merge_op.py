"""The ToMe merge op on ONNX Runtime CPU: its cost alone, its share of a ViT block, and the
one-hot MatMul vs ScatterElements(add) choice of the ``scatter`` lowering (issue 15).

For ViT-S (C=384, 6 heads) and ViT-B (C=768, 12 heads) at N=197 (224 px), batch 1 and 8:
one unmerged block, the same block with a merge of r=16 after its attention, and the merge
op alone, interleaved (``bench/harness.py``: round-robin, medians, no thread spinning).
Reports the merge op's share of the merged block (goal ≤ 3%) and the merged block's time
without its merge op against the unmerged block scaled by the block's FLOP ratio (goal ≤ 1.02:
what merging adds besides the merge op: proportional-attention bias, size bookkeeping).
Then the merge op at larger N (577 = 384 px, 1370 = DINOv2 at 518 px) with both ways of
summing merged rows, to place ``scatter_lowering.ONE_HOT_MAX_ROWS``. ONE JSON object last.

    PYTHONPATH=$PWD python bench/bench_merge_op.py [--runs 40] [--quick]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_lowerings import MergeOnly, OneVitBlock  # noqa: E402
from bench.harness import emit, interleaved, log, machine, medians, ort_runner, ratios  # noqa: E402
from tome_export.exporter import scatter_lowering  # noqa: E402
from tome_export.exporter.onnx_export import export_onnx  # noqa: E402
from tome_export.merging import apply  # noqa: E402

VIT_SCALES = {"vit_s": (384, 6), "vit_b": (768, 12)}


def runner_for(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...]):
    exported = export_onnx(model, inputs)
    runner = ort_runner(exported.model)
    feeds = {name: t.numpy() for name, t in zip(exported.input_names, inputs)}
    return lambda: runner.run(feeds)


def merge_op(batch: int, tokens: int, channels: int, r: int, one_hot: bool):
    """The merge op alone, exported with one way of summing merged rows."""
    generator = torch.Generator().manual_seed(0)
    inputs = (
        torch.randn(batch, tokens, 64, generator=generator),
        torch.randn(batch, tokens, channels, generator=generator),
        torch.rand(batch, tokens, 1, generator=generator) + 1.0,
    )
    saved = scatter_lowering.ONE_HOT_MAX_ROWS
    scatter_lowering.ONE_HOT_MAX_ROWS = tokens if one_hot else -1
    try:
        return runner_for(MergeOnly(r, 1), inputs)
    finally:
        scatter_lowering.ONE_HOT_MAX_ROWS = saved


def block_flops(tokens: int, channels: int, r: int) -> float:
    """Multiply-adds of a ViT block: attention (QKV, scores, values, proj) at N, MLP at N - r."""
    attention = 4 * tokens * channels**2 + 2 * tokens**2 * channels
    return attention + 8 * (tokens - r) * channels**2


def bench_share(batch: int, runs: int) -> dict:
    results = {}
    for name, (channels, heads) in VIT_SCALES.items():
        torch.manual_seed(0)
        tokens = (torch.randn(batch, 197, channels),)
        variants = {
            "unmerged_block": runner_for(apply(OneVitBlock(channels, heads).eval(), "tome", r=0), tokens),
            "merged_block": runner_for(apply(OneVitBlock(channels, heads).eval(), "tome", r=16), tokens),
            "merge_op": merge_op(batch, 197, channels, 16, scatter_lowering.one_hot_pays(197, 16)),
        }
        ms = medians(interleaved(variants, runs, warmup=5))
        flop_ratio = block_flops(197, channels, 16) / block_flops(197, channels, 0)
        results[name] = {
            "median_ms": ms,
            "merge_share": round(ms["merge_op"] / ms["merged_block"], 4),
            "merge_share_goal": "<= 0.03",
            "block_without_merge_vs_unmerged_at_equal_flops": round(
                (ms["merged_block"] - ms["merge_op"]) / (ms["unmerged_block"] * flop_ratio), 3
            ),
            "equal_flops_goal": "<= 1.02",
        }
        log(f"batch {batch} {name}: {results[name]}")
    return results


def bench_sum_strategy(runs: int, quick: bool) -> dict:
    cases = [(197, 384, 16), (577, 768, 16), (577, 768, 144), (1370, 384, 8), (1370, 384, 32)]
    if quick:
        cases = cases[:2]
    results = {}
    for tokens, channels, r in cases:
        variants = {way: merge_op(1, tokens, channels, r, way == "one_hot") for way in ("one_hot", "scatter")}
        ms = medians(interleaved(variants, runs, warmup=5))
        key = f"N{tokens}_C{channels}_r{r}"
        results[key] = {
            "median_ms": ms,
            "one_hot_over_scatter": ratios(ms, "scatter")["one_hot/scatter"],
            "lowering_uses": "one_hot" if scatter_lowering.one_hot_pays(tokens, r) else "scatter",
        }
        log(f"{key}: {results[key]}")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--quick", action="store_true", help="few runs, batch 1, small cases: checks the script")
    args = parser.parse_args()
    runs = 3 if args.quick else args.runs
    emit(
        {
            "bench": "merge_op_cpu",
            "machine": machine(),
            "runs": runs,
            "share": {f"batch{b}": bench_share(b, runs) for b in ((1,) if args.quick else (1, 8))},
            "sum_strategy": bench_sum_strategy(runs, args.quick),
        }
    )


if __name__ == "__main__":
    main()
