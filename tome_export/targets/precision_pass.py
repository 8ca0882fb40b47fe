"""The export path's precision pass: the graph converted to the plan's precision, merge kept fp32.

- :func:`apply_precision` — run by ``targets/export_path.py`` after export, before save and
  verification: fp16 (``graph_passes/fp16.py``) or int8 (``graph_passes/int8_qdq.py``) on
  the graph verification runs, the shipped graph derived from it; records which nodes
  stayed fp32, the int8 mode and the calibration data in the manifest;
- :func:`convert` — one graph at a plan's precision (also used for the unmerged baseline
  and ``bench/bench_precision.py``);
- :func:`calibration_feeds` — the user's ``--calibration`` file, or fresh random inputs
  from the verification generator at seeds the verification does not use.
The plan itself (precision, int8 mode, tolerance) comes from ``tome_export/precision.py``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from tome_export.errors import UserError
from tome_export.precision import CALIBRATION_SAMPLES, CALIBRATION_SEED_BASE, PrecisionPlan, load_calibration

if TYPE_CHECKING:
    import onnx

    from tome_export.exporter.onnx_export import OnnxExport
    from tome_export.targets.base import ExportContext


def calibration_feeds(ctx: ExportContext, input_names: list[str]) -> tuple[list[dict], str]:
    """(feeds, description for the manifest): the user's file, else random inputs the
    verification generator draws at seeds it does not verify on."""
    if ctx.options.calibration is not None:
        feeds = load_calibration(ctx.options.calibration, input_names, ctx.input_shapes)
        return feeds, f"{Path(ctx.options.calibration).name}: {len(feeds)} samples (user-given)"
    seeds = range(CALIBRATION_SEED_BASE, CALIBRATION_SEED_BASE + CALIBRATION_SAMPLES)
    feeds = [{n: t.numpy() for n, t in zip(input_names, ctx.example_inputs(seed))} for seed in seeds]
    return feeds, (
        f"{len(feeds)} random inputs from the verification input generator (seeds {seeds.start}-{seeds.stop - 1}, "
        "none of them verified on)"
    )


def _kept_nodes(model: onnx.ModelProto, fp32_metric: bool) -> set[int]:
    from tome_export.graph_passes.fp16 import merge_nodes, runtime_fp32_nodes

    return (merge_nodes(model) if fp32_metric else set()) | runtime_fp32_nodes(model)


def staged_weights(weights: Path) -> Path:
    """Where a converted graph's external weights are written until they replace ``weights``."""
    return weights.with_name(f"{weights.name}.converted")


def _fp16(model: onnx.ModelProto, keep: set[int], weights: Path | None) -> tuple[onnx.ModelProto, dict]:
    """fp16 graph; with external ``weights``, its weights go to :func:`staged_weights`."""
    from tome_export.graph_passes.external_data import restream
    from tome_export.graph_passes.fp16 import to_fp16

    converted, summary = to_fp16(model, keep=keep, base_dir=str(weights.parent) if weights else None)
    if weights is not None:
        converted = restream(converted, weights.parent, staged_weights(weights))
    return converted, summary


def convert(
    model: onnx.ModelProto,
    plan: PrecisionPlan,
    target: str,
    calibration: list[dict] | None = None,
    weights: Path | None = None,
) -> tuple[onnx.ModelProto, dict]:
    """``model`` at ``plan``'s precision for ``target`` → (converted graph, per-part summary).

    ``weights``: the external weights file of ``model`` (graphs past protobuf's 2 GB); the
    converted weights are then in :func:`staged_weights` (the caller moves them in place)."""
    from tome_export.graph_passes.fp16 import merge_nodes

    if plan.precision == "fp32":
        return model, {"fp32_nodes": "all"}
    if plan.precision == "fp16":
        converted, summary = _fp16(model, _kept_nodes(model, plan.fp32_metric), weights)
        converted, extra = _fp16_runtime_fallback(converted, model, plan, weights)
        return converted, {
            "fp32_nodes": summary["fp32_node_names"] + extra,
            "casts_inserted": summary["casts_inserted"],
        }
    if weights is not None:
        raise UserError(
            "int8 of a model whose weights exceed one ONNX file (over 1.8 GB in fp32) is not supported; "
            "use --precision fp16"
        )
    excluded = [model.graph.node[i].name for i in sorted(merge_nodes(model))] if plan.fp32_metric else []
    if plan.int8_mode == "weights":
        from tome_export.graph_passes.int8_qdq import fake_quantize_weights

        converted, rounded = fake_quantize_weights(model, excluded)
        return converted, {"fp32_nodes": excluded, "weights_quantized": rounded}
    from tome_export.graph_passes.int8_qdq import quantize_onnx

    converted = quantize_onnx(model, plan.int8_mode, calibration or (), excluded, trt=target == "trt")
    ops = [n.op_type for n in converted.graph.node]
    return converted, {
        "fp32_nodes": excluded,
        "quantize_nodes": ops.count("QuantizeLinear") + ops.count("DynamicQuantizeLinear"),
        "integer_ops": sum(op in ("MatMulInteger", "ConvInteger") for op in ops),
    }


def _loads_on_ort(converted: onnx.ModelProto, weights: Path | None) -> None:
    """Raises what ONNX Runtime CPU says when it cannot create a session for the graph."""
    import onnx

    from tome_export.runtimes.onnxruntime import OnnxRuntimeRunner

    if weights is None:
        OnnxRuntimeRunner(converted)  # registers the plugin lowering's custom ops when the graph uses them
        return
    path = weights.parent / ".fp16-check.onnx"  # beside the staged weights it references
    onnx.save_model(converted, str(path))
    try:
        OnnxRuntimeRunner(str(path))
    finally:
        path.unlink()


def _fp16_runtime_fallback(converted, model, plan: PrecisionPlan, weights: Path | None = None, tries: int = 32):
    """Keep in fp32 the nodes ONNX Runtime CPU has no fp16 kernel for (it says which on load)."""
    import re

    names = {n.name: i for i, n in enumerate(model.graph.node)}
    extra: list[str] = []
    for _ in range(tries):
        try:
            _loads_on_ort(converted, weights)
            return converted, extra
        except Exception as exc:
            found = re.search(r"node with name '([^']+)'", str(exc))
            if not found or found.group(1) not in names or found.group(1) in extra:
                raise
            extra.append(found.group(1))
        keep = _kept_nodes(model, plan.fp32_metric) | {names[n] for n in extra}
        converted, _ = _fp16(model, keep, weights)
    return converted, extra


def apply_precision(ctx: ExportContext, exported: OnnxExport, target: str) -> None:
    """The export path's precision pass: converts the graph verification runs and the shipped
    one alike (the shipped graph is the verified one minus its decision outputs)."""
    from tome_export.graph_passes import drop_outputs

    plan = ctx.precision
    section: dict = {
        "precision": plan.precision,
        "tolerance": {"atol": plan.tolerance.atol, "min_cosine": plan.tolerance.min_cosine},
    }
    if plan.precision != "fp32":
        calibration = None
        if plan.int8_mode == "static":
            calibration, section["calibration"] = calibration_feeds(ctx, exported.input_names)
        with ctx.progress.step(
            f"converting the graph to {plan.precision}" + (f" ({plan.int8_mode})" if plan.int8_mode else "")
        ):
            weights = exported.external_data
            converted, parts = convert(exported.with_decisions, plan, target, calibration, weights)
            if weights is not None:  # the converted weights replace the fp32 ones (our own file)
                from tome_export.graph_passes.external_data import relocate

                staged = staged_weights(weights)
                os.replace(staged, weights)
                relocate(converted, staged.name, weights.name)
        exported.with_decisions = converted
        exported.model = drop_outputs(converted, set(exported.decision_names)) if exported.decision_names else converted
        section.update({"int8_mode": plan.int8_mode, "merge_kept_fp32": plan.fp32_metric, **parts})
        ctx.progress.say(
            f"{plan.precision}: {len(parts['fp32_nodes'])} merge/runtime nodes kept fp32"
            + ("" if plan.fp32_metric else " (--no-fp32-metric: the merge metric runs at reduced precision)")
        )
    ctx.manifest["precision_detail"] = section


__all__ = ["apply_precision", "calibration_feeds", "convert"]
