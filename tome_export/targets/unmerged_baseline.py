"""The unmerged model at the export's precision: what quantization alone costs, next to the merge.

At fp16/int8 an export's error against eager fp32 mixes two costs: the precision's and the
merge's (a near-tie decision flipped by rounding). :func:`verify_unmerged` loads the source
model afresh (no merging), exports it, converts it exactly like the merged graph (same
precision, same calibration) and compares it with its own eager fp32 on the same seeds, so
the manifest's ``verification.unmerged_same_precision`` shows the precision's own cost.
It informs; the export's pass/fail stays the merged graph's.
"""

from __future__ import annotations

from tome_export.errors import TomeExportError, first_line
from tome_export.targets.base import ExportContext, Target


def verify_unmerged(ctx: ExportContext, target: Target) -> dict:
    """Export, convert and verify the unmerged source model; records and returns the figures."""
    from tome_export.exporter.load import load_model
    from tome_export.exporter.onnx_export import export_onnx
    from tome_export.inputs import make_inputs
    from tome_export.runtimes.onnxruntime import OnnxRuntimeRunner
    from tome_export.targets.precision_pass import calibration_feeds, convert
    from tome_export.verify import verify

    options, plan = ctx.options, ctx.precision
    section: dict
    with ctx.progress.step(f"verifying the unmerged model at {plan.precision} (the precision's own cost)"):
        try:
            loaded = load_model(options.model, options.weights, options.trust_pickle)
            if loaded.module is None:
                raise TomeExportError("the source loads as a program, not a module")
            unmerged = loaded.module.eval()
            exported = export_onnx(unmerged, make_inputs(unmerged, ctx.input_shapes, 0), "dense", options.opset)
            calibration = calibration_feeds(ctx, exported.input_names)[0] if plan.int8_mode == "static" else None
            converted, _ = convert(exported.with_decisions, plan, target.name, calibration)
            result = verify(
                unmerged,
                OnnxRuntimeRunner(converted).run,
                exported.input_names,
                exported.output_names,
                [],
                ctx.input_shapes,
                seeds=range(options.seeds),
                atol=plan.tolerance.atol,
                min_cosine=plan.tolerance.min_cosine,
            )
        except Exception as exc:  # informative only: the merged export's verification already passed
            section = {"error": first_line(exc, 200)}
        else:
            section = {
                "max_abs_err": result.max_abs_err,
                "cosine": result.cosine,
                "within_tolerance": result.passed,
                "reference": "the unmerged source model, eager fp32",
            }
    verification = ctx.manifest.setdefault("verification", {})
    verification["unmerged_same_precision"] = section
    if "cosine" in section:
        ctx.progress.say(
            f"unmerged model at {plan.precision}: cosine {section['cosine']:.6f}, max abs err "
            f"{section['max_abs_err']:.3g} (merged: cosine {verification.get('cosine', float('nan')):.6f})"
        )
    return section


__all__ = ["verify_unmerged"]
