"""Small helpers shared by the trt and coreml targets."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tome_export.targets import ExportContext


def pinning_options(ctx: ExportContext) -> dict:
    """``verify()`` keyword for decision-pinned comparison, only when asked (``--pin-decisions``,
    where the lowerings branch provides it), so this works with and without that option."""
    return {"pin_decisions": True} if getattr(ctx.options, "pin_decisions", False) else {}
