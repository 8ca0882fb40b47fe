"""Helpers the targets share: verification against eager, weight bytes, memory budget, ONNX I/O.

- :func:`verify_against_eager` runs the exported graph and the eager model on the
  context's seeds and records the result (raises VerificationError past the tolerance);
- :func:`weight_bytes` / :func:`tensor_bytes` are the one count of weight bytes (parameters
  and buffers, each tensor once, floats at the deployed precision);
- :func:`check_memory_budget` checks it against the device profile's budget (MiB);
- :func:`io_spec` / :func:`save_onnx` describe and save a shipped ONNX graph.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from tome_export.errors import UserError, VerificationError

if TYPE_CHECKING:
    import onnx

    from tome_export.targets.base import ExportContext

_FLOAT_BYTES = {"fp16": 2, "fp32": 4}


def verify_against_eager(
    ctx: ExportContext,
    run,
    input_names: list[str],
    output_names: list[str],
    decision_names: list[str],
    runtime: str = "onnxruntime",
):
    """Compare ``run`` with the eager model on the context's seeds; record it in the manifest.

    Raises VerificationError (nothing gets written) when the error exceeds the tolerance."""
    from tome_export.precision import TOLERANCES
    from tome_export.verify import verify

    tolerance = ctx.precision.tolerance if ctx.precision is not None else TOLERANCES["fp32"]
    with ctx.progress.step(f"verifying on {runtime} against eager PyTorch ({ctx.options.seeds} seeds)"):
        result = verify(
            ctx.model,
            run,
            input_names,
            output_names,
            decision_names,
            ctx.input_shapes,
            seeds=range(ctx.options.seeds),
            atol=tolerance.atol,
            min_cosine=tolerance.min_cosine,
            tie_tol=tolerance.tie_tol,
            on_seed=ctx.progress.tick,
            runtime=runtime,
            pin_decisions=ctx.options.pin_decisions,
        )
    ctx.manifest["verification"] = result.to_dict()
    ctx.progress.say(result.summary())
    if not result.passed:
        raise VerificationError(f"{result.summary()}; nothing was written (--no-verify keeps the export unchecked)")
    return result


def tensor_bytes(tensor: torch.Tensor, precision: str | None = None) -> int:
    """Bytes of one tensor; floating-point ones at ``precision`` (``"fp16"``: 2, ``"fp32"``: 4) when given."""
    itemsize = tensor.element_size()
    if precision is not None and tensor.is_floating_point():
        itemsize = _FLOAT_BYTES.get(precision, itemsize)
    return tensor.numel() * itemsize


def weight_bytes(module: nn.Module, precision: str | None = None) -> int:
    """Bytes of ``module``'s parameters and buffers, each tensor counted once (see :func:`tensor_bytes`)."""
    tensors = {id(t): t for t in [*module.parameters(), *module.buffers()]}
    return sum(tensor_bytes(t, precision) for t in tensors.values())


def check_memory_budget(ctx: ExportContext) -> int:
    """Weights at the profile's precision must fit its memory budget; returns their bytes."""
    device = ctx.device
    total = weight_bytes(ctx.model, device.precision)
    budget = device.memory_budget_bytes
    if budget and total > budget:
        raise UserError(
            f"the model's weights need {total / 2**20:.0f} MiB at {device.precision}, over {device.name}'s "
            f"memory budget of {device.memory_budget_mib} MiB; pick a larger device profile or a smaller model"
        )
    return total


def io_spec(graph_values, names: list[str]) -> list[dict]:
    """Name, shape and dtype of the graph values ``names`` (inputs or outputs), for the manifest."""
    import onnx

    by_name = {v.name: v for v in graph_values}
    specs = []
    for name in names:
        tensor = by_name[name].type.tensor_type
        specs.append(
            {
                "name": name,
                "shape": [d.dim_value if d.HasField("dim_value") else d.dim_param for d in tensor.shape.dim],
                "dtype": onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name,
            }
        )
    return specs


def save_onnx(model: onnx.ModelProto, path: Path) -> None:
    """Saves the graph (external data past protobuf's 2 GB limit); a graph whose weights are
    external already (``export_onnx`` with ``external_data``) is small and sits next to them."""
    import onnx

    from tome_export.graph_passes.external_data import EXTERNAL_DATA_THRESHOLD, uses_external_data

    if uses_external_data(model):
        onnx.save_model(model, str(path))
        return
    large = model.ByteSize() > EXTERNAL_DATA_THRESHOLD
    onnx.save_model(model, str(path), save_as_external_data=large, location=f"{path.name}.data" if large else None)


__all__ = ["check_memory_budget", "io_spec", "save_onnx", "tensor_bytes", "verify_against_eager", "weight_bytes"]
