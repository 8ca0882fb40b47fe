"""``--target onnx``: an ONNX graph verified on ONNX Runtime — the hooks it adds to the export path.

CPU by default. ``--device nvidia-*``: the graph is verified on the CUDA execution provider
with CUDA graphs (``runtimes/ort_cuda.py``), TF32 off while verifying (it flips near-tie
merge decisions), and the manifest's ``onnxruntime`` section says how it ran.
"""

from __future__ import annotations

from typing import Any

from tome_export.exporter.onnx_export import OnnxExport
from tome_export.targets.base import ExportContext, Target


def _on_cuda(ctx: ExportContext) -> bool:
    return ctx.device.kind == "nvidia"


def prepare(ctx: ExportContext) -> None:
    """``--device nvidia-*`` needs onnxruntime-gpu: exit 3 with the install hint before any work."""
    if _on_cuda(ctx):
        from tome_export.runtimes.ort_cuda import require_cuda_provider

        require_cuda_provider()


def verifier(ctx: ExportContext, exported: OnnxExport) -> tuple[Any, str]:
    if not _on_cuda(ctx):
        from tome_export.runtimes.onnxruntime import OnnxRuntimeRunner

        return OnnxRuntimeRunner(exported.with_decisions), "onnxruntime"
    from tome_export.runtimes.ort_cuda import CudaGraphRunner

    return CudaGraphRunner(exported.with_decisions, cuda_graph=True, tf32=False), "onnxruntime"


def build(ctx: ExportContext, exported: OnnxExport, artifact: str, runner: Any) -> None:
    """Records how the CUDA execution provider ran the verified graph (nothing to build on CPU)."""
    if not _on_cuda(ctx):
        return
    ctx.manifest["onnxruntime"] = {
        "provider": "CUDAExecutionProvider",
        "static_shapes": True,
        "cuda_graph": runner.cuda_graph if runner else None,
        "cuda_graph_fallback": getattr(runner, "fallback_reason", None),
        "session_options": {"enable_cuda_graph": "1", "use_tf32": "0 while verifying"},
    }


TARGET = Target(
    name="onnx",
    description="ONNX graph verified on ONNX Runtime (CPU; CUDA with --device nvidia-*)",
    default_lowering="scatter",
    lowerings=("scatter", "dense", "plugin"),
    prepare=prepare,
    verifier=verifier,
    build=build,
    device_precision=False,
    variants=True,
)
