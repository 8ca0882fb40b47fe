"""``--target onnx``: an ONNX graph verified on ONNX Runtime."""

from __future__ import annotations

import gc
from pathlib import Path

import onnx

from tome_export.runtimes.onnxruntime import OnnxRuntimeRunner
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
    """Saves the graph; a graph whose weights are external already (``export_onnx`` with
    ``external_data``) is small and must sit next to its weights file."""
    from tome_export.graph_passes.external_data import EXTERNAL_DATA_THRESHOLD, uses_external_data

    if uses_external_data(model):
        onnx.save_model(model, str(path))
        return
    large = model.ByteSize() > EXTERNAL_DATA_THRESHOLD
    onnx.save_model(model, str(path), save_as_external_data=large, location=f"{path.name}.data" if large else None)


def _verification_runner(ctx: ExportContext, exported, make_runner, providers, filename: str):
    """The runner verification uses. A graph with external weights runs from a file next
    to them (ONNX Runtime resolves external data relative to the graph's path); that file
    is removed once the session holds the weights."""
    if exported.external_data is None:
        model = exported.with_decisions
        return make_runner(model) if make_runner else OnnxRuntimeRunner(model, providers=tuple(providers))
    path = ctx.bundle_dir / f".verify-{filename}"
    onnx.save_model(exported.with_decisions, str(path))
    try:
        return make_runner(str(path)) if make_runner else OnnxRuntimeRunner(str(path), providers=tuple(providers))
    finally:
        path.unlink()


def export_and_verify_onnx(
    ctx: ExportContext,
    filename: str = "model.onnx",
    providers=("CPUExecutionProvider",),
    make_runner=None,
    runtime: str = "onnxruntime",
    external_data: bool = True,
):
    """Export with the context's lowering, save, verify on ONNX Runtime; fills the manifest.

    ``external_data``: weights over the threshold go to ``{filename}.data`` beside the graph
    (False for callers that store weights themselves, e.g. TDTM's shared weights file)."""
    from tome_export.exporter.onnx_export import export_onnx

    weights = ctx.bundle_dir / f"{filename}.data" if external_data else None
    threshold = getattr(ctx.options, "external_data_threshold", None)
    with ctx.progress.step(f"exporting to ONNX (lowering {ctx.lowering}, opset {ctx.options.opset})"):
        exported = export_onnx(ctx.model, ctx.example_inputs(), ctx.lowering, ctx.options.opset, weights, threshold)
    save_onnx(exported.model, ctx.bundle_dir / filename)
    if exported.external_data is not None:
        ctx.manifest["external_data"] = exported.external_data.name
        ctx.progress.say(f"weights in {exported.external_data.name} (external data: over the threshold for one proto)")
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
    runner = _verification_runner(ctx, exported, make_runner, providers, filename)
    verify_against_eager(ctx, runner.run, exported.input_names, exported.output_names, exported.decision_names, runtime)
    del runner  # an SD-size session holds GBs
    gc.collect()
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
