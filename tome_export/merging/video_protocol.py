"""The spatial-temporal block protocol that TDTM patches (:class:`TdtmBlock`) and its check.

Owns what a video transformer block must offer so that :mod:`tome_export.merging.tdtm` can
run its attention sub-layers on merged frames: the :class:`TdtmBlock` ``typing.Protocol``,
:func:`protocol_violations` (which members a block lacks or cannot be called as the
protocol calls them) and :func:`find_tdtm_blocks` (the blocks of a model, refusing with one
line when a block looks like one but does not follow the protocol). ``samples/stdit.py``'s
``STDiTBlock`` is the reference implementation.
"""

from __future__ import annotations

import inspect
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from tome_export.errors import UserError

# member → the positional arguments the patched forward passes it (after self)
MEMBER_ARGS: dict[str, tuple[str, ...]] = {
    "modulation": ("t_mod",),
    "spatial": ("x", "mods", "num_frames"),
    "temporal": ("x", "num_frames", "frame_mask"),
    "cross": ("x", "context"),
    "feedforward": ("x", "mods"),
    "forward": ("x", "t_mod", "context", "num_frames"),  # frame_mask is optional in the model's call
}
SUBLAYERS = ("modulation", "spatial", "temporal", "cross", "feedforward")


@runtime_checkable
class TdtmBlock(Protocol):
    """A spatial-temporal transformer block (Open-Sora's STDiT layout) split into sub-layers.

    Tokens are ``(B, T·S, C)``, frame-major. The model calls each block as
    ``block(x, t_mod, context, num_frames[, frame_mask])`` and the block computes exactly::

        mods = self.modulation(t_mod)
        x = x + self.spatial(x, mods, num_frames)
        x = x + self.temporal(x, num_frames, frame_mask)
        x = x + self.cross(x, context)
        x = x + self.feedforward(x, mods)

    Every sub-layer returns its residual update and must work for any frame count (TDTM
    calls the three attention sub-layers with ⌈T/2⌉ frames). TDTM replaces ``forward`` with
    this composition, so a block whose forward computes something else is not reproduced;
    the export's verification against the unpatched model reports that.
    """

    def modulation(self, t_mod: torch.Tensor) -> Any:
        """Whatever the sub-layers need from the timestep embedding (shift/scale/gate...)."""
        ...

    def spatial(self, x: torch.Tensor, mods: Any, num_frames: int) -> torch.Tensor:
        """Self-attention within each frame."""
        ...

    def temporal(self, x: torch.Tensor, num_frames: int, frame_mask: torch.Tensor | None) -> torch.Tensor:
        """Self-attention across frames per spatial position; ``frame_mask`` (B, T), 1 = visible."""
        ...

    def cross(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Cross-attention to the conditioning tokens."""
        ...

    def feedforward(self, x: torch.Tensor, mods: Any) -> torch.Tensor:
        """The MLP (always at full frame count)."""
        ...

    def forward(
        self,
        x: torch.Tensor,
        t_mod: torch.Tensor,
        context: torch.Tensor,
        num_frames: int,
        frame_mask: torch.Tensor | None = None,
    ) -> torch.Tensor: ...


def _accepts(member: Any, args: tuple[str, ...]) -> bool:
    try:
        inspect.signature(member).bind(*args)
    except TypeError:
        return False
    except ValueError:  # no signature to inspect (some builtins): trust it
        return True
    return True


def protocol_violations(block: nn.Module) -> list[str]:
    """What ``block`` lacks to follow :class:`TdtmBlock`; empty when it follows it."""
    missing = [name for name in MEMBER_ARGS if not callable(getattr(block, name, None))]
    problems = [f"missing {', '.join(missing)}"] if missing else []
    for name, args in MEMBER_ARGS.items():
        if name not in missing and not _accepts(getattr(block, name), args):
            problems.append(f"{name}() does not accept ({', '.join(args)})")
    return problems


def _looks_like_block(module: nn.Module) -> bool:
    """Two or more sub-layer methods (not submodules) mark a block meant for the protocol."""
    methods = [
        name
        for name in SUBLAYERS
        if callable(getattr(module, name, None)) and not isinstance(getattr(module, name), nn.Module)
    ]
    return len(methods) >= 2


def find_tdtm_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's :class:`TdtmBlock` blocks; :class:`UserError` (one line) when one looks
    like a block but does not follow the protocol, or when there is none."""
    blocks = []
    for path, module in model.named_modules():
        if not _looks_like_block(module):
            continue
        problems = protocol_violations(module)
        if problems:
            raise UserError(
                f"block {type(module).__name__} ({path or 'the model'}) does not follow the TDTM block protocol "
                f"(tome_export.merging.video_protocol.TdtmBlock): {'; '.join(problems)}"
            )
        blocks.append(module)
    if not blocks:
        wanted = ", ".join(f"{name}({', '.join(MEMBER_ARGS[name])})" for name in SUBLAYERS)
        raise UserError(
            f"{type(model).__name__} has no spatial-temporal blocks for method 'tdtm': a block needs methods "
            f"{wanted} (tome_export.merging.video_protocol.TdtmBlock)"
        )
    return blocks
