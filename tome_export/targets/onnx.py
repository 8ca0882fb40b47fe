"""``--target onnx``: an ONNX graph verified on ONNX Runtime."""

from __future__ import annotations

from pathlib import Path

import onnx

from tome_export.errors import VerificationError
from tome_export.targets import ExportContext, Target, register_target


def _io_spec(graph_values, names: list[str]) -> list[dict]:
    by_name = {v.name: v for v in graph_values}
    specs = []
    for name in names:
        tensor = by_name[name].type.tensor_type
        specs.append(
            {
                "name": name,
                "shape": [d.dim_value if d.HasField("dim_value") else d.dim_param for d in tensor.shape.dim],
                "dtype": onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name,
            }
        )
    return specs


def save_onnx(model: onnx.ModelProto, path: Path) -> None:
    """Saves with external data past protobuf's 2 GB limit."""
    large = model.ByteSize() > 1_800_000_000
    onnx.save_model(model, str(path), save_as_external_data=large, location=f"{path.name}.data" if large else None)


def export_and_verify_onnx(ctx: ExportContext, filename: str = "model.onnx", providers=("CPUExecutionProvider",)):
    """Export with the context's lowering, save, verify on ONNX Runtime; fills the manifest."""
    from tome_export.exporter.onnx_export import export_onnx
    from tome_export.runtimes.onnxruntime import OnnxRuntimeRunner
    from tome_export.verify import verify

    with ctx.progress.step(f"exporting to ONNX (lowering {ctx.lowering}, opset {ctx.options.opset})"):
        exported = export_onnx(ctx.model, ctx.example_inputs(), ctx.lowering, ctx.options.opset)
    save_onnx(exported.model, ctx.bundle_dir / filename)
    graph = exported.model.graph
    ctx.manifest.update(
        {
            "artifact": filename,
            "inputs": _io_spec(graph.input, exported.input_names),
            "outputs": _io_spec(graph.output, exported.output_names),
            "rewrites": exported.rewrites,
        }
    )
    if exported.custom_domains:
        ctx.manifest["custom_domains"] = exported.custom_domains
    if exported.lowering_notes:
        ctx.manifest["lowering_notes"] = exported.lowering_notes
        for note in exported.lowering_notes:
            ctx.progress.say(note["message"])
    if not ctx.options.verify:
        ctx.manifest["verification"] = {"skipped": True}
        return exported
    with ctx.progress.step(f"verifying on ONNX Runtime against eager PyTorch ({ctx.options.seeds} seeds)"):
        runner = OnnxRuntimeRunner(exported.with_decisions, providers=tuple(providers))
        result = verify(
            ctx.model,
            runner.run,
            exported.input_names,
            exported.output_names,
            exported.decision_names,
            ctx.input_shapes,
            seeds=range(ctx.options.seeds),
            atol=ctx.options.atol,
            on_seed=ctx.progress.tick,
            pin_decisions=ctx.options.pin_decisions,
        )
    ctx.manifest["verification"] = result.to_dict()
    ctx.progress.say(result.summary())
    if not result.passed:
        raise VerificationError(f"{result.summary()}; nothing was written (--no-verify keeps the export unchecked)")
    return exported


register_target(
    Target(
        name="onnx",
        description="ONNX graph verified on ONNX Runtime (CPU; CUDA with --device nvidia-*)",
        default_lowering="scatter",
        lowerings=("scatter", "dense", "plugin"),
        build=export_and_verify_onnx,
    )
)
