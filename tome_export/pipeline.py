"""MODEL → patched eager model → exported bundle, for every registered target.

A target turns the patched model into artifacts in a bundle folder and verifies them
against the eager model. Targets register here; the CLI and ``export()`` share this path.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import onnx
import torch
from torch import nn

from tome_export import __version__
from tome_export.bundle import BundleWriter
from tome_export.devices import DeviceProfile, get_device
from tome_export.errors import UserError, VerificationError
from tome_export.exporter.load import LoadedModel, load_model
from tome_export.exporter.lowerings import get_lowering
from tome_export.merging import METHODS, apply, merge_state
from tome_export.merging import schedule as schedules
from tome_export.progress import Progress

DEFAULT_R = 16


@dataclass
class ExportOptions:
    model: str
    target: str = "onnx"
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
        generator = torch.Generator().manual_seed(seed)
        return tuple(torch.randn(*s, generator=generator) for s in self.input_shapes)


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    default_lowering: str
    lowerings: tuple[str, ...]
    build: Callable[[ExportContext], None]


TARGETS: dict[str, Target] = {}


def register_target(target: Target) -> Target:
    TARGETS[target.name] = target
    return target


def get_target(name: str) -> Target:
    if name not in TARGETS:
        raise UserError(f"unknown target {name!r}; choose one of: {', '.join(sorted(TARGETS))}")
    return TARGETS[name]


def parse_input_shape(text: str) -> list[tuple[int, ...]]:
    """``1,3,224,224`` or several inputs separated by ``;``."""
    shapes = []
    for part in text.split(";"):
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


def _method_options(options: ExportOptions) -> tuple[str, dict]:
    if options.method not in METHODS:
        raise UserError(f"unknown method {options.method!r}; choose one of: {', '.join(sorted(METHODS))}")
    if options.method != "tome":
        if options.r is not None or options.schedule:
            raise UserError(f"--r/--schedule apply to method 'tome', not {options.method!r}")
        return options.method, {}
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


def default_out(name: str, method: str, method_opts: dict, target: str) -> Path:
    if method == "tome":
        tag = f"tome-r{method_opts['r']}" if "r" in method_opts else "tome-schedule"
    else:
        tag = method
    return Path(f"{name}-{tag}-{target}")


def _merge_manifest(model: nn.Module, method: str) -> dict:
    state = merge_state(model)
    if state is None or method == "none":
        return {"method": "none", "r_per_layer": [], "tokens_per_layer": []}
    return state.info()


def export(options: ExportOptions, progress: Progress | None = None) -> tuple[Path, dict]:
    """Run the whole export; returns (bundle path, manifest). Raises UserError on bad input."""
    progress = progress or Progress(quiet=True)
    target = get_target(options.target)
    device = get_device(options.device or "cpu")
    lowering = options.lowering or (device.lowering if device.lowering in target.lowerings else target.default_lowering)
    get_lowering(lowering)
    if lowering not in target.lowerings:
        raise UserError(f"target {target.name!r} cannot run lowering {lowering!r}; use one of {', '.join(target.lowerings)}")
    method, method_opts = _method_options(options)
    if options.input_shape is not None:
        input_shapes = parse_input_shape(options.input_shape)
    loaded = load_model(options.model, options.weights, options.trust_pickle)
    if options.input_shape is None:
        if loaded.default_input_shape is None:
            raise UserError(f"cannot tell the input shape of {options.model}; pass --input-shape like 1,3,224,224")
        input_shapes = [loaded.default_input_shape]
    model = apply(loaded.module, method, **method_opts)
    out = Path(options.out) if options.out else default_out(loaded.name, method, method_opts, target.name)
    try:
        with torch.no_grad():
            model(*[torch.zeros(s) for s in input_shapes])
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"{options.model} rejects input shape {input_shapes}: {first}") from None
    with BundleWriter(out) as bundle:
        ctx = ExportContext(options, loaded, model, input_shapes, device, lowering, progress, bundle.path)
        ctx.manifest.update(
            {
                "tome_export_version": __version__,
                "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                "source": {"model": options.model, "class": type(model).__name__},
                "target": target.name,
                "device": device.name,
                "lowering": lowering,
                "opset": options.opset,
                "precision": "fp32",
                "merge": _merge_manifest(model, method),
            }
        )
        target.build(ctx)
        manifest = bundle.write_manifest(ctx.manifest)
    return out, manifest


# -- ONNX target ---------------------------------------------------------------------

def _io_spec(graph_values, names: list[str]) -> list[dict]:
    by_name = {v.name: v for v in graph_values}
    specs = []
    for name in names:
        tensor = by_name[name].type.tensor_type
        specs.append(
            {
                "name": name,
                "shape": [d.dim_value if d.HasField("dim_value") else d.dim_param for d in tensor.shape.dim],
                "dtype": onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name,
            }
        )
    return specs


def save_onnx(model: onnx.ModelProto, path: Path) -> None:
    """Saves with external data past protobuf's 2 GB limit."""
    large = model.ByteSize() > 1_800_000_000
    onnx.save_model(model, str(path), save_as_external_data=large, location=f"{path.name}.data" if large else None)


def export_and_verify_onnx(ctx: ExportContext, filename: str = "model.onnx", providers=("CPUExecutionProvider",)):
    """Export with the context's lowering, save, verify on ONNX Runtime; fills the manifest."""
    from tome_export.exporter.onnx_export import export_onnx
    from tome_export.runtimes.onnxruntime import OnnxRuntimeRunner
    from tome_export.verify import verify

    with ctx.progress.step(f"exporting to ONNX (lowering {ctx.lowering}, opset {ctx.options.opset})"):
        exported = export_onnx(ctx.model, ctx.example_inputs(), ctx.lowering, ctx.options.opset)
    save_onnx(exported.model, ctx.bundle_dir / filename)
    graph = exported.model.graph
    ctx.manifest.update(
        {
            "artifact": filename,
            "inputs": _io_spec(graph.input, exported.input_names),
            "outputs": _io_spec(graph.output, exported.output_names),
            "rewrites": exported.rewrites,
        }
    )
    if not ctx.options.verify:
        ctx.manifest["verification"] = {"skipped": True}
        return exported
    with ctx.progress.step(f"verifying on ONNX Runtime against eager PyTorch ({ctx.options.seeds} seeds)"):
        runner = OnnxRuntimeRunner(exported.with_decisions, providers=tuple(providers))
        result = verify(
            ctx.model,
            runner.run,
            exported.input_names,
            exported.output_names,
            exported.decision_names,
            ctx.input_shapes,
            seeds=range(ctx.options.seeds),
            atol=ctx.options.atol,
            on_seed=ctx.progress.tick,
        )
    ctx.manifest["verification"] = result.to_dict()
    ctx.progress.say(result.summary())
    if not result.passed:
        raise VerificationError(
            f"{result.summary()}; nothing was written (--no-verify keeps the export unchecked)"
        )
    return exported


register_target(
    Target(
        name="onnx",
        description="ONNX graph verified on ONNX Runtime (CPU; CUDA with --device nvidia-*)",
        default_lowering="scatter",
        lowerings=("scatter",),
        build=export_and_verify_onnx,
    )
)
