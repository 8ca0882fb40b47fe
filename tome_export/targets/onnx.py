"""``--target onnx``: an ONNX graph verified on ONNX Runtime.

Owns the ONNX target: export with the chosen lowering, verification on ONNX Runtime (CPU, or
CUDA graphs for NVIDIA device profiles), saving the graph and its input/output specs for the
manifest.
"""

from __future__ import annotations

from pathlib import Path

import onnx

from tome_export.targets import ExportContext, Target, register_target
from tome_export.targets.common import verify_against_eager


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


def export_and_verify_onnx(
    ctx: ExportContext,
    filename: str = "model.onnx",
    providers=("CPUExecutionProvider",),
    make_runner=None,
    runtime: str = "onnxruntime",
):
    """Export with the context's lowering, save, verify on ONNX Runtime; fills the manifest."""
    from tome_export.exporter.onnx_export import export_onnx
    from tome_export.runtimes.onnxruntime import OnnxRuntimeRunner

    with ctx.progress.step(f"exporting to ONNX (lowering {ctx.lowering}, opset {ctx.options.opset})"):
        exported = export_onnx(ctx.model, ctx.example_inputs(), ctx.lowering, ctx.options.opset)
    save_onnx(exported.model, ctx.bundle_dir / filename)
    for rewrite in exported.rewrites:
        ctx.progress.say(f"rewrote {rewrite.get('node', rewrite['op'])} ({rewrite['op']}) → {rewrite['became']}")
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
    runner = (
        make_runner(exported.with_decisions)
        if make_runner
        else OnnxRuntimeRunner(exported.with_decisions, providers=tuple(providers))
    )
    verify_against_eager(ctx, runner.run, exported.input_names, exported.output_names, exported.decision_names, runtime)
    return exported


def build_onnx(ctx: ExportContext):
    """CPU by default; ``--device nvidia-*``: CUDA EP with CUDA graphs (see runtimes/ort_cuda.py)."""
    if ctx.device.kind != "nvidia":
        return export_and_verify_onnx(ctx)
    from tome_export.runtimes.ort_cuda import CudaGraphRunner, require_cuda_provider

    require_cuda_provider()  # before any work: exit 3 with the install hint
    runners = []

    def make_runner(model):
        # TF32 off while verifying: it flips near-tie merge decisions (see DESIGN.md).
        runners.append(CudaGraphRunner(model, cuda_graph=True, tf32=False))
        return runners[-1]

    exported = export_and_verify_onnx(ctx, make_runner=make_runner)
    runner = runners[0] if runners else None
    ctx.manifest["onnxruntime"] = {
        "provider": "CUDAExecutionProvider",
        "static_shapes": True,
        "cuda_graph": runner.cuda_graph if runner else None,
        "cuda_graph_fallback": getattr(runner, "fallback_reason", None),
        "session_options": {"enable_cuda_graph": "1", "use_tf32": "0 while verifying"},
    }
    return exported


register_target(
    Target(
        name="onnx",
        description="ONNX graph verified on ONNX Runtime (CPU; CUDA with --device nvidia-*)",
        default_lowering="scatter",
        lowerings=("scatter", "dense", "plugin"),
        build=build_onnx,
    )
)
