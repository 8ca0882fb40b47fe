"""The two records the targets are made of: :class:`ExportContext` and :class:`Target`.

A target does not run its own export: ``targets/export_path.py`` runs the same steps for
every target (export → graph passes → save → verify against eager → target build →
manifest; once every graph of the bundle exists, the target's finalize) and a
:class:`Target` only contributes hooks for the steps where targets differ. A hook left as ``None`` is the default step (ONNX export with the context's
lowering; verification on ONNX Runtime CPU).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from tome_export.options import ExportOptions

if TYPE_CHECKING:
    from tome_export.devices import DeviceProfile
    from tome_export.exporter.load import LoadedModel
    from tome_export.exporter.onnx_export import OnnxExport
    from tome_export.precision import PrecisionPlan
    from tome_export.progress import Progress


@dataclass
class ExportContext:
    """One export in progress: the patched model, what was asked, and the manifest so far."""

    options: ExportOptions
    loaded: LoadedModel
    model: nn.Module
    input_shapes: list[tuple[int, ...]]
    device: DeviceProfile
    lowering: str
    progress: Progress
    bundle_dir: Path
    manifest: dict = field(default_factory=dict)
    precision: PrecisionPlan | None = None  # None: fp32 at the default tolerance

    def example_inputs(self, seed: int = 0) -> tuple[torch.Tensor, ...]:
        from tome_export.inputs import make_inputs

        return make_inputs(self.model, self.input_shapes, seed)


# Hook signatures (see export_path.py for when each runs).
Prepare = Callable[[ExportContext], None]
Export = Callable[[ExportContext], "OnnxExport"]
GraphPasses = Callable[[ExportContext, "OnnxExport"], None]
Verifier = Callable[[ExportContext, "OnnxExport"], tuple[Any, str]]  # (runner with .run(feeds), runtime label)
Build = Callable[[ExportContext, "OnnxExport", str, Any], None]  # (ctx, export, ONNX file name, verifying runner)
Finalize = Callable[[ExportContext], None]


@dataclass(frozen=True)
class Target:
    """A runtime family and the hooks it adds to the one export path."""

    name: str
    description: str
    default_lowering: str
    lowerings: tuple[str, ...]
    prepare: Prepare | None = None  # checks before any work (backend installed, memory budget)
    export: Export | None = None  # None: export_onnx with the context's lowering
    graph_passes: GraphPasses | None = None  # on the exported graph, before it is saved
    verifier: Verifier | None = None  # None: ONNX Runtime CPU on the graph with decisions
    build: Build | None = None  # after verification: engines, scripts, converted models
    ships_onnx: bool = True  # False: the ONNX graph only stands in for verification (Core ML)
    uses_onnx_lowering: bool = True  # False: the target lowers merges itself (Core ML: dense torch ops)
    device_precision: bool = True  # False: always fp32, whatever the device profile says
    variants: bool = False  # can write TDTM's merged + full graphs sharing weights
    # Once every graph of the bundle exists (TDTM variants, dynamic-loading blocks; pipeline.py
    # runs it after dynamic loading, before the manifest is written): engines built per graph.
    finalize: Finalize | None = None

    def precision(self, device: DeviceProfile) -> str:
        return device.precision if self.device_precision else "fp32"


__all__ = ["ExportContext", "Target"]
