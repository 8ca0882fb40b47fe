"""Small helpers shared by the trt and coreml targets."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tome_export.targets import ExportContext


def pinning_options(ctx: ExportContext) -> dict:
    """``verify()`` keyword for decision-pinned comparison, only when asked (``--pin-decisions``,
    where the lowerings branch provides it), so this works with and without that option."""
    return {"pin_decisions": True} if getattr(ctx.options, "pin_decisions", False) else {}


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
