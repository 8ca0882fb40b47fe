"""Standard TensorRT's side of ``--target trt``: availability, plugin marking, build scripts.

``build_engine.sh`` / ``build_engine.py`` (and the trtexec line) for the machine that builds
the engine with standard TensorRT (Jetson, data-centre profiles, or no TensorRT for RTX here);
``tensorrt.py`` (the target's hooks) and ``trt_engines.py`` (engines) both use them.
"""

from __future__ import annotations

import importlib.util
import shlex
import shutil
from pathlib import Path

import onnx

from tome_export.contract import BIPARTITE_OP_TYPE, PLUGIN_DOMAIN, TRT_PLUGIN_ATTRIBUTES
from tome_export.targets.base import ExportContext

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


def export_precision(ctx: ExportContext) -> str:
    """The export's resolved precision (``--precision`` or the device's default), not the profile's."""
    if ctx.manifest.get("precision"):
        return ctx.manifest["precision"]
    return ctx.precision.precision if ctx.precision is not None else ctx.device.precision


# Builder flags per precision: an int8 graph is QDQ (scales in the graph); its fp32 nodes stay fp32.
PRECISION_FLAGS = {"fp32": [], "fp16": ["--fp16"], "int8": ["--int8"]}


def trtexec_command(ctx: ExportContext, onnx_name: str, plan_name: str) -> list[str]:
    """The exact trtexec invocation for a plugin-free graph at the export's precision on this device."""
    device = ctx.device
    command = ["trtexec", f"--onnx={onnx_name}", f"--saveEngine={plan_name}"]
    command += PRECISION_FLAGS.get(export_precision(ctx), [])
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
    py_args += PRECISION_FLAGS.get(export_precision(ctx), [])
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


__all__ = [
    "DEFAULT_TRT_VERSION",
    "PRECISION_FLAGS",
    "export_precision",
    "mark_plugin_nodes", "tensorrt_available", "trtexec_command", "write_build_scripts"]
