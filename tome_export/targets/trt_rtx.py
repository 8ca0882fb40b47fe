"""TensorRT for RTX: the real ONNX parser and ahead-of-time engine builds, no GPU needed.

``tensorrt_rtx`` (PyPI ``tensorrt-rtx-cu13``, the ``trt`` extra) parses ONNX and builds a
hardware-agnostic engine on any machine; the engine is specialised just in time on the user's
RTX-class GPU (compute capabilities in ``SUPPORTED_CAPABILITIES``; not Jetson SM87, not SM90).
Its networks are strongly typed: precision is whatever the ONNX graph's types say.

This module owns the API calls: ``parse_onnx`` (the parser's verdict, errors naming node and
op), ``build_engine`` (serialized engine + the builder's layer report), ``parse_layer_report``.
Imported lazily: nothing here imports ``tensorrt_rtx`` at module import time.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

MODULE = "tensorrt_rtx"
FLAVOUR = "TensorRT for RTX"
# Engines run on these (TensorRT for RTX 1.7 ComputeCapability). Turing (SM75) is not a default:
# it has no FP32 GEMM there, and every merge keeps its similarity MatMul in fp32.
SUPPORTED_CAPABILITIES = ("SM75", "SM80", "SM86", "SM89", "SM120", "SM121")
DEFAULT_CAPABILITIES = ("SM80", "SM86", "SM89", "SM120")
INSTALL_HINT = 'pip install "tome-export[trt]"'


def rtx_available() -> bool:
    """True when ``tensorrt_rtx`` imports (its libraries are real wheels, not a download stub)."""
    if importlib.util.find_spec(MODULE) is None:
        return False
    try:
        importlib.import_module(MODULE)
    except Exception:
        return False
    return True


def load():
    """The ``tensorrt_rtx`` module; BackendMissing (exit 3) with the install line if absent."""
    from tome_export.errors import BackendMissing

    if not rtx_available():
        raise BackendMissing(f"TensorRT for RTX is not installed; {INSTALL_HINT} builds engines on this machine")
    return importlib.import_module(MODULE)


def version() -> str:
    return str(load().__version__)


def parser_name() -> str:
    return f"{FLAVOUR} {version()} ONNX parser"


def _capturing_logger(trt, verbose: bool):
    class Capture(trt.ILogger):
        """Keeps every message: the layer report arrives as one VERBOSE message."""

        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.messages: list[tuple[object, str]] = []

        def log(self, severity, msg) -> None:
            # VERBOSE is needed for the layer report only: keep that message, drop the other ~10⁴
            if severity != trt.ILogger.VERBOSE or msg.startswith("Layers:"):
                self.messages.append((severity, msg))

        def errors(self) -> list[str]:
            return [m for s, m in self.messages if s in (trt.ILogger.ERROR, trt.ILogger.INTERNAL_ERROR)]

    logger = Capture()
    logger.min_severity = trt.ILogger.VERBOSE if verbose else trt.ILogger.WARNING
    return logger


@dataclass
class ParseVerdict:
    """What TensorRT's ONNX parser said about a graph."""

    parser: str
    ok: bool
    layers: int
    errors: list[dict] = field(default_factory=list)  # node, op, node_index, message

    def first_error(self) -> str:
        e = self.errors[0]
        return f"node {e['node']!r} ({e['op']}): {e['message']}"

    def to_dict(self) -> dict:
        return asdict(self)


def _parse(trt, logger, onnx_path: Path, plugin_registrar=None):
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    if plugin_registrar is not None:
        plugin_registrar()
    parser = trt.OnnxParser(network, logger)
    ok = parser.parse_from_file(str(onnx_path))
    errors = []
    for i in range(parser.num_errors):
        err = parser.get_error(i)
        errors.append(
            {"node": err.node_name(), "op": err.node_operator(), "node_index": err.node(), "message": err.desc()}
        )
    return builder, network, parser, bool(ok) and not errors, errors


def parse_onnx(onnx_path: str | Path, plugin_registrar=None) -> ParseVerdict:
    """Parse with TensorRT for RTX's ONNX parser (external data is read beside the file)."""
    trt = load()
    logger = _capturing_logger(trt, verbose=False)
    _, network, _, ok, errors = _parse(trt, logger, Path(onnx_path), plugin_registrar)
    if not ok and not errors:
        errors = [{"node": "?", "op": "?", "node_index": -1, "message": "; ".join(logger.errors()) or "parse failed"}]
    return ParseVerdict(parser_name(), ok, network.num_layers, errors)


@dataclass
class EngineBuild:
    path: str
    seconds: float
    bytes: int
    capabilities: list[str]
    network_layers: int
    layers: list[dict]  # the builder's engine layer report (see parse_layer_report)


def build_engine(
    onnx_path: str | Path,
    engine_path: str | Path,
    capabilities: tuple[str, ...] | list[str] = DEFAULT_CAPABILITIES,
    workspace_mb: int | None = None,
    plugin_registrar=None,
) -> EngineBuild:
    """Parse, build ahead of time for ``capabilities`` and write the serialized engine.

    Raises ``EngineBuildError`` with the parser's / builder's first error; writes nothing then."""
    trt = load()
    unknown = [c for c in capabilities if c not in SUPPORTED_CAPABILITIES]
    if unknown:
        raise EngineBuildError(f"compute capabilities {unknown} are not targets of {FLAVOUR}: {SUPPORTED_CAPABILITIES}")
    logger = _capturing_logger(trt, verbose=True)
    builder, network, _parser, ok, errors = _parse(trt, logger, Path(onnx_path), plugin_registrar)
    if not ok:
        first = errors[0] if errors else {"node": "?", "op": "?", "message": "; ".join(logger.errors())}
        raise EngineBuildError(f"node {first['node']!r} ({first['op']}): {first['message']}", node=first)
    config = builder.create_builder_config()
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # layer names + ONNX node metadata
    config.num_compute_capabilities = len(capabilities)
    for i, name in enumerate(capabilities):
        config.set_compute_capability(getattr(trt.ComputeCapability, name), i)
    if workspace_mb:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - start
    if serialized is None:
        raise EngineBuildError("; ".join(logger.errors()) or "the builder returned no engine")
    data = memoryview(serialized)
    Path(engine_path).write_bytes(data)
    report = next((m for _, m in logger.messages if m.startswith("Layers:")), "")
    return EngineBuild(str(engine_path), seconds, data.nbytes, list(capabilities), network.num_layers,
                       parse_layer_report(report))


class EngineBuildError(Exception):
    def __init__(self, message: str, node: dict | None = None) -> None:
        super().__init__(message)
        self.node = node


_FIELD = re.compile(r"(?:^|, )(Name|LayerType|TacticName|StreamId): ([^,]*)")
_ONNX = re.compile(r"\[ONNX Layer: ([^\]]+)\]")
_DTYPE = re.compile(r"Datatype: (\w+)")


def _section(line: str, key: str, end_keys: tuple[str, ...]) -> str:
    start = line.find(f"{key}: [")
    if start < 0:
        return ""
    stop = min((i for k in end_keys if (i := line.find(f"], {k}: ", start)) >= 0), default=len(line))
    return line[start:stop]


def parse_layer_report(report: str) -> list[dict]:
    """The builder's ``Layers:`` report (IEngineInspector's one-line format, printed at build time
    with DETAILED profiling verbosity) as dicts: name, type, onnx_nodes, input/output dtypes."""
    layers = []
    for line in report.splitlines():
        if not line.startswith("Name: "):
            continue
        fields = dict(_FIELD.findall(line))
        layers.append(
            {
                "name": fields.get("Name", "").strip(),
                "type": fields.get("LayerType", "").strip(),
                "onnx_nodes": _ONNX.findall(line),
                "input_dtypes": _DTYPE.findall(_section(line, "Inputs", ("Constants", "Outputs"))),
                "output_dtypes": _DTYPE.findall(_section(line, "Outputs", ("TacticName", "StreamId", "Metadata"))),
            }
        )
    return layers


def precision_summary(layers: list[dict]) -> dict[str, int]:
    """Layers per output data type (``Float``, ``Half``, ``Int8``…)."""
    counts: dict[str, int] = {}
    for layer in layers:
        for dtype in set(layer["output_dtypes"]) or {"none"}:
            counts[dtype] = counts.get(dtype, 0) + 1
    return dict(sorted(counts.items()))
