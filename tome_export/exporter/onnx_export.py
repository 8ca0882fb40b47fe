"""torch.export → ONNX with the merge op translated by a chosen lowering.

``export_onnx`` is the exporter's one entry point: it traces the model with its merge
decisions as extra outputs, applies the tracer's rewrites, translates with the lowering's
table plus the ATen fixes, and returns an :class:`OnnxExport` holding the shipped graph,
the graph verification runs, and this export's own log (rewrites, lowering notes).
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import io
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import onnx_ir as ir
import torch
from torch import nn

from tome_export.contract import decision_names as decision_output_names
from tome_export.errors import UserError
from tome_export.exporter import aten_fixes, tracer
from tome_export.exporter.export_log import ExportLog, recording
from tome_export.exporter.lowerings import LOWERINGS, get_lowering
from tome_export.graph_passes import drop_outputs
from tome_export.graph_passes.external_data import EXTERNAL_DATA_THRESHOLD, externalize, ir_initializer_bytes
from tome_export.merging import merge_state
from tome_export.merging.ops import OP_NAMESPACE, merge_op_overloads

DEFAULT_OPSET = 18


class WithDecisions(nn.Module):
    """Returns the model's outputs followed by every merging layer's slot map."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args):
        from tome_export.outputs import flatten_outputs

        outs = [t for _, t in flatten_outputs(self.model(*args))]  # ModelOutput, dicts, tuples: flat
        state = merge_state(self.model)
        return (*outs, *(state.slots if state is not None else []))


@dataclass
class OnnxExport:
    """An exported graph: ``model`` is what ships, ``with_decisions`` what verification runs."""

    model: onnx.ModelProto
    with_decisions: onnx.ModelProto
    input_names: list[str]
    output_names: list[str]
    decision_names: list[str]
    rewrites: list[dict] = field(default_factory=list)
    lowering_notes: list[dict] = field(default_factory=list)  # e.g. the dense lowering's cost per merge
    custom_domains: list[str] = field(default_factory=list)  # non-ONNX domains the graph needs a runtime for
    # Set when the weights went to an external file (graph_passes.external_data): its path.
    # Both protos then reference it by name and must be saved (or run) next to it.
    external_data: Path | None = None


def input_names_for(model: nn.Module, count: int) -> list[str]:
    params = [
        p.name
        for p in inspect.signature(model.forward).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    return params[:count] if len(params) >= count else [f"input_{i}" for i in range(count)]


def translation_table(lowering: str) -> dict:
    """Every merge op the lowering translates, plus the ATen fixes."""
    chosen = get_lowering(lowering)
    table = {}
    for overload in merge_op_overloads():
        qualified = overload.name().split(".")[0]  # "tome_export::bipartite_merge"
        if qualified in chosen.translations:
            table[overload] = chosen.translations[qualified]
    table.update(aten_fixes.translation_table())
    table.update(tracer.translation_table())
    return table


def _check_translations(exported_program, lowering: str) -> None:
    """UserError naming the first merge op the lowering cannot translate (else torch.onnx
    fails later with a long ConversionError)."""
    chosen = get_lowering(lowering)
    for node in exported_program.graph.nodes:
        target = getattr(node.target, "name", None)
        qualified = target().split(".")[0] if callable(target) else ""
        if qualified.startswith(f"{OP_NAMESPACE}::") and qualified not in chosen.translations:
            others = sorted(name for name, low in LOWERINGS.items() if qualified in low.translations)
            raise UserError(
                f"lowering {lowering!r} has no translation for {qualified}; use {' or '.join(others) or 'another method'}"
            )


@contextlib.contextmanager
def _quiet():
    """torch.onnx prints progress and warnings of its own; keep our output readable."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def export_onnx(
    model: nn.Module,
    example_inputs: tuple[torch.Tensor, ...],
    lowering: str = "scatter",
    opset: int = DEFAULT_OPSET,
    program: torch.export.ExportedProgram | None = None,
    external_data: Path | None = None,
    external_threshold: int | None = None,
) -> OnnxExport:
    """Export ``model`` (eval mode, static shapes) to ONNX with the merge lowered as asked.

    ``program``: an ``ExportedProgram`` of ``WithDecisions(model)`` made elsewhere (Core ML
    lowers merges to dense ATen ops in torch first); default: torch.export of the model.
    ``external_data``: when the weights exceed ``external_threshold`` bytes (default
    ``EXTERNAL_DATA_THRESHOLD``, under protobuf's 2 GB), stream them to that file instead
    of the proto (see ``graph_passes.external_data``)."""
    model.eval()
    from tome_export.outputs import output_names as flat_output_names

    with torch.no_grad():
        reference = model(*example_inputs)
    state = merge_state(model)
    input_names = input_names_for(model, len(example_inputs))
    output_names = flat_output_names(reference)  # field names kept (logits, last_hidden_state…)
    decision_names = decision_output_names(len(state.slots) if state is not None else 0)
    log = ExportLog()
    with _quiet(), recording(log):
        exported_program = program or torch.export.export(WithDecisions(model), tuple(example_inputs), strict=False)
        _check_translations(exported_program, lowering)
        tracer_rewrites = tracer.rewrite_program(exported_program)
        onnx_program = torch.onnx.export(
            exported_program,
            tuple(example_inputs),
            dynamo=True,
            opset_version=opset,
            input_names=input_names,
            output_names=output_names + decision_names,
            custom_translation_table=translation_table(lowering),
            optimize=True,
            verbose=False,
        )
    del exported_program, program
    threshold = EXTERNAL_DATA_THRESHOLD if external_threshold is None else external_threshold
    if external_data is not None and ir_initializer_bytes(onnx_program.model) > threshold:
        externalize(onnx_program.model, Path(external_data))
    else:
        external_data = None
    full = ir.serde.serialize_model(onnx_program.model)
    del onnx_program
    gc.collect()
    shipped = drop_outputs(full, set(decision_names)) if decision_names else full
    return OnnxExport(
        model=shipped,
        with_decisions=full,
        input_names=input_names,
        output_names=output_names,
        decision_names=decision_names,
        rewrites=tracer_rewrites + log.rewrites,
        lowering_notes=log.notes,
        custom_domains=sorted({o.domain for o in shipped.opset_import} & set(get_lowering(lowering).custom_domains)),
        external_data=Path(external_data) if external_data is not None else None,
    )
