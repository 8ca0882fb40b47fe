"""The one export-and-verify path every target goes through.

:func:`export_and_verify` is the sequence — export (with the target's lowering) → the
precision pass (``precision_pass.py``: fp16 / int8, merge kept fp32) → the target's graph
passes → save the shipped graph → verify against eager PyTorch on the target's runtime →
manifest entries (artifact, inputs, outputs, rewrites, the opset written, lowering notes,
custom domains) — and :func:`build_single` adds the target's build step (engines, build
scripts, converted models) after it. TDTM's merged + full variants
(``targets/video.py``) call the same function once per variant. A target changes the
path only through the hooks of its :class:`~tome_export.targets.base.Target` record.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tome_export.exporter.onnx_export import OnnxExport, export_onnx
from tome_export.targets.base import ExportContext, Target
from tome_export.targets.common import io_spec, save_onnx, verify_against_eager
from tome_export.targets.precision_pass import apply_precision

MAIN_ARTIFACT = "model.onnx"


def default_export(ctx: ExportContext) -> OnnxExport:
    """torch.export → ONNX with the context's lowering of every merge op."""
    return export_onnx(ctx.model, ctx.example_inputs(), ctx.lowering, ctx.options.opset)


def default_verifier(ctx: ExportContext, exported: OnnxExport) -> tuple[Any, str]:
    """ONNX Runtime CPU on the graph that still has the decision outputs."""
    from tome_export.runtimes.onnxruntime import OnnxRuntimeRunner

    return OnnxRuntimeRunner(exported.with_decisions), "onnxruntime"


def export_and_verify(ctx: ExportContext, target: Target, artifact: str = MAIN_ARTIFACT) -> tuple[OnnxExport, Any]:
    """Export, run the target's graph passes, save ``artifact``, verify; returns (export, runner).

    The runner is what verification ran on (None with ``--no-verify``); the manifest gets
    the same entries for every target."""
    with ctx.progress.step(
        f"exporting to ONNX for target {target.name} (lowering {ctx.lowering}, opset {ctx.options.opset})"
    ):
        exported = (target.export or default_export)(ctx)
    for rewrite in exported.rewrites:
        ctx.progress.say(f"rewrote {rewrite.get('node', rewrite['op'])} ({rewrite['op']}) → {rewrite['became']}")
    for note in exported.lowering_notes:
        ctx.progress.say(note["message"])
    if ctx.precision is not None:
        apply_precision(ctx, exported, target.name)
    if target.graph_passes is not None:
        target.graph_passes(ctx, exported)
    if target.ships_onnx:
        save_onnx(exported.model, ctx.bundle_dir / artifact)
        graph = exported.model.graph
        ctx.manifest.update(
            {
                "artifact": artifact,
                "inputs": io_spec(graph.input, exported.input_names),
                "outputs": io_spec(graph.output, exported.output_names),
                "rewrites": exported.rewrites,
                # The opset the exporter really wrote (torch.onnx may raise the requested one).
                "opset": next(o.version for o in exported.model.opset_import if o.domain in ("", "ai.onnx")),
            }
        )
    if exported.custom_domains:
        ctx.manifest["custom_domains"] = exported.custom_domains
    if exported.lowering_notes:
        ctx.manifest["lowering_notes"] = exported.lowering_notes
    if not ctx.options.verify:
        ctx.manifest["verification"] = {"skipped": True}
        return exported, None
    runner, runtime = (target.verifier or default_verifier)(ctx, exported)
    verify_against_eager(ctx, runner.run, exported.input_names, exported.output_names, exported.decision_names, runtime)
    if ctx.precision is not None and ctx.precision.precision != "fp32" and exported.decision_names:
        if ctx.options.unmerged_baseline:
            from tome_export.targets.unmerged_baseline import verify_unmerged

            verify_unmerged(ctx, target)
    return exported, runner


def build_single(ctx: ExportContext, target: Target, artifact: str = MAIN_ARTIFACT) -> OnnxExport:
    """One verified graph, then the target's build step."""
    exported, runner = export_and_verify(ctx, target, artifact)
    if target.build is not None:
        target.build(ctx, exported, artifact, runner)
    return exported


Builder = Callable[[ExportContext, Target], Any]


def build_bundle(ctx: ExportContext, target: Target, builder: Builder = build_single) -> None:
    """Everything a target writes: the target's checks first, then one graph (``build_single``)
    or, for methods that ship variants, ``video.build_tdtm_variants``."""
    if target.prepare is not None:
        target.prepare(ctx)
    builder(ctx, target)


__all__ = ["MAIN_ARTIFACT", "build_bundle", "build_single", "default_export", "default_verifier", "export_and_verify"]
