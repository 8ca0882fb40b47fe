"""``--target coreml`` / ``--device apple-*``: an mlprogram ``.mlpackage`` for the Neural Engine.

Core ML has no ``scatter_reduce``, so every merge is lowered to dense ATen ops in the torch
graph (``merging/dense.py``) before coremltools converts it (fp16, CPU_AND_NE, iOS 17+).
The hooks this target adds to the one export path (``targets/export_path.py``):

- ``export``: the dense-lowered program exported to ONNX — a stand-in that is verified on
  ONNX Runtime against eager PyTorch (with merge-decision agreement) and not shipped;
  ``graph_passes`` refuse it if a Scatter op is left. Core ML prediction itself needs
  macOS and is NOT verified here;
- ``build``: conversion (``coreml_mil.py``), structure check (inputs/outputs, no scatter),
  an audit of MIL ops that commonly fall off the Neural Engine, and chunking of weights
  above the profile's per-chunk limit (``coreml_chunks.py``), each chunk checked in torch
  against the whole.
"""

from __future__ import annotations

from collections import Counter

import torch

from tome_export.errors import VerificationError
from tome_export.exporter.onnx_export import OnnxExport, WithDecisions, export_onnx
from tome_export.targets.base import ExportContext, Target
from tome_export.targets.common import check_memory_budget, weight_bytes
from tome_export.targets.coreml_chunks import split_into_chunks
from tome_export.targets.coreml_mil import (
    audit_neural_engine,
    convert_program,
    program_structure,
    refusing,
    require_coremltools,
)

STANDIN_RUNTIME = "onnxruntime (the dense program, stand-in for Core ML)"


def prepare(ctx: ExportContext) -> None:
    require_coremltools()
    check_memory_budget(ctx)


def export_standin(ctx: ExportContext) -> OnnxExport:
    """The dense-lowered program (merges as dense ATen ops) through the ONNX exporter."""
    from tome_export.merging.dense import export_dense

    inputs = ctx.example_inputs()
    program = refusing("torch.export with dense merges", export_dense, WithDecisions(ctx.model), inputs)
    return export_onnx(ctx.model, inputs, ctx.lowering, ctx.options.opset, program=program)


def refuse_scatter(ctx: ExportContext, exported: OnnxExport) -> None:
    scatter = sorted({n.op_type for n in exported.with_decisions.graph.node if n.op_type.startswith("Scatter")})
    if scatter:
        raise VerificationError(f"dense lowering left scatter ops in the graph: {scatter}")


def verifier(ctx: ExportContext, exported: OnnxExport):
    from tome_export.runtimes.onnxruntime import OnnxRuntimeRunner

    return OnnxRuntimeRunner(exported.with_decisions), STANDIN_RUNTIME


def build_mlpackages(ctx: ExportContext, exported: OnnxExport, onnx_name: str, runner=None) -> None:
    """Convert the dense program (in chunks past the profile's limit); audit; manifest."""
    from tome_export.merging.dense import export_dense

    device = ctx.device
    precision = ctx.precision.precision if ctx.precision is not None else device.precision
    inputs = ctx.example_inputs()
    with ctx.progress.step("torch.export with the merge lowered to dense ops (no scatter)"):
        program = refusing("torch.export with dense merges", export_dense, ctx.model, inputs)
    limit_mb = ctx.options.chunk_mb or device.get("max_weights_per_chunk_mb")
    total = weight_bytes(ctx.model, device.precision)
    pieces: list[tuple[str, torch.export.ExportedProgram, int]] = []
    chunk_check = None
    if limit_mb and total > limit_mb * 2**20:
        with ctx.progress.step(f"splitting {total / 2**20:.1f} MB of weights into chunks of ≤ {limit_mb} MB"):
            chunks, chunk_check = split_into_chunks(program, inputs, int(limit_mb * 2**20), device.precision)
            if chunk_check > (1e-4 if ctx.options.atol is None else ctx.options.atol):
                raise VerificationError(f"chained chunks differ from the whole model by {chunk_check:.3g}")
            for index, chunk in enumerate(chunks):
                piece = torch.export.export(chunk.module, chunk.example_inputs).run_decompositions({})
                pieces.append((f"model_chunk{index}.mlpackage", piece, chunk.weight_bytes))
    else:
        pieces.append(("model.mlpackage", program, total))
    converted = []
    for filename, piece, nbytes in pieces:
        with ctx.progress.step(f"converting to Core ML mlprogram ({filename})"):
            mlmodel = refusing("coremltools conversion", convert_program, piece, device, precision=precision)
            if precision == "int8":
                from tome_export.targets.coreml_precision import quantize_weights

                mlmodel = quantize_weights(mlmodel)
        structure = program_structure(mlmodel)
        if structure["scatter_ops"]:
            raise VerificationError(f"{filename}: converted program still has scatter ops")
        audit = audit_neural_engine(mlmodel)
        mlmodel.save(str(ctx.bundle_dir / filename))
        converted.append({"file": filename, "weights_mb": round(nbytes / 2**20, 3), **structure, "audit": audit})
    off = Counter()
    for item in converted:
        off.update(item["audit"]["off_neural_engine"])
    if off:
        ctx.progress.say(
            "Neural Engine audit: ops that commonly run off the ANE: "
            + ", ".join(f"{op}×{n}" for op, n in off.most_common())
        )
    ctx.manifest.update(
        {
            "artifact": converted[0]["file"] if len(converted) == 1 else [c["file"] for c in converted],
            "coreml": {
                "compute_units": device.get("compute_units", "CPU_AND_NE"),
                "precision": {
                    "fp32": "float32 compute",
                    "fp16": "float16 compute, merge metric ops float32",
                    "int8": "int8 weights (linear symmetric, per channel), float16 compute, merge metric ops float32",
                }[precision],
                "minimum_deployment_target": device.get("minimum_deployment_target", "iOS17"),
                "chunk_limit_mb": limit_mb,
                "weights_mb": round(total / 2**20, 3),
                "chunks_max_abs_err_vs_whole": chunk_check,
                "models": converted,
                "prediction": "not verified here (Core ML prediction needs macOS)",
            },
        }
    )
    ctx.progress.say("note: Core ML prediction needs macOS; verified the same dense program on ONNX Runtime instead")


TARGET = Target(
    name="coreml",
    description="Core ML mlprogram (.mlpackage, fp16, CPU_AND_NE), dense merge, ANE audit, chunking",
    default_lowering="dense",
    lowerings=("dense",),
    prepare=prepare,
    export=export_standin,
    graph_passes=refuse_scatter,
    verifier=verifier,
    build=build_mlpackages,
    ships_onnx=False,
    uses_onnx_lowering=False,
)

__all__ = ["TARGET", "build_mlpackages", "export_standin"]
