"""Run plugin-lowered graphs on ONNX Runtime CPU: the merge node executes the reference.

A ``tome_export.BipartiteMerge`` node is what TensorRT runs as a plugin. To verify the rest
of such a graph here, the node is moved to onnxruntime-extensions' custom-op domain and
backed by ``bipartite.merge_tokens`` (the eager semantics), so the surrounding ONNX runs on
ONNX Runtime and is compared against PyTorch. It checks the graph, not the plugin kernel
(that one is tested with Triton's interpreter).
"""

from __future__ import annotations

import numpy as np
import onnx

from tome_export.errors import BackendMissing

CONTRIB_DOMAIN = "ai.onnx.contrib"
PLUGIN_DOMAIN, PLUGIN_OP = "tome_export", "BipartiteMerge"
_TRT_ONLY_ATTRS = {"plugin_namespace", "plugin_version", "aot"}
_registered = False


def _register() -> None:
    global _registered
    if _registered:
        return
    import torch
    from onnxruntime_extensions import PyCustomOpDef, onnx_op

    from tome_export.merging.bipartite import merge_tokens

    @onnx_op(
        op_type=PLUGIN_OP,
        inputs=[PyCustomOpDef.dt_float] * 3,
        outputs=[PyCustomOpDef.dt_float, PyCustomOpDef.dt_float, PyCustomOpDef.dt_int64],
        attrs={"r": PyCustomOpDef.dt_int64, "protected": PyCustomOpDef.dt_int64, "mode": PyCustomOpDef.dt_string},
    )
    def bipartite_merge(metric, x, size, **attrs):
        out = merge_tokens(
            torch.from_numpy(np.asarray(metric)),
            torch.from_numpy(np.asarray(x)),
            torch.from_numpy(np.asarray(size)),
            int(attrs["r"]),
            int(attrs["protected"]),
        )
        return tuple(t.numpy() for t in out)

    _registered = True


def to_contrib_domain(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose merge nodes live in the onnxruntime-extensions domain."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for node in copy.graph.node:
        if node.domain == PLUGIN_DOMAIN and node.op_type == PLUGIN_OP:
            node.domain = CONTRIB_DOMAIN
            kept = [a for a in node.attribute if a.name not in _TRT_ONLY_ATTRS]
            del node.attribute[:]
            node.attribute.extend(kept)
    if not any(o.domain == CONTRIB_DOMAIN for o in copy.opset_import):
        copy.opset_import.append(onnx.helper.make_opsetid(CONTRIB_DOMAIN, 1))
    return copy


class MergeOpRunner:
    """Like OnnxRuntimeRunner (CPU), with the merge plugin node backed by the reference."""

    name = "onnxruntime+reference-merge-op"

    def __init__(self, model: onnx.ModelProto) -> None:
        try:
            import onnxruntime as ort
            from onnxruntime_extensions import get_library_path
        except ImportError:
            raise BackendMissing(
                "verifying plugin-lowered graphs needs onnxruntime-extensions: pip install onnxruntime-extensions"
            ) from None
        _register()
        options = ort.SessionOptions()
        options.register_custom_ops_library(get_library_path())
        self.session = ort.InferenceSession(
            to_contrib_domain(model).SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.output_names, self.session.run(None, feeds)))
