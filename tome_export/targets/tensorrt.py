"""``--target trt``: a TensorRT-ready ONNX graph, verified, plus engines or their build scripts.

The hooks this target adds to the one export path (``targets/export_path.py``):

1. ``prepare``: the weights fit the device's memory budget; ``--build-engine`` rules (the
   TensorRT an engine for this device needs is installed);
2. export with the ``dense`` lowering (plain TensorRT layers) or ``plugin`` (one
   ``tome_export::BipartiteMerge`` node per merge, run by the Triton merge plugin);
3. ``graph_passes``: plugin nodes marked for TensorRT's parser, then the TensorRT-readiness
   check (``trt_engines.check_graph``: TensorRT for RTX's parser where installed, else the
   hand-written rules of ``graph_passes/trt_readiness.py``), on by default;
4. ``verifier``: ONNX Runtime CPU against eager PyTorch (plugin graphs: the merge node runs
   the reference implementation through onnxruntime-extensions);
5. ``finalize`` = ``build_engine_or_scripts``, once every graph of the bundle exists (TDTM
   variants, dynamic-loading blocks): TensorRT for RTX engines (RTX-class devices), or
   standard TensorRT's engine / ``build_engine.sh`` + ``build_engine.py`` (``trt_scripts.py``).
"""

from __future__ import annotations

import shlex

from tome_export.contract import BIPARTITE_OP_TYPE, qualified_op
from tome_export.errors import BackendMissing, UserError
from tome_export.exporter.onnx_export import OnnxExport
from tome_export.targets.base import ExportContext, Target
from tome_export.targets.common import check_memory_budget
from tome_export.targets.trt_engines import check_graph, engine_flavour, finish_trt_bundle, require_engine_backend
from tome_export.targets.trt_scripts import (
    DEFAULT_TRT_VERSION,
    mark_plugin_nodes,
    tensorrt_available,
    trtexec_command,
    write_build_scripts,
)


def prepare(ctx: ExportContext) -> None:
    """Before any export: the weights fit the device; ``--build-engine`` can be honoured here."""
    device = ctx.device
    check_memory_budget(ctx)
    if ctx.options.build_engine and _built_on_device(ctx):
        raise UserError(
            f"{device.name} engines must be built on the device itself; drop --build-engine and run "
            "build_engine.sh from the bundle there"
        )
    require_engine_backend(ctx)  # TensorRT for RTX devices
    if ctx.options.build_engine and engine_flavour(ctx) == "standard" and not tensorrt_available():
        raise BackendMissing(
            "--build-engine needs TensorRT's Python package (pip install 'tome-export[trt]' from NVIDIA's index); "
            "without --build-engine the ONNX graph and build scripts are still produced"
        )


def _built_on_device(ctx: ExportContext) -> bool:
    return bool(ctx.device.get("engine_built_on_device", False))


def graph_passes(ctx: ExportContext, exported: OnnxExport) -> None:
    """Mark the plugin nodes; refuse a graph TensorRT's parser would not take (unless --no-trt-check)."""
    plugin_nodes = mark_plugin_nodes(exported.model)
    trt_version = str(ctx.device.get("tensorrt", DEFAULT_TRT_VERSION))
    report = None
    if ctx.options.trt_check:  # TensorRT's own parser where installed (trt_engines.py)
        weights_dir = exported.external_data.parent if exported.external_data is not None else None
    report = check_graph(ctx, exported.model, plugin_nodes, trt_version, weights_dir)
    ctx.manifest.setdefault("tensorrt", {}).update(
        {
            "readiness": report or {"skipped": True},
            "plugins": [qualified_op(BIPARTITE_OP_TYPE)] if plugin_nodes else [],
            "tensorrt_version_expected": trt_version,
        }
    )


def verifier(ctx: ExportContext, exported: OnnxExport):
    """ONNX Runtime CPU. Plugin nodes run the reference merge through onnxruntime-extensions
    (checks the graph around the plugin; the kernel itself is tested with Triton's interpreter)."""
    from tome_export.runtimes.onnxruntime import OnnxRuntimeRunner

    runtime = "onnxruntime CPU" + (" + reference merge op" if exported.custom_domains else "")
    return OnnxRuntimeRunner(exported.with_decisions), runtime


def build_engine_or_scripts(ctx: ExportContext) -> None:
    """Once every graph of the bundle exists: engines (TensorRT for RTX) for each graph, or
    standard TensorRT's engine / build scripts for the main graph (``trt_engines.finish_trt_bundle``)."""
    info = ctx.manifest.setdefault("tensorrt", {})
    plugin_nodes = bool(info.get("plugins"))
    info.update(
        {
            "trtexec": None
            if plugin_nodes
            else shlex.join(trtexec_command(ctx, ctx.manifest["artifact"], "model.plan")),
            "engine_built_on_device": _built_on_device(ctx),
        }
    )
    finish_trt_bundle(ctx)


TARGET = Target(
    name="trt",
    description="TensorRT-ready ONNX (readiness-checked, verified) + engines or build scripts",
    default_lowering="dense",
    lowerings=("dense", "plugin"),
    prepare=prepare,
    graph_passes=graph_passes,
    verifier=verifier,
    variants=True,  # TDTM: one engine per variant, built in finalize
    finalize=build_engine_or_scripts,
)


__all__ = [
    "TARGET",
    "build_engine_or_scripts",
    "graph_passes",
    "mark_plugin_nodes",
    "prepare",
    "tensorrt_available",
    "trtexec_command",
    "verifier",
    "write_build_scripts",
]
