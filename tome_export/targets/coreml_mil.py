"""Core ML's side of ``--target coreml``: conversion with coremltools and checks on the MIL program.

- :func:`convert_program`: a dense-lowered ``ExportedProgram`` → mlprogram with the device
  profile's precision, compute units and deployment target (converter errors as one line);
- :func:`program_structure`: the converted model's inputs/outputs and scatter ops left;
- :func:`audit_neural_engine`: MIL ops that commonly fall off the Neural Engine;
- :func:`refusing`: runs a torch.export/coremltools step, any failure as a one-line refusal.
Needs coremltools (``tome-export[coreml]``); nothing here needs macOS.
"""

from __future__ import annotations

from collections import Counter

import torch

from tome_export.errors import BackendMissing, UserError, first_line

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


def require_coremltools():
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


def refusing(step: str, fn, *args, **kwargs):
    """``fn(*args, **kwargs)``; a torch.export/coremltools failure becomes one line, not a traceback."""
    try:
        return fn(*args, **kwargs)
    except (UserError, BackendMissing):
        raise
    except Exception as exc:
        raise UserError(
            f"--target coreml refuses this model: {step} failed ({type(exc).__name__}: {first_line(exc)[:300]}); "
            "export it with --target onnx"
        ) from None


def convert_program(
    program: torch.export.ExportedProgram, device, input_names: list[str] | None = None, precision: str | None = None
):
    """coremltools conversion of a dense-lowered ExportedProgram with the profile's settings.

    ``precision`` (default: the profile's): ``fp32`` computes in float32; ``fp16``/``int8``
    in float16 with the merge metric's ops kept float32 (``coreml_precision.py``)."""
    ct = require_coremltools()
    target_name = str(device.get("minimum_deployment_target", "iOS17"))
    if not hasattr(ct.target, target_name):
        raise UserError(f"device {device.name}: coremltools has no deployment target {target_name!r}")
    if (precision or device.precision) == "fp32":
        precision = ct.precision.FLOAT32
    else:
        from tome_export.targets.coreml_precision import fp16_keeping_metric

        precision = fp16_keeping_metric(ct)
    try:
        return _convert(ct, program, device, precision, target_name)
    except (UserError, BackendMissing):
        raise
    except Exception as exc:  # converter errors are long tracebacks; one line says what failed
        raise UserError(f"coremltools could not convert the model: {first_line(exc)}") from None


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
