"""The one export-and-verify path every target goes through.

:func:`export_and_verify` is the sequence — export (with the target's lowering) → the
precision pass (``precision_pass.py``: fp16 / int8, merge kept fp32) → the target's graph
passes → save the shipped graph → verify against eager PyTorch on the target's runtime →
manifest entries (artifact, inputs, outputs, rewrites, the opset written, lowering notes,
custom domains) — and :func:`build_single` adds the target's build step (engines, build
scripts, converted models) after it. TDTM's merged + full variants
(``targets/video.py``) call the same function once per variant. A target changes the
path only through the hooks of its :class:`~tome_export.targets.base.Target` record.

Weights over ``ExportOptions.external_data_threshold`` (default under protobuf's 2 GB) go
to ``{artifact}.data`` beside the graph (listed and checksummed like every artifact); such
a graph verifies on ONNX Runtime CPU from a file next to its weights.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tome_export.exporter.onnx_export import OnnxExport, export_onnx
from tome_export.targets.base import ExportContext, Target
from tome_export.targets.common import io_spec, save_onnx, verify_against_eager
from tome_export.targets.precision_pass import apply_precision

MAIN_ARTIFACT = "model.onnx"


def default_export(ctx: ExportContext, external_data: Path | None = None) -> OnnxExport:
    """torch.export → ONNX with the context's lowering of every merge op; weights over the
    threshold streamed to ``external_data`` when given."""
    return export_onnx(
        ctx.model,
        ctx.example_inputs(),
        ctx.lowering,
        ctx.options.opset,
        external_data=external_data,
        external_threshold=ctx.options.external_data_threshold,
    )


def default_verifier(ctx: ExportContext, exported: OnnxExport) -> tuple[Any, str]:
    """ONNX Runtime CPU on the graph that still has the decision outputs."""
    from tome_export.runtimes.onnxruntime import OnnxRuntimeRunner

    return OnnxRuntimeRunner(exported.with_decisions), "onnxruntime"


def external_data_verifier(ctx: ExportContext, exported: OnnxExport, artifact: str) -> tuple[Any, str]:
    """ONNX Runtime CPU on a graph whose weights are in an external file (no single-proto
    form past 2 GB): the graph with decisions is saved beside its weights, loaded from that
    path (weights memory-mapped, not copied), and removed once the session holds them."""
    import onnx

    from tome_export.runtimes.onnxruntime import OnnxRuntimeRunner

    path = ctx.bundle_dir / f".verify-{artifact}"
    onnx.save_model(exported.with_decisions, str(path))
    try:
        return OnnxRuntimeRunner(str(path)), "onnxruntime"
    finally:
        path.unlink()


def export_and_verify(
    ctx: ExportContext, target: Target, artifact: str = MAIN_ARTIFACT, external_data: bool = True
) -> tuple[OnnxExport, Any]:
    """Export, run the target's graph passes, save ``artifact``, verify; returns (export, runner).

    The runner is what verification ran on (None with ``--no-verify``); the manifest gets
    the same entries for every target. ``external_data=False``: weights stay in the proto
    (TDTM's variants store them in one shared file themselves)."""
    with ctx.progress.step(
        f"exporting to ONNX for target {target.name} (lowering {ctx.lowering}, opset {ctx.options.opset})"
    ):
        if target.export is not None:
            exported = target.export(ctx)
        else:
            weights = ctx.bundle_dir / f"{artifact}.data" if external_data and target.ships_onnx else None
            exported = default_export(ctx, weights)
    if exported.external_data is not None:
        ctx.manifest["external_data"] = exported.external_data.name
        ctx.progress.say(f"weights in {exported.external_data.name} (external data: over the threshold for one proto)")
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
    if exported.external_data is not None:
        runner, runtime = external_data_verifier(ctx, exported, artifact)
    else:
        runner, runtime = (target.verifier or default_verifier)(ctx, exported)
    verify_against_eager(ctx, runner.run, exported.input_names, exported.output_names, exported.decision_names, runtime)
    if ctx.precision is not None and ctx.precision.precision != "fp32" and exported.decision_names:
        if ctx.options.unmerged_baseline and exported.external_data is not None:
            # A second full export of a model past 2 GB would double the peak memory
            # (SD-1.5 at fp16 was killed at 20 GB on a 24 GB machine): say it was not run.
            ctx.manifest.setdefault("verification", {})["unmerged_same_precision"] = {
                "skipped": "weights over one ONNX file: a second export would double peak memory"
            }
            ctx.progress.say("unmerged model at reduced precision not verified (weights over one ONNX file)")
        elif ctx.options.unmerged_baseline:
            from tome_export.targets.unmerged_baseline import verify_unmerged

            verify_unmerged(ctx, target)
    return exported, runner


def build_single(
    ctx: ExportContext, target: Target, artifact: str = MAIN_ARTIFACT, external_data: bool = True
) -> OnnxExport:
    """One verified graph, then the target's build step."""
    exported, runner = export_and_verify(ctx, target, artifact, external_data)
    if target.build is not None:
        target.build(ctx, exported, artifact, runner)
    del runner  # an SD-size session holds GBs
    gc.collect()
    return exported


Builder = Callable[[ExportContext, Target], Any]


def build_bundle(ctx: ExportContext, target: Target, builder: Builder = build_single) -> None:
    """Everything a target writes: the target's checks first, then one graph (``build_single``)
    or, for methods that ship variants, ``video.build_tdtm_variants``."""
    if target.prepare is not None:
        target.prepare(ctx)
    builder(ctx, target)


__all__ = [
    "MAIN_ARTIFACT",
    "build_bundle",
    "build_single",
    "default_export",
    "default_verifier",
    "export_and_verify",
    "external_data_verifier",
]
