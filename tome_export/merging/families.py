"""Model families ToMe cannot merge, refused in one line before any work.

Each rule looks for a module feature whose meaning depends on a fixed token grid or
token order, which merging destroys. The refusal names the block class, what is
unsupported and what to do instead; ``--r 0`` (no merging) always exports.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from tome_export.errors import UserError


def _windowed(module: nn.Module) -> str | None:
    if getattr(module, "window_size", None) is not None and (
        getattr(module, "shift_size", None) is not None or "swin" in type(module).__name__.lower()
    ):
        return (
            "windowed attention (tokens are grouped into fixed windows of the patch grid; merged tokens fit no window)"
        )
    return None


def _relative_position_bias(module: nn.Module) -> str | None:
    table = getattr(module, "relative_position_bias_table", None)
    if table is not None or type(module).__name__ in ("RelativePositionBias", "BeitRelativePositionBias"):
        return (
            "relative position bias (an N×N bias indexed by patch positions, which merged tokens no longer have; "
            "merging it exactly would need a size-weighted bias per merged pair, not implemented)"
        )
    return None


def _causal_mask(module: nn.Module) -> str | None:
    config = getattr(module, "config", None)
    if getattr(config, "is_decoder", False) or getattr(config, "is_causal", False):
        return "causal attention (a merged token would see later tokens)"
    return None


# Rules checked in order on every module; the first that fires names the refusal.
UNMERGEABLE: list[Callable[[nn.Module], str | None]] = [_windowed, _relative_position_bias, _causal_mask]


def _block_name(model: nn.Module, culprit: nn.Module) -> str:
    """The transformer block class that holds ``culprit`` (or the culprit's own class)."""
    names = {id(m): type(m).__name__ for m in model.modules()}
    for module in model.modules():
        if any(child is culprit for child in module.modules()) and any(
            key in names[id(module)].lower() for key in ("block", "layer")
        ):
            found = names[id(module)]
            if not found.lower().endswith(("list", "stage", "encoder")):
                return found
    return type(culprit).__name__


def unmergeable_reason(model: nn.Module) -> str | None:
    """One line saying why ToMe cannot merge ``model``, or None."""
    for module in model.modules():
        for rule in UNMERGEABLE:
            what = rule(module)
            if what:
                return f"{_block_name(model, module)}: token merging does not support {what}"
    return None


def refuse_unmergeable(model: nn.Module) -> None:
    """UserError (exit 2) for a model family ToMe cannot merge."""
    reason = unmergeable_reason(model)
    if reason:
        raise UserError(f"{reason}; use --r 0 to export unmerged, or another method")
