"""Steps every target shares: verifying an exported model against the eager patched model
(output error and merge decisions, several seeds) and checking a device profile's memory
budget against the model's weights at the profile's precision."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tome_export.targets import ExportContext


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
    from tome_export.errors import VerificationError
    from tome_export.verify import verify

    with ctx.progress.step(f"verifying on {runtime} against eager PyTorch ({ctx.options.seeds} seeds)"):
        result = verify(
            ctx.model,
            run,
            input_names,
            output_names,
            decision_names,
            ctx.input_shapes,
            seeds=range(ctx.options.seeds),
            atol=ctx.options.atol,
            on_seed=ctx.progress.tick,
            runtime=runtime,
            pin_decisions=ctx.options.pin_decisions,
        )
    ctx.manifest["verification"] = result.to_dict()
    ctx.progress.say(result.summary())
    if not result.passed:
        raise VerificationError(f"{result.summary()}; nothing was written (--no-verify keeps the export unchecked)")
    return result


def check_memory_budget(ctx: ExportContext) -> int:
    """Weights at the profile's precision must fit its memory budget; returns their bytes."""
    from tome_export.errors import UserError

    device = ctx.device
    itemsize = 2 if device.precision == "fp16" else 4
    tensors = {id(t): t for t in [*ctx.model.parameters(), *ctx.model.buffers()]}
    total = sum(t.numel() * (itemsize if t.is_floating_point() else t.element_size()) for t in tensors.values())
    budget = device.memory_budget_mb
    if budget and total > budget * 2**20:
        raise UserError(
            f"the model's weights need {total / 2**20:.0f} MB at {device.precision}, over {device.name}'s "
            f"memory budget of {budget} MB; pick a larger device profile or a smaller model"
        )
    return total
