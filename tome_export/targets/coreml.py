"""``--target coreml`` / ``--device apple-*``: an mlprogram ``.mlpackage`` for the Neural Engine.

Core ML has no ``scatter_reduce``, so every merge is lowered to dense ATen ops in the torch
graph (``merging/dense.py``) before coremltools converts it (fp16, CPU_AND_NE, iOS 17+).
Checks done here, without macOS:
- structure: the converted MIL program has the model's inputs/outputs and no scatter op;
- numbers: the same dense-lowered program, exported to ONNX, runs on ONNX Runtime against
  eager PyTorch (with merge-decision agreement). Core ML prediction itself needs macOS
  and is NOT verified here.
- an audit of MIL ops that commonly fall off the Neural Engine (to CPU/GPU);
- chunking: weights above the profile's per-chunk limit are split into consecutive models
  (as Apple's ml-stable-diffusion does for iOS), each checked in torch against the whole.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn

from tome_export.errors import BackendMissing, UserError, VerificationError
from tome_export.targets import ExportContext, Target, register_target
from tome_export.targets.common import check_memory_budget, verify_against_eager

# MIL ops that the Neural Engine commonly does not run (Core ML then splits the model and
# runs them on CPU/GPU, with copies in between). From Apple's and coremltools' guidance on
# ANE-friendly models: gathers/scatters, sorting, data-dependent shapes, control flow, and
# anything on integer or bool tensors (the ANE computes in fp16).
OFF_ANE_OPS = frozenset(
    {
        "gather",
        "gather_along_axis",
        "gather_nd",
        "scatter",
        "scatter_along_axis",
        "scatter_nd",
        "argsort",
        "topk",
        "cumsum",
        "reduce_argmax",
        "reduce_argmin",
        "non_zero",
        "non_maximum_suppression",
        "while_loop",
        "cond",
        "shape",
        "fill_like",
        "random_uniform",
        "random_normal",
        "einsum",
    }
)
SCATTER_OPS = frozenset({"scatter", "scatter_along_axis", "scatter_nd"})
NON_FP_DTYPES = ("int", "bool")


def coremltools_available() -> bool:
    try:
        import coremltools  # noqa: F401
    except ImportError:
        return False
    return True


def _require_coremltools():
    if not coremltools_available():
        raise BackendMissing("--target coreml needs coremltools: pip install 'tome-export[coreml]'")
    import coremltools as ct

    return ct


def mil_operations(mlmodel) -> list:
    """Every operation of the converted program's main function, nested blocks included."""
    program = mlmodel._mil_program
    ops: list = []

    def walk(block) -> None:
        for operation in block.operations:
            ops.append(operation)
            for inner in getattr(operation, "blocks", []):
                walk(inner)

    walk(program.functions["main"])
    return ops


def _dtype_name(var) -> str:
    from coremltools.converters.mil.mil import types

    dtype = getattr(var, "dtype", None)
    return types.builtin_to_string(dtype) if dtype is not None else "?"


def audit_neural_engine(mlmodel) -> dict:
    """Ops that commonly fall off the Neural Engine, with counts and the reason."""
    ops = mil_operations(mlmodel)
    flagged: Counter = Counter()
    integer: Counter = Counter()
    for operation in ops:
        if operation.op_type == "const":
            continue
        if operation.op_type in OFF_ANE_OPS:
            flagged[operation.op_type] += 1
        elif any(_dtype_name(out).startswith(NON_FP_DTYPES) for out in operation.outputs):
            integer[operation.op_type] += 1
    total = sum(1 for o in ops if o.op_type != "const")
    return {
        "ops": total,
        "op_counts": dict(Counter(o.op_type for o in ops if o.op_type != "const").most_common()),
        "off_neural_engine": dict(flagged.most_common()),
        "integer_or_bool": dict(integer.most_common()),
        "note": "ops listed typically run on CPU/GPU; Core ML decides at load time on the device (not verified here)",
    }


def program_structure(mlmodel) -> dict:
    spec = mlmodel.get_spec()

    def shapes(features) -> list[dict]:
        return [{"name": f.name, "shape": list(f.type.multiArrayType.shape)} for f in features]

    return {
        "inputs": shapes(spec.description.input),
        "outputs": shapes(spec.description.output),
        "scatter_ops": sum(o.op_type in SCATTER_OPS for o in mil_operations(mlmodel)),
    }


def convert_program(program: torch.export.ExportedProgram, device, input_names: list[str] | None = None):
    """coremltools conversion of a dense-lowered ExportedProgram with the profile's settings."""
    ct = _require_coremltools()
    target_name = str(device.get("minimum_deployment_target", "iOS17"))
    if not hasattr(ct.target, target_name):
        raise UserError(f"device {device.name}: coremltools has no deployment target {target_name!r}")
    precision = ct.precision.FLOAT16 if device.precision == "fp16" else ct.precision.FLOAT32
    try:
        return _convert(ct, program, device, precision, target_name)
    except (UserError, BackendMissing):
        raise
    except Exception as exc:  # converter errors are long tracebacks; one line says what failed
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"coremltools could not convert the model: {first}") from None


def _convert(ct, program, device, precision, target_name: str):
    import contextlib
    import io
    import logging
    import warnings

    # coremltools prints progress bars and int64→int32 notes by the hundred; keep our output readable.
    logging.getLogger("coremltools").setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        return _convert_quiet(ct, program, device, precision, target_name)


def _convert_quiet(ct, program, device, precision, target_name: str):
    return ct.convert(
        program,
        convert_to="mlprogram",
        compute_precision=precision,
        compute_units=getattr(ct.ComputeUnit, str(device.get("compute_units", "CPU_AND_NE"))),
        minimum_deployment_target=getattr(ct.target, target_name),
        skip_model_load=True,  # loading compiles for the local machine: macOS only
    )


# -- chunking --------------------------------------------------------------------------------


@dataclass
class Chunk:
    module: nn.Module
    example_inputs: tuple[torch.Tensor, ...]
    weight_bytes: int


def _param_bytes(tensor: torch.Tensor, precision: str) -> int:
    itemsize = 2 if precision == "fp16" and tensor.is_floating_point() else tensor.element_size()
    return tensor.numel() * itemsize


def weight_bytes(module: nn.Module, precision: str = "fp16") -> int:
    tensors = {id(t): t for t in [*module.parameters(), *module.buffers()]}
    return sum(_param_bytes(t, precision) for t in tensors.values())


class ChunkModule(nn.Module):
    """One piece of a split program with its weights as its own parameters.

    ``split_module`` passes tensors read by ``get_attr`` as inputs; Core ML needs them as
    weights inside the piece, so they are bound here and only activations stay inputs."""

    def __init__(self, piece: nn.Module, weights: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.piece = piece
        self.slots: list[tuple[bool, str]] = []
        for node in piece.graph.nodes:
            if node.op != "placeholder":
                continue
            if node.name in weights:
                key = f"w{len(self.slots)}"
                value = weights[node.name]
                if value.is_floating_point():
                    self.register_parameter(key, nn.Parameter(value.detach(), requires_grad=False))
                else:
                    self.register_buffer(key, value.detach())
                self.slots.append((True, key))
            else:
                self.slots.append((False, node.name))

    def activation_names(self) -> list[str]:
        return [name for is_weight, name in self.slots if not is_weight]

    def forward(self, *activations):
        values = iter(activations)
        args = [getattr(self, name) if is_weight else next(values) for is_weight, name in self.slots]
        return self.piece(*args)


def split_into_chunks(
    program: torch.export.ExportedProgram,
    example_inputs: tuple[torch.Tensor, ...],
    limit_bytes: int,
    precision: str = "fp16",
) -> tuple[list[Chunk], float]:
    """Consecutive pieces of the program, each with ≤ ``limit_bytes`` of weights where possible.

    Nodes are cut in graph order where the running weight total would pass the limit (a
    single tensor larger than the limit gets a piece of its own). Returns the chunks and the
    max abs difference between the split program and the whole one on ``example_inputs``."""
    from torch.fx.passes.split_module import split_module

    graph_module = program.module()
    attrs = dict(graph_module.named_parameters()) | dict(graph_module.named_buffers())
    weight_of_node = {
        node.name: attrs[str(node.target)]
        for node in graph_module.graph.nodes
        if node.op == "get_attr" and str(node.target) in attrs
    }
    part_of: dict[str, int] = {}
    seen: set[str] = set()
    part, running = 0, 0
    for node in graph_module.graph.nodes:
        if node.op not in ("call_function", "call_method", "call_module"):
            continue
        new_bytes = 0
        for arg in node.all_input_nodes:
            if arg.name in weight_of_node and arg.name not in seen:
                seen.add(arg.name)
                new_bytes += _param_bytes(weight_of_node[arg.name], precision)
        if running and running + new_bytes > limit_bytes:
            part, running = part + 1, 0
        running += new_bytes
        part_of[node.name] = part
    split = split_module(graph_module, graph_module, lambda node: part_of.get(node.name, 0), keep_original_order=True)
    names = sorted((n for n, _ in split.named_children() if n.startswith("submod_")), key=lambda n: int(n[7:]))
    captured: dict[str, tuple] = {}
    hooks = [
        getattr(split, name).register_forward_pre_hook(lambda mod, args, name=name: captured.setdefault(name, args))
        for name in names
    ]
    with torch.no_grad():
        split_out = split(*example_inputs)
        whole_out = graph_module(*example_inputs)
    for hook in hooks:
        hook.remove()

    def first(v):
        return v[0] if isinstance(v, (tuple, list)) else v

    split_err = float((first(split_out) - first(whole_out)).abs().max())
    chunks = []
    for name in names:
        piece = getattr(split, name)
        placeholders = [n.name for n in piece.graph.nodes if n.op == "placeholder"]
        args = dict(zip(placeholders, captured[name]))
        weights = {key: value for key, value in args.items() if key in weight_of_node}
        module = ChunkModule(piece, weights)
        activations = tuple(args[key] for key in module.activation_names())
        chunks.append(Chunk(module, activations, weight_bytes(module, precision)))
    return chunks, split_err


# -- the target --------------------------------------------------------------------------------


def _onnx_check(ctx: ExportContext) -> None:
    """The same dense-lowered program through ONNX Runtime, against eager PyTorch."""
    import onnx

    from tome_export.exporter.onnx_export import _quiet, _WithDecisions
    from tome_export.merging import merge_state
    from tome_export.merging.dense import export_dense
    from tome_export.runtimes.onnxruntime import OnnxRuntimeRunner

    inputs = ctx.example_inputs()
    program = export_dense(_WithDecisions(ctx.model), inputs)
    with torch.no_grad():
        reference = ctx.model(*inputs)
    num_outputs = len(reference) if isinstance(reference, (tuple, list)) else 1
    state = merge_state(ctx.model)
    decision_names = [f"tome_slots_{i}" for i in range(len(state.slots) if state else 0)]
    output_names = ["output"] if num_outputs == 1 else [f"output_{i}" for i in range(num_outputs)]
    input_names = [f"input_{i}" for i in range(len(inputs))]
    with _quiet():
        onnx_program = torch.onnx.export(
            program,
            (),
            dynamo=True,
            opset_version=ctx.options.opset,
            input_names=input_names,
            output_names=output_names + decision_names,
            optimize=True,
            verbose=False,
        )
    model: onnx.ModelProto = onnx_program.model_proto
    scatter = sorted({n.op_type for n in model.graph.node if n.op_type.startswith("Scatter")})
    if scatter:
        raise VerificationError(f"dense lowering left scatter ops in the graph: {scatter}")
    runtime = "onnxruntime (the dense program, stand-in for Core ML)"
    verify_against_eager(ctx, OnnxRuntimeRunner(model).run, input_names, output_names, decision_names, runtime)


def _or_refuse(step: str, fn, *args):
    """``fn(*args)``; a torch.export/coremltools failure becomes one line, not a traceback."""
    try:
        return fn(*args)
    except UserError:
        raise
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise UserError(
            f"--target coreml refuses this model: {step} failed ({type(exc).__name__}: {first}); "
            "export it with --target onnx"
        ) from None


def build_coreml(ctx: ExportContext) -> None:
    from tome_export.merging.dense import export_dense

    _require_coremltools()
    device = ctx.device
    check_memory_budget(ctx)
    inputs = ctx.example_inputs()
    with ctx.progress.step("torch.export with the merge lowered to dense ops (no scatter)"):
        program = _or_refuse("torch.export with dense merges", export_dense, ctx.model, inputs)
    if ctx.options.verify:
        _onnx_check(ctx)
    else:
        ctx.manifest["verification"] = {"skipped": True}
    limit_mb = getattr(ctx.options, "chunk_mb", None) or device.get("max_weights_per_chunk_mb")
    total = weight_bytes(ctx.model, device.precision)
    pieces: list[tuple[str, torch.export.ExportedProgram, int]] = []
    chunk_check = None
    if limit_mb and total > limit_mb * 2**20:
        with ctx.progress.step(f"splitting {total / 2**20:.1f} MB of weights into chunks of ≤ {limit_mb} MB"):
            chunks, chunk_check = split_into_chunks(program, inputs, int(limit_mb * 2**20), device.precision)
            if chunk_check > ctx.options.atol:
                raise VerificationError(f"chained chunks differ from the whole model by {chunk_check:.3g}")
            for index, chunk in enumerate(chunks):
                piece = torch.export.export(chunk.module, chunk.example_inputs).run_decompositions({})
                pieces.append((f"model_chunk{index}.mlpackage", piece, chunk.weight_bytes))
    else:
        pieces.append(("model.mlpackage", program, total))
    converted = []
    for filename, piece, nbytes in pieces:
        with ctx.progress.step(f"converting to Core ML mlprogram ({filename})"):
            mlmodel = _or_refuse("coremltools conversion", convert_program, piece, device)
        structure = program_structure(mlmodel)
        if structure["scatter_ops"]:
            raise VerificationError(f"{filename}: converted program still has scatter ops")
        audit = audit_neural_engine(mlmodel)
        mlmodel.save(str(ctx.bundle_dir / filename))
        converted.append({"file": filename, "weights_mb": round(nbytes / 2**20, 3), **structure, "audit": audit})
    off = Counter()
    for item in converted:
        off.update(item["audit"]["off_neural_engine"])
    if off:
        ctx.progress.say(
            "Neural Engine audit: ops that commonly run off the ANE: "
            + ", ".join(f"{op}×{n}" for op, n in off.most_common())
        )
    ctx.manifest.update(
        {
            "artifact": converted[0]["file"] if len(converted) == 1 else [c["file"] for c in converted],
            "precision": device.precision,
            "coreml": {
                "compute_units": device.get("compute_units", "CPU_AND_NE"),
                "minimum_deployment_target": device.get("minimum_deployment_target", "iOS17"),
                "chunk_limit_mb": limit_mb,
                "weights_mb": round(total / 2**20, 3),
                "chunks_max_abs_err_vs_whole": chunk_check,
                "models": converted,
                "prediction": "not verified here (Core ML prediction needs macOS)",
            },
        }
    )
    ctx.progress.say("note: Core ML prediction needs macOS; verified the same dense program on ONNX Runtime instead")


register_target(
    Target(
        name="coreml",
        description="Core ML mlprogram (.mlpackage, fp16, CPU_AND_NE), dense merge, ANE audit, chunking",
        default_lowering="dense",
        lowerings=("dense",),
        build=build_coreml,
        uses_onnx_lowering=False,
    )
)
