"""MODEL → patched eager model → exported bundle, for every registered target.

A target turns the patched model into artifacts in a bundle folder and verifies them
against the eager model. Targets register here; the CLI and ``export()`` share this path.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from tome_export import __version__
from tome_export.bundle import BundleWriter, preprocessing_for
from tome_export.devices import get_device
from tome_export.errors import UserError
from tome_export.exporter.insert import has_patcher, insert_for_export
from tome_export.exporter.load import load_model
from tome_export.exporter.lowerings import get_lowering
from tome_export.inputs import default_input_shapes, make_inputs
from tome_export.merging import METHODS, apply, merge_state
from tome_export.merging import schedule as schedules
from tome_export.merging.tomesd import check_tomesd_options
from tome_export.progress import Progress
from tome_export.targets import ExportContext, get_target

DEFAULT_R = 16
DEFAULT_NUM_STEPS = 30


@dataclass
class ExportOptions:
    model: str
    target: str | None = None  # None: the device profile's default target
    method: str = "tome"
    r: int | None = None
    schedule: str | None = None
    input_shape: str | None = None
    out: str | None = None
    lowering: str | None = None
    device: str | None = None
    opset: int = 18
    verify: bool = True
    seeds: int = 3
    atol: float = 1e-4
    weights: str | None = None
    trust_pickle: bool = False
    prop_attn: bool = True
    pin_decisions: bool = False
    build_engine: bool = False  # --target trt: an engine is required (exit 3 without TensorRT)
    trt_check: bool = True  # --target trt: TensorRT-readiness check
    chunk_mb: float | None = None  # --target coreml: weights per chunk (default: the device's limit)
    ratio: float | None = None  # tomesd: fraction of tokens merged
    sx: int = 2
    sy: int = 2
    max_downsample: int = 1
    downsample: float | None = None  # todo: key/value downsampling factor per side (default 2)
    component: str | None = None  # a diffusers pipeline folder as MODEL: which component (default unet)
    protected: int | None = None  # graph-level insertion: prefix tokens never merged (None: detect)
    merge_steps: int | None = None  # tdtm: denoising steps that use the merged graph
    num_steps: int | None = None  # tdtm: total denoising steps (default DEFAULT_NUM_STEPS)
    dynamic_loading: bool = False
    memory_budget: str | None = None  # e.g. "512MB"; default: the device profile's
    external_data_threshold: int | None = None  # weights bytes over which they go to model.onnx.data (None: ~1.8 GB)


def parse_input_shape(text: str) -> list[tuple[int, ...]]:
    """``1,3,224,224`` or several inputs separated by ``;``."""
    shapes = []
    for part in text.split(";"):
        if part.strip() == "scalar":  # a 0-dim input, e.g. a diffusion timestep
            shapes.append(())
            continue
        try:
            dims = tuple(int(d) for d in part.strip().split(","))
        except ValueError:
            dims = ()
        if not dims or any(d <= 0 for d in dims):
            raise UserError(
                f"--input-shape {text!r} is malformed: give positive integers like 1,3,224,224 "
                "(separate several inputs with ';')"
            )
        shapes.append(dims)
    return shapes


def _tomesd_options(options: ExportOptions) -> tuple[str, dict]:
    if options.r is not None or options.schedule:
        raise UserError("method 'tomesd' takes --ratio (fraction of tokens merged), not --r/--schedule")
    ratio = 0.5 if options.ratio is None else options.ratio
    check_tomesd_options(ratio, options.sx, options.sy, options.max_downsample)  # before loading the model
    opts = {"ratio": ratio, "sx": options.sx, "sy": options.sy, "max_downsample": options.max_downsample}
    return "tomesd", opts


def _todo_options(options: ExportOptions) -> tuple[str, dict]:
    from tome_export.merging.todo import check_todo_options

    if options.r is not None or options.schedule or options.ratio is not None:
        raise UserError("method 'todo' takes --downsample (key/value factor per side), not --r/--schedule/--ratio")
    factor = 2.0 if options.downsample is None else options.downsample
    check_todo_options(factor, options.max_downsample)  # before loading the model
    return "todo", {"downsample": factor, "max_downsample": options.max_downsample}


def _tdtm_options(options: ExportOptions) -> tuple[str, dict]:
    if options.r is not None or options.schedule or options.ratio is not None:
        raise UserError("method 'tdtm' takes --merge-steps (and --num-steps), not --r/--schedule/--ratio")
    if options.merge_steps is None:
        raise UserError("--method tdtm needs --merge-steps K: the first K denoising steps use merged frames")
    num_steps = DEFAULT_NUM_STEPS if options.num_steps is None else options.num_steps
    return "tdtm", {"merge_steps": options.merge_steps, "num_steps": num_steps}


def _tome_options(options: ExportOptions) -> tuple[str, dict]:
    if options.r is not None and options.schedule:
        raise UserError("give --r or --schedule, not both")
    if options.schedule:
        return "tome", {"schedule": schedules.parse(options.schedule), "prop_attn": options.prop_attn}
    r = DEFAULT_R if options.r is None else options.r
    if r < 0:
        raise UserError(f"--r must be ≥ 0, got {r}")
    if r == 0:
        return "none", {}  # the unmerged baseline
    return "tome", {"r": r, "prop_attn": options.prop_attn}


def _no_options(options: ExportOptions) -> tuple[str, dict]:
    if options.r is not None or options.schedule:
        raise UserError(f"--r/--schedule apply to method 'tome', not {options.method!r}")
    return options.method, {}


# Each method turns the CLI's options into its own apply() options (and checks them).
METHOD_OPTION_PARSERS = {
    "tome": _tome_options,
    "tomesd": _tomesd_options,
    "tdtm": _tdtm_options,
    "todo": _todo_options,
}


def _method_options(options: ExportOptions) -> tuple[str, dict]:
    if options.method not in METHODS:
        raise UserError(f"unknown method {options.method!r}; choose one of: {', '.join(sorted(METHODS))}")
    if options.method != "tdtm" and (options.merge_steps is not None or options.num_steps is not None):
        raise UserError(f"--merge-steps/--num-steps apply to method 'tdtm', not {options.method!r}")
    if options.method != "tomesd" and options.ratio is not None:
        raise UserError(f"--ratio applies to method 'tomesd', not {options.method!r}")
    if options.method != "todo" and options.downsample is not None:
        raise UserError(f"--downsample applies to method 'todo', not {options.method!r}")
    return METHOD_OPTION_PARSERS.get(options.method, _no_options)(options)


def default_out(name: str, method: str, method_opts: dict, target: str) -> Path:
    if method == "tome":
        tag = f"tome-r{method_opts['r']}" if "r" in method_opts else "tome-schedule"
    elif method == "tomesd":
        tag = f"tomesd-{method_opts['ratio']:g}"
    elif method == "todo":
        tag = f"todo-{method_opts['downsample']:g}"
    else:
        tag = method
    return Path(f"{name}-{tag}-{target}")


def _merge_manifest(model: nn.Module, method: str) -> dict:
    state = merge_state(model)
    if state is None or method == "none":
        return {"method": "none", "r_per_layer": [], "tokens_per_layer": []}
    return {"insertion": "eager", **state.info()}


def export(options: ExportOptions, progress: Progress | None = None) -> tuple[Path, dict]:
    """Run the whole export; returns (bundle path, manifest). Raises UserError on bad input."""
    progress = progress or Progress(quiet=True)
    device = get_device(options.device or "cpu")
    target = get_target(options.target or device.default_target)
    lowering = options.lowering or (device.lowering if device.lowering in target.lowerings else target.default_lowering)
    if target.uses_onnx_lowering:
        get_lowering(lowering)
    if lowering not in target.lowerings:
        raise UserError(
            f"target {target.name!r} cannot run lowering {lowering!r}; use one of {', '.join(target.lowerings)}"
        )
    method, method_opts = _method_options(options)
    from tome_export.targets.video import resolve_budget

    budget = resolve_budget(options.dynamic_loading, options.memory_budget, device.memory_budget_mb)
    if options.input_shape is not None:
        input_shapes = parse_input_shape(options.input_shape)
    loaded = load_model(options.model, options.weights, options.trust_pickle, options.component)
    if options.input_shape is None:
        input_shapes = default_input_shapes(loaded.module) or (
            [loaded.default_input_shape] if loaded.default_input_shape else None
        )
        if input_shapes is None:
            raise UserError(f"cannot tell the input shape of {options.model}; pass --input-shape like 1,3,224,224")
    if method == "tome" and (loaded.program is not None or not has_patcher(loaded.module)):
        model = insert_for_export(loaded, method_opts, input_shapes, options.protected, progress)
    elif options.protected is not None:
        raise UserError("--protected applies to graph-level insertion (.pt2, or models without timm-style blocks)")
    else:
        model = apply(loaded.module, method, **method_opts)
    if budget is not None:
        from tome_export.targets.video import check_budget_fits

        check_budget_fits(model, budget)
    out = Path(options.out) if options.out else default_out(loaded.name, method, method_opts, target.name)
    try:
        with torch.no_grad():
            model(*make_inputs(model, input_shapes, 0))
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"{options.model} rejects input shape {input_shapes}: {first}") from None
    state = merge_state(model)
    if method in ("tomesd", "todo") and state is not None and not state.tokens_per_layer:
        raise UserError(
            f"method {method!r} found no transformer block at downsampling ≤ {options.max_downsample} in "
            f"{options.model}; raise --max-downsample (SDXL's first attention level is 2)"
        )
    with BundleWriter(out) as bundle:
        ctx = ExportContext(options, loaded, model, input_shapes, device, lowering, progress, bundle.path)
        ctx.manifest.update(
            {
                "tome_export_version": __version__,
                "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                "source": {"model": options.model, "class": type(model).__name__, "weights": options.weights},
                "target": target.name,
                "device": device.name,
                "lowering": lowering,
                "opset": options.opset,
                "precision": device.precision if target.name != "onnx" else "fp32",
                "preprocessing": preprocessing_for(loaded.module, input_shapes),
                "merge": _merge_manifest(model, method),
            }
        )
        if method == "tdtm":
            from tome_export.targets.video import build_tdtm_variants

            build_tdtm_variants(ctx, target)
        else:
            target.build(ctx)
        if budget is not None:
            from tome_export.targets.video import add_dynamic_loading

            add_dynamic_loading(ctx, budget)
        manifest = bundle.write_manifest(ctx.manifest)
    return out, manifest
