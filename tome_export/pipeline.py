"""MODEL → patched eager model → exported, verified bundle: what ``export()`` and the CLI run.

Resolves the options against the tables (device profile, target, lowering, method),
loads and patches the model (or inserts merges into its graph), checks it runs on the
input shapes, then runs the one export path for the target
(``targets/export_path.py``) inside a bundle folder that is renamed into place only when
everything succeeded, and adds dynamic loading when asked.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import torch
from torch import nn

from tome_export import __version__
from tome_export.bundle import BundleWriter, preprocessing_for
from tome_export.bundle.preflight import check_export_options
from tome_export.devices import get_device
from tome_export.errors import UserError, first_line
from tome_export.exporter.insert import merge_for_export
from tome_export.exporter.load import load_model
from tome_export.exporter.lowerings import get_lowering
from tome_export.inputs import default_input_shapes, make_inputs
from tome_export.merging import Method, merge_state
from tome_export.merging.methods import method_options
from tome_export.options import ExportOptions, parse_input_shape
from tome_export.precision import load_calibration, resolve_precision
from tome_export.progress import Progress
from tome_export.targets import ExportContext, Target, get_target
from tome_export.targets.export_path import build_bundle, build_single
from tome_export.targets.video import add_dynamic_loading, build_tdtm_variants, check_budget_fits, resolve_budget


def default_out(name: str, method: Method, method_opts: dict, target: Target) -> Path:
    return Path(f"{name}-{method.output_tag(method_opts)}-{target.name}")


def _merge_manifest(model: nn.Module, method: Method) -> dict:
    state = merge_state(model)
    if state is None or method.name == "none":
        return {"method": "none", "r_per_layer": [], "tokens_per_layer": []}
    return {"insertion": "eager", **state.info()}


def _attach_cost_model(manifest: dict, module: nn.Module, input_shapes: list, device: str, target: str) -> None:
    """``merge.cost_model``: the model's shape and, where calibrated, the predicted speed-up (and
    the one-line warning the CLI prints when merging is not predicted to pay)."""
    from tome_export.cost_model import manifest_entry

    entry = manifest_entry(module, manifest.get("merge") or {}, input_shapes, device, target)
    if entry is not None:
        manifest["merge"]["cost_model"] = entry


def _lowering_for(options: ExportOptions, target: Target, device) -> str:
    lowering = options.lowering or (device.lowering if device.lowering in target.lowerings else target.default_lowering)
    if target.uses_onnx_lowering:
        get_lowering(lowering)
    if lowering not in target.lowerings:
        raise UserError(
            f"target {target.name!r} cannot run lowering {lowering!r}; use one of {', '.join(target.lowerings)}"
        )
    return lowering


def export(options: ExportOptions, progress: Progress | None = None) -> tuple[Path, dict]:
    """Run the whole export; returns (bundle path, manifest). Raises UserError on bad input."""
    progress = progress or Progress(quiet=True)
    check_export_options(options)
    device = get_device(options.device or "cpu")
    target = get_target(options.target or device.default_target)
    lowering = _lowering_for(options, target, device)
    method, method_opts = method_options(options)
    precision = resolve_precision(options, target.name, target.precision(device))
    if method.variants and not target.variants:
        raise UserError(
            f"--method {method.name} writes a merged and a full graph sharing weights; target {target.name!r} "
            "does not support that yet, use --target onnx"
        )
    budget = resolve_budget(options.dynamic_loading, options.memory_budget, device.memory_budget_bytes)
    if options.input_shape is not None:
        input_shapes = parse_input_shape(options.input_shape)
    loaded = load_model(options.model, options.weights, options.trust_pickle, options.component)
    if options.input_shape is None:
        input_shapes = default_input_shapes(loaded.module) or (
            [loaded.default_input_shape] if loaded.default_input_shape else None
        )
        if input_shapes is None:
            raise UserError(f"cannot tell the input shape of {options.model}; pass --input-shape like 1,3,224,224")
    # Eager patcher behind its r=0 gate, else graph-level insertion, else a one-line refusal.
    model = merge_for_export(loaded, method.name, method_opts, input_shapes, options.protected, progress, options.seeds)
    if budget is not None:
        check_budget_fits(model, budget)
    out = Path(options.out) if options.out else default_out(loaded.name, method, method_opts, target)
    try:
        with torch.no_grad():
            model(*make_inputs(model, input_shapes, 0))
    except UserError:
        raise
    except Exception as exc:
        expected = loaded.default_input_shape
        hint = f"; the model expects {','.join(map(str, expected))}" if expected else ""
        raise UserError(f"{options.model} rejects input shape {input_shapes}: {first_line(exc)}{hint}") from None
    state = merge_state(model)
    if method.name in ("tomesd", "todo") and state is not None and not state.tokens_per_layer:
        raise UserError(
            f"method {method.name!r} found no transformer block at downsampling ≤ {options.max_downsample} in "
            f"{options.model}; raise --max-downsample (SDXL's first attention level is 2)"
        )
    if options.calibration is not None:  # a file that does not fit the inputs: exit 2 before any work
        from tome_export.exporter.onnx_export import input_names_for

        load_calibration(options.calibration, input_names_for(model, len(input_shapes)), input_shapes)
    writer = BundleWriter(out, force=options.force)
    with writer as bundle:
        ctx = ExportContext(options, loaded, model, input_shapes, device, lowering, progress, bundle.path)
        ctx.precision = precision
        ctx.manifest.update(
            {
                "tome_export_version": __version__,
                "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                "source": {"model": options.model, "class": type(model).__name__, "weights": options.weights},
                "target": target.name,
                "device": device.name,
                "lowering": lowering,
                "opset": options.opset,
                "precision": precision.precision,
                "preprocessing": preprocessing_for(loaded.module, input_shapes),
                "merge": _merge_manifest(model, method),
            }
        )
        build_bundle(ctx, target, build_tdtm_variants if method.variants else build_single)
        if budget is not None:
            add_dynamic_loading(ctx, budget)
        if target.finalize is not None:
            target.finalize(ctx)
        _attach_cost_model(ctx.manifest, loaded.module, input_shapes, device.name, target.name)
        manifest = bundle.write_manifest(ctx.manifest)
    if writer.aside is not None:
        progress.say(f"--force: the folder that was at {out} is kept as {writer.aside}")
    return out, manifest


__all__ = ["ExportOptions", "default_out", "export", "parse_input_shape"]
