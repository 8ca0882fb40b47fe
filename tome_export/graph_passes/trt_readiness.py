"""Will this ONNX graph build with TensorRT's ONNX parser? A static check, no TensorRT needed.

Rules come from onnx-tensorrt's operator support notes (docs/operators.md, TensorRT 10):
TopK needs ``sorted=1`` and a constant K < 3840; ScatterElements with a reduction is only
available through a plugin; ScatterND with a reduction is rejected; some ops have no
importer at all; DOUBLE is clamped to FLOAT; before TensorRT 10, INT64 is narrowed to
INT32. Custom-domain nodes build only if a plugin of that name is registered.

``flavour="rtx"``: TensorRT for RTX 1.7 as its own parser and builder behave (measured, and
kept honest by tests/test_trt_parser_agreement.py, which compares this list with the real
parser + builder on a set of graphs): NonZero has no importer, Cast to/from uint8 is refused, TopK ``sorted=0`` and ArgMax
``select_last_index=1`` build, and a dynamic input dimension fails the build (no optimization
profile is defined).

Every finding names the node, says why, and what to do.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from tome_export.contract import BIPARTITE_OP_TYPE, PLUGIN_DOMAIN, TRT_TOPK_MAX_K

TOPK_MAX_K = TRT_TOPK_MAX_K  # onnx-tensorrt: "K must be less than 3840"
SUPPORTED_OPSET = (9, 20)  # TensorRT 10.0 parser range
MERGE_PLUGIN = (PLUGIN_DOMAIN, BIPARTITE_OP_TYPE)

# Ops the TensorRT 10 ONNX parser has no importer for (onnx-tensorrt operators.md).
UNSUPPORTED_OPS = frozenset(
    {
        "Bernoulli",
        "BitShift",
        "ConcatFromSequence",
        "ImageDecoder",
        "Multinomial",
        "Optional",
        "OptionalGetElement",
        "OptionalHasElement",
        "RegexFullMatch",
        "SequenceAt",
        "SequenceConstruct",
        "SequenceEmpty",
        "SequenceErase",
        "SequenceInsert",
        "SequenceLength",
        "SplitToSequence",
        "StringConcat",
        "StringNormalizer",
        "StringSplit",
        "TfIdfVectorizer",
        "Unique",
    }
)
UNSUPPORTED_DTYPES = {
    onnx.TensorProto.STRING: "string",
    onnx.TensorProto.UINT16: "uint16",
    onnx.TensorProto.UINT32: "uint32",
    onnx.TensorProto.UINT64: "uint64",
    onnx.TensorProto.COMPLEX64: "complex64",
    onnx.TensorProto.COMPLEX128: "complex128",
}
# TensorRT for RTX 1.7: NonZero's importer needs a plugin its builds do not ship.
RTX_UNSUPPORTED_OPS = UNSUPPORTED_OPS | {"NonZero"}
FLAVOURS = ("standard", "rtx")
FIX_MERGE = "export with --lowering dense (plain TensorRT layers) or --lowering plugin (fused merge plugin)"


@dataclass(frozen=True)
class Finding:
    severity: str  # "error": will not build; "plugin": builds once the named plugin is loaded; "warning"
    node: str
    op_type: str
    reason: str
    fix: str

    def line(self) -> str:
        return f"[{self.severity}] {self.node} ({self.op_type}): {self.reason} → {self.fix}"


@dataclass
class ReadinessReport:
    findings: list[Finding] = field(default_factory=list)
    plugins: list[str] = field(default_factory=list)  # plugin ids the engine needs
    nodes: int = 0

    @property
    def ready(self) -> bool:
        return not any(f.severity == "error" for f in self.findings)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    def summary(self) -> str:
        counts = {s: sum(f.severity == s for f in self.findings) for s in ("error", "plugin", "warning")}
        verdict = "ready" if self.ready else "NOT ready"
        plugins = f"; needs plugin {', '.join(self.plugins)}" if self.plugins else ""
        return (
            f"TensorRT readiness: {verdict} ({self.nodes} nodes, {counts['error']} errors, "
            f"{counts['warning']} warnings{plugins})"
        )

    def text(self) -> str:
        return "\n".join([self.summary(), *(f"  {f.line()}" for f in self.findings)])

    def to_dict(self) -> dict:
        return {
            "ready": self.ready,
            "nodes": self.nodes,
            "plugins": self.plugins,
            "findings": [asdict(f) for f in self.findings],
        }


def _constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    values = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            for attr in node.attribute:
                if attr.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(attr.t)
                elif attr.name == "value_int":
                    values[node.output[0]] = np.array(attr.i)
                elif attr.name == "value_ints":
                    values[node.output[0]] = np.array(list(attr.ints))
    return values


def _attr(node: onnx.NodeProto, name: str, default=None):
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


def _value_types(model: onnx.ModelProto) -> dict[str, int]:
    graph = model.graph
    types = {}
    for value in [*graph.input, *graph.output, *graph.value_info]:
        if value.type.HasField("tensor_type"):
            types[value.name] = value.type.tensor_type.elem_type
    for init in graph.initializer:
        types[init.name] = init.data_type
    return types


def check_trt_readiness(
    model: onnx.ModelProto,
    trt_version: str = "10.3",
    plugins: tuple[tuple[str, str], ...] = (MERGE_PLUGIN,),
    flavour: str = "standard",
) -> ReadinessReport:
    """Check ``model`` against onnx-tensorrt's restrictions for TensorRT ``trt_version``.

    ``plugins``: (domain, op_type) pairs whose plugin the build will register; ``flavour``:
    ``standard`` TensorRT or ``rtx`` (TensorRT for RTX, see the module docstring)."""
    if flavour not in FLAVOURS:
        raise ValueError(f"flavour must be one of {FLAVOURS}, not {flavour!r}")
    rtx = flavour == "rtx"
    unsupported = RTX_UNSUPPORTED_OPS if rtx else UNSUPPORTED_OPS
    try:
        model = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # a check must not die on shape inference; dtypes are then partial
        pass
    graph = model.graph
    report = ReadinessReport(nodes=len(graph.node))
    constants = _constants(graph)
    types = _value_types(model)
    major = int(trt_version.split(".")[0])
    add = report.findings.append

    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx") and not SUPPORTED_OPSET[0] <= entry.version <= SUPPORTED_OPSET[1]:
            add(
                Finding(
                    "warning",
                    "<model>",
                    "opset",
                    f"opset {entry.version} outside TensorRT 10's parser range {SUPPORTED_OPSET}",
                    "re-export with --opset 18",
                )
            )

    for index, node in enumerate(graph.node):
        name = node.name or f"#{index}"
        if node.domain not in ("", "ai.onnx"):
            if (node.domain, node.op_type) in plugins:
                plugin_id = f"{node.domain}::{node.op_type}"
                if plugin_id not in report.plugins:
                    report.plugins.append(plugin_id)
                add(
                    Finding(
                        "plugin",
                        name,
                        f"{node.domain}.{node.op_type}",
                        "custom op: TensorRT builds it only with the tome_export merge plugin registered",
                        "build with the bundle's build_engine.py (registers the plugin), not bare trtexec",
                    )
                )
            else:
                add(
                    Finding(
                        "error",
                        name,
                        f"{node.domain}.{node.op_type}",
                        f"custom domain {node.domain!r} has no TensorRT importer or known plugin",
                        "replace the op with standard ONNX ops or provide a TensorRT plugin for it",
                    )
                )
            continue
        op = node.op_type
        if op in unsupported:
            add(Finding("error", name, op, "no TensorRT importer for this op", "rewrite the model part without it"))
        elif op == "TopK":
            if _attr(node, "sorted", 1) != 1 and not rtx:
                add(Finding("error", name, op, "TensorRT supports only sorted=1", "export TopK with sorted=1"))
            k = constants.get(node.input[1]) if len(node.input) > 1 else None
            if k is None:
                add(Finding("error", name, op, "K is not a build-time constant", "export with static shapes (fixed K)"))
            elif int(np.asarray(k).reshape(-1)[0]) >= TOPK_MAX_K:
                add(
                    Finding(
                        "error",
                        name,
                        op,
                        f"K={int(np.asarray(k).reshape(-1)[0])} but TensorRT needs K < {TOPK_MAX_K}",
                        f"{FIX_MERGE}: neither sorts",
                    )
                )
        elif op == "ScatterElements" and _attr(node, "reduction", b"none") not in (b"none", "none"):
            reduction = _attr(node, "reduction")
            reduction = reduction.decode() if isinstance(reduction, bytes) else reduction
            add(
                Finding(
                    "error",
                    name,
                    op,
                    f"ScatterElements reduction={reduction!r} is routed to a TensorRT plugin that standard builds lack",
                    FIX_MERGE,
                )
            )
        elif op == "ScatterND" and _attr(node, "reduction", b"none") not in (b"none", "none"):
            add(Finding("error", name, op, "ScatterND with a reduction is rejected by TensorRT", FIX_MERGE))
        elif op in ("ArgMax", "ArgMin") and _attr(node, "select_last_index", 0) != 0 and not rtx:
            add(Finding("error", name, op, "select_last_index=1 is unsupported", "use select_last_index=0"))
        if rtx and op == "Cast" and onnx.TensorProto.UINT8 in (_attr(node, "to"), types.get(node.input[0])):
            add(Finding("error", name, op, "TensorRT for RTX casts uint8 only on DLA", "cast through int32 instead"))
        for tensor in [*node.input, *node.output]:
            dtype = types.get(tensor)
            if dtype in UNSUPPORTED_DTYPES:
                add(
                    Finding(
                        "error",
                        name,
                        op,
                        f"tensor {tensor!r} is {UNSUPPORTED_DTYPES[dtype]}, which TensorRT has no type for",
                        "cast to float32/int32 in the model",
                    )
                )
                break
            if dtype == onnx.TensorProto.DOUBLE:
                add(
                    Finding(
                        "warning",
                        name,
                        op,
                        f"tensor {tensor!r} is float64: TensorRT clamps DOUBLE to FLOAT",
                        "use float32 in the model",
                    )
                )
                break
            if dtype == onnx.TensorProto.INT64 and major < 10:
                add(
                    Finding(
                        "warning",
                        name,
                        op,
                        f"tensor {tensor!r} is int64: TensorRT {trt_version} narrows it to int32 (clamped)",
                        "fine for indices < 2^31; use TensorRT ≥ 10 for native int64",
                    )
                )
                break
    for value in graph.input:
        dims = value.type.tensor_type.shape.dim
        if any(not d.HasField("dim_value") for d in dims):
            add(
                Finding(
                    "error" if rtx else "warning",
                    value.name,
                    "input",
                    "dynamic dimension: the engine needs an optimization profile",
                    "export with a fixed --input-shape (merging assumes static token counts)",
                )
            )
    return report


__all__ = ["Finding", "ReadinessReport", "check_trt_readiness"]
