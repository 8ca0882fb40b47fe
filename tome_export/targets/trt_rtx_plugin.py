"""The merge plugin for TensorRT for RTX: ``tome_export::BipartiteMerge`` as a class-based IPluginV3.

Why class-based: the decorator route (``tensorrt_rtx.plugin``, "quickly deployable plugins")
does not import in the 1.7.1 wheels — ``tensorrt_rtx/plugin/*.py`` are shims re-exporting
``tensorrt_rtx_bindings.plugin``, which the bindings wheel does not contain. The classic Python
plugin interfaces are there: ``IPluginV3`` + ``IPluginV3OneCore/Build/Runtime`` and an
``IPluginCreatorV3One`` registered with ``get_plugin_registry()``.

Build time (what runs here, without a GPU) is pure Python: output shapes ``(B, N−r, C)``,
``(B, N−r, 1)``, ``(B, N)``, types fp32/fp32/int64, formats (linear fp32 in, int64 slots out;
decisions are discrete, so no fp16 scores). Run time: ``enqueue`` launches the fused Triton
kernel (``kernels/triton_merge.py``) on TensorRT's stream — so an engine with this plugin runs
only in a Python process that called ``register()`` first, with torch (CUDA) and Triton
installed. NOT run here: no RTX GPU (see docs/targets.md).

**Blocked in TensorRT for RTX 1.7.1** (``BLOCKED``): registration works and the ONNX parser finds
the creator and creates the plugin ("Successfully created plugin: BipartiteMerge"), then the
process aborts (``terminate called without an active exception``) before any of the plugin's
Python methods is called; the Python ``INetworkDefinition`` has no ``add_plugin_v3`` to add the
layer without the parser. NVIDIA/TensorRT-RTX issue #1 reports the same abort for custom ops in
the parser. ``can_register()`` is False for blocked versions so an export never takes the
process down; tests/test_trt_plugin_rtx.py re-checks the abort in a subprocess, so a fixed
release shows up as a failing test.
"""

from __future__ import annotations

import numpy as np

from tome_export.contract import BIPARTITE_OP_TYPE, PLUGIN_DOMAIN
from tome_export.contract import PLUGIN_VERSION as _CONTRACT_PLUGIN_VERSION

PLUGIN_NAMESPACE = PLUGIN_DOMAIN
PLUGIN_NAME = BIPARTITE_OP_TYPE
PLUGIN_VERSION = str(_CONTRACT_PLUGIN_VERSION)  # TensorRT's plugin registry takes the version as a string
RUNTIME_NEEDS = "a Python process with tome_export's merge plugin registered (torch with CUDA, Triton)"
BLOCKED = {
    "1.7.": "TensorRT for RTX 1.7 aborts the process when its ONNX parser adds a Python IPluginV3 layer "
    "(see NVIDIA/TensorRT-RTX issue #1), and its decorator plugin module (tensorrt_rtx.plugin) is missing "
    "from the wheel (No module named 'tensorrt_rtx_bindings.plugin')",
}
_STATE: dict = {}


def blocked_reason() -> str | None:
    """Why this TensorRT for RTX cannot build a graph with the merge plugin (None: it can)."""
    from tome_export.targets import trt_rtx

    if not trt_rtx.rtx_available():
        return "TensorRT for RTX is not installed"
    version = trt_rtx.version()
    return next((why for prefix, why in BLOCKED.items() if version.startswith(prefix)), None)


def can_register() -> bool:
    """True when this TensorRT for RTX can parse and build a graph with the plugin (see BLOCKED)."""
    if blocked_reason() is not None:
        return False
    trt = _trt()
    return all(hasattr(trt, n) for n in ("IPluginV3OneBuild", "IPluginCreatorV3One", "get_plugin_registry"))


def _field(fields, name: str, default):
    for f in fields or ():
        if f.name == name:
            data = np.asarray(f.data)
            if f.type == _trt().PluginFieldType.CHAR:
                return bytes(data.astype(np.uint8)).rstrip(b"\0").decode()
            return int(data.reshape(-1)[0])
    return default


def _trt():
    from tome_export.targets import trt_rtx

    return trt_rtx.load()


class _Pointer:
    """What a Triton launch needs from a tensor argument: a device address and a dtype."""

    def __init__(self, address: int, dtype) -> None:
        self.address, self.dtype = address, dtype

    def data_ptr(self) -> int:
        return self.address


def _plugin_class(trt):
    class BipartiteMergePlugin(trt.IPluginV3, trt.IPluginV3OneCore, trt.IPluginV3OneBuild, trt.IPluginV3OneRuntime):
        def __init__(self, r: int = 0, protected: int = 0, mode: str = "weighted_mean") -> None:
            trt.IPluginV3.__init__(self)
            trt.IPluginV3OneCore.__init__(self)
            trt.IPluginV3OneBuild.__init__(self)
            trt.IPluginV3OneRuntime.__init__(self)
            if mode != "weighted_mean":
                raise ValueError(f"{PLUGIN_NAME}: mode {mode!r} unsupported (weighted_mean only)")
            self.r, self.protected, self.mode = int(r), int(protected), mode
            self.plugin_name, self.plugin_namespace, self.plugin_version = PLUGIN_NAME, PLUGIN_NAMESPACE, PLUGIN_VERSION
            self.num_outputs = 3
            self.shapes: tuple = ()

        def get_capability_interface(self, _type):
            return self

        def clone(self):
            twin = BipartiteMergePlugin(self.r, self.protected, self.mode)
            twin.shapes = self.shapes
            return twin

        # --- build time: shapes, types, formats (Python, no GPU) ---
        def get_output_data_types(self, input_types):
            return [trt.DataType.FLOAT, trt.DataType.FLOAT, trt.DataType.INT64]

        def get_output_shapes(self, inputs, shape_inputs, exprs):
            _, x, size = inputs
            kept = exprs.operation(trt.DimensionOperation.SUB, x[1], exprs.constant(self.r))
            x_out = trt.DimsExprs([x[0], kept, x[2]])
            size_out = trt.DimsExprs([size[0], kept, size[2]])
            slot = trt.DimsExprs([x[0], x[1]])
            return [x_out, size_out, slot]

        def supports_format_combination(self, pos, in_out, num_inputs):
            desc = in_out[pos].desc
            wanted = trt.DataType.INT64 if pos == num_inputs + 2 else trt.DataType.FLOAT
            return desc.format == trt.TensorFormat.LINEAR and desc.type == wanted

        def configure_plugin(self, inputs, outputs):
            pass

        def get_workspace_size(self, inputs, outputs):
            return 0  # the kernel reuses its outputs as scratch

        def get_valid_tactics(self):
            return []

        def set_tactic(self, tactic):
            pass

        def get_fields_to_serialize(self):
            return trt.PluginFieldCollection(
                [
                    trt.PluginField("r", np.array([self.r], np.int32), trt.PluginFieldType.INT32),
                    trt.PluginField("protected", np.array([self.protected], np.int32), trt.PluginFieldType.INT32),
                    trt.PluginField("mode", np.frombuffer(self.mode.encode(), np.int8), trt.PluginFieldType.CHAR),
                ]
            )

        # --- run time: the fused Triton kernel on TensorRT's stream (needs an RTX GPU) ---
        def on_shape_change(self, inputs, outputs):
            self.shapes = tuple(tuple(d.dims) for d in inputs)

        def attach_to_context(self, context):
            return self.clone()

        def enqueue(self, input_desc, output_desc, inputs, outputs, workspace, stream):
            import torch

            from tome_export.kernels.triton_merge import BLOCK_DIM, BLOCK_TOKENS, bipartite_merge_kernel

            batch, num_tokens, channels = (int(d) for d in input_desc[1].dims)
            dim = int(input_desc[0].dims[2])
            f32, i64 = torch.float32, torch.int64
            args = [_Pointer(p, f32) for p in inputs] + [num_tokens, dim, channels, self.r, self.protected]
            args += [_Pointer(outputs[0], f32), _Pointer(outputs[1], f32), _Pointer(outputs[2], i64)]
            with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
                bipartite_merge_kernel[(batch,)](*args, BLOCK_T=BLOCK_TOKENS, BLOCK_D=BLOCK_DIM)
            return 0

    return BipartiteMergePlugin


def _creator_class(trt, plugin_class):
    class BipartiteMergeCreator(trt.IPluginCreatorV3One):
        def __init__(self) -> None:
            trt.IPluginCreatorV3One.__init__(self)
            self.name, self.plugin_namespace, self.plugin_version = PLUGIN_NAME, PLUGIN_NAMESPACE, PLUGIN_VERSION
            self.field_names = trt.PluginFieldCollection(
                [
                    trt.PluginField("r", np.array([], np.int32), trt.PluginFieldType.INT32),
                    trt.PluginField("protected", np.array([], np.int32), trt.PluginFieldType.INT32),
                    trt.PluginField("mode", np.array([], np.int8), trt.PluginFieldType.CHAR),
                ]
            )

        def create_plugin(self, name, fields, phase):
            return plugin_class(_field(fields, "r", 0), _field(fields, "protected", 0), _field(fields, "mode", "weighted_mean"))

    return BipartiteMergeCreator


def register() -> None:
    """Register the creator with TensorRT for RTX's plugin registry (idempotent, per process)."""
    if "creator" in _STATE:
        return
    trt = _trt()
    creator = _creator_class(trt, _plugin_class(trt))()
    if not trt.get_plugin_registry().register_creator(creator, PLUGIN_NAMESPACE):
        raise RuntimeError(f"TensorRT for RTX refused to register {PLUGIN_NAMESPACE}::{PLUGIN_NAME}")
    _STATE["creator"] = creator  # the registry holds a pointer: keep the Python object alive
