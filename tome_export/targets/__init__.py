"""Targets: how a patched model becomes verified artifacts for one runtime family.

A target registers a build function that writes into the bundle folder and fills the
manifest. ``tome_export.pipeline.export`` resolves options and calls it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from tome_export.errors import UserError

if TYPE_CHECKING:
    from tome_export.devices import DeviceProfile
    from tome_export.exporter.load import LoadedModel
    from tome_export.pipeline import ExportOptions
    from tome_export.progress import Progress


@dataclass
class ExportContext:
    """What a target's build function gets."""

    options: ExportOptions
    loaded: LoadedModel
    model: nn.Module
    input_shapes: list[tuple[int, ...]]
    device: DeviceProfile
    lowering: str
    progress: Progress
    bundle_dir: Path
    manifest: dict = field(default_factory=dict)

    def example_inputs(self, seed: int = 0) -> tuple[torch.Tensor, ...]:
        from tome_export.inputs import make_inputs

        return make_inputs(self.model, self.input_shapes, seed)


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    default_lowering: str
    lowerings: tuple[str, ...]
    build: Callable[[ExportContext], None]
    uses_onnx_lowering: bool = True  # False: the target lowers merges itself (Core ML: dense torch ops)
    finalize: Callable[[ExportContext], None] | None = None  # after every graph exists (variants, blocks)


TARGETS: dict[str, Target] = {}


def register_target(target: Target) -> Target:
    TARGETS[target.name] = target
    return target


def get_target(name: str) -> Target:
    if name not in TARGETS:
        raise UserError(f"unknown target {name!r}; choose one of: {', '.join(sorted(TARGETS))}")
    return TARGETS[name]


def _register_builtin_targets() -> None:
    from tome_export.targets import coreml, onnx, tensorrt  # noqa: F401


_register_builtin_targets()
