"""Validate the cost model: predicted vs measured speed-up vs r=0 on ONNX Runtime CPU.

For each model (timm, random weights) it exports r=0 and several r with tome-export's
exporter (scatter lowering), times the variants of one model interleaved in one process
(bench/harness.py: warm-up, medians of --runs, ORT sessions without thread spinning), and
compares the measured speed-up with tome_export.cost_model's prediction from the
same token counts. Goal: within 10%. The set: ViT-S/16 and ViT-B/16 at 224 and 384,
DINOv2-S/14 at 518 (1370 tokens; r=8 measured 0.95× before: the case that doesn't pay).

    python bench/bench_cost_model.py [--quick] [--runs 20] [--models vit_s_224,dinov2_s_518]
        [--coefficients FILE.json]

--quick: ViT-S/16 at 224, r=0,8,16, 5 runs (checks the script; numbers are not a validation).
Needs a quiet machine for the full run (several GB of RAM for ViT-B/384). One JSON object
is printed last.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import onnxruntime as ort  # noqa: E402

import tome_export  # noqa: E402
from bench.harness import emit, interleaved, log, machine, medians, ort_runner  # noqa: E402
from tome_export import cost_model as cm  # noqa: E402
from tome_export.exporter.onnx_export import export_onnx  # noqa: E402

# name: (timm model, image size, r values)
MODELS = {
    "vit_s_224": ("vit_small_patch16_224", 224, (0, 8, 16)),
    "vit_s_384": ("vit_small_patch16_384", 384, (0, 8, 16, 32)),
    "vit_b_224": ("vit_base_patch16_224", 224, (0, 8, 16)),
    "vit_b_384": ("vit_base_patch16_384", 384, (0, 8, 16, 32)),
    "dinov2_s_518": ("vit_small_patch14_dinov2", 518, (0, 8, 32)),
}
QUICK = {"vit_s_224": ("vit_small_patch16_224", 224, (0, 8, 16))}
GOAL = 0.10


def build(timm_name: str, img: int):
    import timm

    torch.manual_seed(0)
    return timm.create_model(timm_name, pretrained=False, img_size=img).eval()


def measure_model(name: str, timm_name: str, img: int, r_values, coefficients, runs: int, warmup: int) -> dict:
    x = torch.randn(1, 3, img, img)
    variants, predictions, tokens = {}, {}, None
    for r in r_values:
        model = build(timm_name, img)
        tome_export.apply(model, method="tome", r=r)
        exported = export_onnx(model, (x,))
        state = model._tome_state
        shape = cm.shape_of(model, 1, patch_tokens=state.tokens_per_layer[0] - state.protected)
        tokens = state.tokens_per_layer[0]
        predictions[r] = cm.predict(state.tokens_per_layer, state.r_per_layer, shape, coefficients)
        session = ort_runner(exported.model).session
        feeds = {exported.input_names[0]: x.numpy()}
        variants[f"r{r}"] = lambda s=session, f=feeds: s.run(None, f)
        log(f"{name}: exported r={r} ({state.tokens_per_layer[0]} tokens, predicted {predictions[r].speedup:.3f}×)")
        del model, exported
    timings = interleaved(variants, runs, warmup)
    ms = medians(timings)
    rows = {"0": {"ms": ms["r0"], "p90_ms": round(timings["r0"].p90_ms, 3)}}
    for r in r_values[1:]:
        measured = ms["r0"] / ms[f"r{r}"]
        predicted = predictions[r].speedup
        rows[str(r)] = {
            "ms": ms[f"r{r}"],
            "p90_ms": round(timings[f"r{r}"].p90_ms, 3),
            "measured_speedup": round(measured, 3),
            "predicted_speedup": round(predicted, 3),
            "flop_ratio": round(predictions[r].flop_ratio, 3),
            "predicted_merge_cost": round(predictions[r].merge_cost, 4),
            "relative_error": round(predicted / measured - 1, 3),
            "pays_measured": measured >= cm.PAYS_THRESHOLD,
            "pays_predicted": predicted >= cm.PAYS_THRESHOLD,
        }
    return {"timm": timm_name, "image": img, "tokens": tokens, "per_r": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--models", default=None, help=f"comma-separated subset of {', '.join(MODELS)}")
    parser.add_argument("--coefficients", default=None, help="a cost_coefficients.json to validate instead")
    args = parser.parse_args()
    path = Path(args.coefficients) if args.coefficients else cm.COEFFICIENTS_FILE
    coefficients = cm.coefficients_for("cpu", "onnx", path)
    if coefficients is None:
        sys.exit(f"no onnxruntime CPU coefficients in {path}: run bench/calibrate_cost_model.py --write first")
    chosen = QUICK if args.quick else MODELS
    if args.models:
        chosen = {k: MODELS[k] for k in args.models.split(",")}
    runs = 5 if args.quick else args.runs
    results = {}
    for name, (timm_name, img, r_values) in chosen.items():
        results[name] = measure_model(name, timm_name, img, r_values, coefficients, runs, args.warmup)
    rows = [row for res in results.values() for r, row in res["per_r"].items() if r != "0"]
    errors = [abs(row["relative_error"]) for row in rows]
    emit(
        {
            "bench": "cost_model",
            "machine": machine(),
            "onnxruntime": ort.__version__,
            "coefficients": {"name": coefficients.name, "machine": coefficients.machine, "file": str(path)},
            "quick": args.quick,
            "runs": runs,
            "results": results,
            "max_abs_relative_error": round(max(errors), 3) if errors else None,
            "within_goal": sum(e <= GOAL for e in errors),
            "predictions": len(errors),
            "pays_agreement": sum(row["pays_measured"] == row["pays_predicted"] for row in rows),
        }
    )


if __name__ == "__main__":
    main()
