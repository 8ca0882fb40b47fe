"""``--target trt``: a TensorRT-ready ONNX graph, verified, plus the engine or its build scripts.

The hooks this target adds to the one export path (``targets/export_path.py``):

1. ``prepare``: the weights fit the device's memory budget; ``--build-engine`` rules;
2. export with the ``dense`` lowering (plain TensorRT layers) or ``plugin`` (one
   ``tome_export::BipartiteMerge`` node per merge, run by the Triton merge plugin);
3. ``graph_passes``: plugin nodes marked for TensorRT's parser, then the TensorRT-readiness
   check (``graph_passes/trt_readiness.py``), on by default;
4. ``verifier``: ONNX Runtime CPU against eager PyTorch (plugin graphs: the merge node runs
   the reference implementation through onnxruntime-extensions);
5. ``build_engine_or_scripts``: an engine through TensorRT's Python API when ``tensorrt``
   imports and the profile does not require building on the device; always
   ``build_engine.sh`` / ``build_engine.py``.
"""

from __future__ import annotations

import importlib.util
import shlex
import shutil
from pathlib import Path

import onnx

from tome_export.contract import BIPARTITE_OP_TYPE, PLUGIN_DOMAIN, TRT_PLUGIN_ATTRIBUTES, qualified_op
from tome_export.errors import BackendMissing, UserError
from tome_export.exporter.onnx_export import OnnxExport
from tome_export.targets.base import ExportContext, Target
from tome_export.targets.common import check_memory_budget

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
        if node.domain == PLUGIN_DOMAIN and node.op_type == BIPARTITE_OP_TYPE:
            present = {a.name for a in node.attribute}
            for name, value in TRT_PLUGIN_ATTRIBUTES:
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


def prepare(ctx: ExportContext) -> None:
    """Before any export: the weights fit the device; ``--build-engine`` can be honoured here."""
    device = ctx.device
    check_memory_budget(ctx)
    if ctx.options.build_engine and _built_on_device(ctx):
        raise UserError(
            f"{device.name} engines must be built on the device itself; drop --build-engine and run "
            "build_engine.sh from the bundle there"
        )
    if ctx.options.build_engine and not tensorrt_available():
        raise BackendMissing(
            "--build-engine needs TensorRT's Python package (pip install 'tome-export[trt]' from NVIDIA's index); "
            "without --build-engine the ONNX graph and build scripts are still produced"
        )


def _built_on_device(ctx: ExportContext) -> bool:
    return bool(ctx.device.get("engine_built_on_device", False))


def graph_passes(ctx: ExportContext, exported: OnnxExport) -> None:
    """Mark the plugin nodes; refuse a graph TensorRT's parser would not take (unless --no-trt-check)."""
    from tome_export.graph_passes.trt_readiness import check_trt_readiness

    plugin_nodes = mark_plugin_nodes(exported.model)
    trt_version = str(ctx.device.get("tensorrt", DEFAULT_TRT_VERSION))
    report = None
    if ctx.options.trt_check:
        report = check_trt_readiness(exported.model, trt_version)
        ctx.progress.say(report.text())
        if not report.ready:
            raise UserError(f"the graph would not build with TensorRT {trt_version}:\n{report.text()}")
    ctx.manifest.setdefault("tensorrt", {}).update(
        {
            "readiness": report.to_dict() if report else {"skipped": True},
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


def build_engine_or_scripts(ctx: ExportContext, exported: OnnxExport, onnx_name: str, runner=None) -> None:
    """After the graph is verified: build scripts always, the engine where TensorRT is here."""
    device = ctx.device
    on_device = _built_on_device(ctx)
    plugin_nodes = mark_plugin_nodes(exported.model)  # already marked: this only counts them
    scripts = write_build_scripts(ctx, onnx_name, plugin_nodes)
    info = ctx.manifest.setdefault("tensorrt", {})
    info.update(
        {
            "trtexec": shlex.join(trtexec_command(ctx, onnx_name, "model.plan")) if not plugin_nodes else None,
            "scripts": scripts,
            "engine": None,
            "engine_built_on_device": on_device,
        }
    )
    if tensorrt_available() and not on_device:
        from tome_export.targets.trt_engine import build_engine as build

        with ctx.progress.step("building the TensorRT engine"):
            build(
                str(ctx.bundle_dir / onnx_name),
                str(ctx.bundle_dir / "model.plan"),
                fp16=device.precision == "fp16",
                workspace_mb=int(device.get("workspace_mb", 2048)),
                timing_cache=str(ctx.bundle_dir / "timing.cache"),
                merge_plugin=bool(plugin_nodes),
            )
        info["engine"] = "model.plan"
    elif on_device:
        ctx.progress.say(f"{device.name}: engines are built on the device — copy the bundle there, run build_engine.sh")
    else:
        ctx.progress.say(
            "note: TensorRT is not installed here, so no engine was built; the bundle holds the verified ONNX "
            "graph and build_engine.sh / build_engine.py to build it where TensorRT is (exit status 0)"
        )


TARGET = Target(
    name="trt",
    description="TensorRT-ready ONNX (readiness-checked, verified) + engine or build scripts",
    default_lowering="dense",
    lowerings=("dense", "plugin"),
    prepare=prepare,
    graph_passes=graph_passes,
    verifier=verifier,
    build=build_engine_or_scripts,
)
