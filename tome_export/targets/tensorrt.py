"""``--target trt``: a TensorRT-ready ONNX graph, verified, plus the engine or its build scripts.

1. export with the ``dense`` lowering (plain TensorRT layers) or ``plugin`` (one
   ``tome_export::BipartiteMerge`` node per merge, run by the Triton merge plugin);
2. TensorRT-readiness check (``graph_passes/trt_readiness.py``), on by default;
3. verification on ONNX Runtime CPU against eager PyTorch (plugin graphs: the merge node
   runs the reference implementation through onnxruntime-extensions);
4. an engine through TensorRT's Python API when ``tensorrt`` imports and the profile does
   not require building on the device; always ``build_engine.sh`` / ``build_engine.py``.
"""

from __future__ import annotations

import importlib.util
import shlex
import shutil
from pathlib import Path

import onnx

from tome_export.errors import BackendMissing, UserError
from tome_export.targets import ExportContext, Target, register_target
from tome_export.targets.common import check_memory_budget, verify_against_eager

PLUGIN_DOMAIN, PLUGIN_OP = "tome_export", "BipartiteMerge"
DEFAULT_TRT_VERSION = "10.8"
HERE = Path(__file__).resolve().parent


def tensorrt_available() -> bool:
    """True when TensorRT's Python API imports (PyPI's ``tensorrt`` can be a stub that fails)."""
    if importlib.util.find_spec("tensorrt") is None:
        return False
    try:
        import tensorrt  # noqa: F401
    except Exception:
        return False
    return True


def mark_plugin_nodes(model: onnx.ModelProto) -> int:
    """Tell TensorRT's ONNX parser which plugin runs each merge node (namespace, version, AOT)."""
    count = 0
    for node in model.graph.node:
        if node.domain == PLUGIN_DOMAIN and node.op_type == PLUGIN_OP:
            present = {a.name for a in node.attribute}
            for name, value in (("plugin_namespace", PLUGIN_DOMAIN), ("plugin_version", "1"), ("aot", 1)):
                if name not in present:
                    node.attribute.append(onnx.helper.make_attribute(name, value))
            count += 1
    return count


def trtexec_command(ctx: ExportContext, onnx_name: str, plan_name: str) -> list[str]:
    """The exact trtexec invocation for a plugin-free graph on this device profile."""
    device = ctx.device
    command = ["trtexec", f"--onnx={onnx_name}", f"--saveEngine={plan_name}"]
    if device.precision == "fp16":
        command.append("--fp16")
    command += ["--timingCacheFile=timing.cache", f"--memPoolSize=workspace:{device.get('workspace_mb', 2048)}M"]
    if device.get("dla_cores", 0):
        command += ["--useDLACore=0", "--allowGPUFallback"]
    return command


def write_build_scripts(ctx: ExportContext, onnx_name: str, plugin_nodes: int) -> list[str]:
    """``build_engine.py`` always (with the merge plugin beside it when needed), ``build_engine.sh`` if plugin-free."""
    bundle = ctx.bundle_dir
    device = ctx.device
    written = ["build_engine.py"]
    shutil.copyfile(HERE / "trt_engine.py", bundle / "build_engine.py")
    py_args = [onnx_name, "model.plan", "--workspace-mb", str(device.get("workspace_mb", 2048))]
    if device.precision == "fp16":
        py_args.append("--fp16")
    if device.get("dla_cores", 0):
        py_args += ["--dla-core", "0"]
    if plugin_nodes:
        py_args.append("--merge-plugin")
        shutil.copyfile(HERE / "trt_plugin.py", bundle / "tome_merge_plugin.py")
        shutil.copyfile(HERE.parent / "kernels" / "triton_merge.py", bundle / "triton_merge.py")
        written += ["tome_merge_plugin.py", "triton_merge.py"]
    lines = [
        "#!/bin/sh",
        "# Build the TensorRT engine on the machine that will run it.",
        "set -e",
        'cd "$(dirname "$0")"',
    ]
    if not plugin_nodes:
        lines.append(shlex.join(trtexec_command(ctx, onnx_name, "model.plan")))
    else:
        lines.append("# The merge runs as a Python-registered plugin (AOT kernel): trtexec alone cannot load it.")
        lines.append(shlex.join(["python3", "build_engine.py", *py_args]))
    script = bundle / "build_engine.sh"
    script.write_text("\n".join(lines) + "\n")
    script.chmod(0o755)
    written.append("build_engine.sh")
    ctx.manifest.setdefault("tensorrt", {})["build_python"] = shlex.join(["python3", "build_engine.py", *py_args])
    return written


def build_tensorrt(ctx: ExportContext) -> None:
    from tome_export.exporter.onnx_export import export_onnx
    from tome_export.targets.onnx import _io_spec, save_onnx

    device = ctx.device
    check_memory_budget(ctx)
    build_engine = getattr(ctx.options, "build_engine", False)
    on_device = bool(device.get("engine_built_on_device", False))
    if build_engine and on_device:
        raise UserError(
            f"{device.name} engines must be built on the device itself; drop --build-engine and run "
            "build_engine.sh from the bundle there"
        )
    from tome_export.targets.trt_engines import check_graph, engine_flavour, require_engine_backend

    require_engine_backend(ctx)
    if build_engine and engine_flavour(ctx) == "standard" and not tensorrt_available():
        raise BackendMissing(
            "--build-engine needs TensorRT's Python package (pip install 'tome-export[trt]' from NVIDIA's index); "
            "without --build-engine the ONNX graph and build scripts are still produced"
        )
    with ctx.progress.step(f"exporting to ONNX for TensorRT (lowering {ctx.lowering}, opset {ctx.options.opset})"):
        exported = export_onnx(ctx.model, ctx.example_inputs(), ctx.lowering, ctx.options.opset)
    plugin_nodes = mark_plugin_nodes(exported.model)
    trt_version = str(device.get("tensorrt", DEFAULT_TRT_VERSION))
    onnx_name = "model.onnx"
    save_onnx(exported.model, ctx.bundle_dir / onnx_name)
    report = None
    if getattr(ctx.options, "trt_check", True):  # TensorRT's own parser where installed (trt_engines.py)
        report = check_graph(ctx, exported.model, ctx.bundle_dir / onnx_name, plugin_nodes, trt_version)
    graph = exported.model.graph
    ctx.manifest.update(
        {
            "artifact": onnx_name,
            "inputs": _io_spec(graph.input, exported.input_names),
            "outputs": _io_spec(graph.output, exported.output_names),
            "rewrites": exported.rewrites,
            "precision": device.precision,
        }
    )
    if ctx.options.verify:
        from tome_export.runtimes.onnxruntime import OnnxRuntimeRunner

        # Plugin nodes run the reference merge through onnxruntime-extensions (checks the
        # graph around the plugin; the kernel itself is tested with Triton's interpreter).
        runner = OnnxRuntimeRunner(exported.with_decisions)
        runtime = "onnxruntime CPU" + (" + reference merge op" if plugin_nodes else "")
        verify_against_eager(
            ctx, runner.run, exported.input_names, exported.output_names, exported.decision_names, runtime
        )
    else:
        ctx.manifest["verification"] = {"skipped": True}
    ctx.manifest.setdefault("tensorrt", {}).update(
        {
            "readiness": report or {"skipped": True},
            "plugins": ["tome_export::BipartiteMerge"] if plugin_nodes else [],
            "trtexec": shlex.join(trtexec_command(ctx, onnx_name, "model.plan")) if not plugin_nodes else None,
            "engine_built_on_device": on_device,
            "tensorrt_version_expected": trt_version,
        }
    )
    # Engines (TensorRT for RTX) or standard-TensorRT scripts: Target.finalize → finish_trt_bundle,
    # once every graph (TDTM variants, dynamic-loading blocks) is in the bundle.


def _finish(ctx: ExportContext) -> None:
    from tome_export.targets.trt_engines import finish_trt_bundle

    finish_trt_bundle(ctx)


register_target(
    Target(
        name="trt",
        description="TensorRT-ready ONNX (readiness-checked, verified) + engine or build scripts",
        default_lowering="dense",
        lowerings=("dense", "plugin"),
        build=build_tensorrt,
        finalize=_finish,
    )
)
