"""The table of merging methods: one :class:`Method` record per method, filled here only.

A record carries everything method-specific that the rest of the package needs: how to
patch a model (``apply``), how to turn the export options into ``apply``'s options (and
check them), which export options only it takes, the tag in the default output folder
name, whether merges can be inserted at graph level for models without a patcher
(``tome``), and whether it ships several graph variants (``tdtm``: merged + full).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from tome_export.errors import UserError
from tome_export.merging import schedule as schedules
from tome_export.merging.tdtm import apply_tdtm
from tome_export.merging.todo import apply_todo, check_todo_options
from tome_export.merging.tome import apply_tome
from tome_export.merging.tomesd import apply_tomesd, check_tomesd_options
from tome_export.options import ExportOptions

DEFAULT_R = 16
DEFAULT_RATIO = 0.5
DEFAULT_NUM_STEPS = 30


@dataclass(frozen=True)
class Method:
    """One merging method and everything the pipeline and the CLI need to know about it."""

    name: str
    summary: str
    apply: Callable[..., nn.Module]
    # Export options → (method actually applied, its apply() options); raises UserError on bad input.
    parse_options: Callable[[ExportOptions], tuple[str, dict]]
    output_tag: Callable[[dict], str]  # apply() options → tag in the default output folder name
    own_options: dict[str, str] = field(default_factory=dict)  # ExportOptions field → CLI flag, this method only
    graph_insertion: bool = False  # models without a patcher get merges inserted in the exported graph
    variants: bool = False  # writes a merged and a full graph sharing weights (TDTM)


def _apply_none(model: nn.Module, **options) -> nn.Module:
    return model


def _tome_options(options: ExportOptions) -> tuple[str, dict]:
    if options.r is not None and options.schedule:
        raise UserError("give --r or --schedule, not both")
    split = {"split": options.split} if options.split else {}
    if options.schedule:
        return "tome", {"schedule": schedules.parse(options.schedule), "prop_attn": options.prop_attn, **split}
    r = DEFAULT_R if options.r is None else options.r
    if r < 0:
        raise UserError(f"--r must be ≥ 0, got {r}")
    if r == 0:
        return "none", {}  # the unmerged baseline
    return "tome", {"r": r, "prop_attn": options.prop_attn, **split}


def _tomesd_options(options: ExportOptions) -> tuple[str, dict]:
    if options.r is not None or options.schedule:
        raise UserError("method 'tomesd' takes --ratio (fraction of tokens merged), not --r/--schedule")
    ratio = DEFAULT_RATIO if options.ratio is None else options.ratio
    check_tomesd_options(ratio, options.sx, options.sy, options.max_downsample)  # before loading the model
    return "tomesd", {"ratio": ratio, "sx": options.sx, "sy": options.sy, "max_downsample": options.max_downsample}


def _tdtm_options(options: ExportOptions) -> tuple[str, dict]:
    if options.r is not None or options.schedule or options.ratio is not None:
        raise UserError("method 'tdtm' takes --merge-steps (and --num-steps), not --r/--schedule/--ratio")
    if options.merge_steps is None:
        raise UserError("--method tdtm needs --merge-steps K: the first K denoising steps use merged frames")
    num_steps = DEFAULT_NUM_STEPS if options.num_steps is None else options.num_steps
    return "tdtm", {"merge_steps": options.merge_steps, "num_steps": num_steps}


def _todo_options(options: ExportOptions) -> tuple[str, dict]:
    if options.r is not None or options.schedule or options.ratio is not None:
        raise UserError("method 'todo' takes --downsample (key/value factor per side), not --r/--schedule/--ratio")
    factor = 2.0 if options.downsample is None else options.downsample
    check_todo_options(factor, options.max_downsample)  # before loading the model
    return "todo", {"downsample": factor, "max_downsample": options.max_downsample}


def _no_options(options: ExportOptions) -> tuple[str, dict]:
    if options.r is not None or options.schedule:
        raise UserError(f"--r/--schedule apply to method 'tome', not {options.method!r}")
    return options.method, {}


def _tome_tag(opts: dict) -> str:
    return f"tome-r{opts['r']}" if "r" in opts else "tome-schedule"


METHODS: dict[str, Method] = {
    method.name: method
    for method in (
        Method(
            "tome",
            "ToMe bipartite soft matching (timm-style ViTs; graph-level insertion otherwise)",
            apply_tome,
            _tome_options,
            _tome_tag,
            graph_insertion=True,
        ),
        Method(
            "tomesd",
            "tomesd merge/unmerge around a diffusion UNet's attention and MLP",
            apply_tomesd,
            _tomesd_options,
            lambda opts: f"tomesd-{opts['ratio']:g}",
            own_options={"ratio": "--ratio"},
        ),
        Method(
            "tdtm",
            "TDTM temporal frame merging in the first denoising steps (merged + full graphs)",
            apply_tdtm,
            _tdtm_options,
            lambda opts: "tdtm",
            own_options={"merge_steps": "--merge-steps", "num_steps": "--num-steps"},
            variants=True,
        ),
        Method(
            "todo",
            "ToDo: attention keys/values downsampled in a diffusion UNet's high-resolution blocks",
            apply_todo,
            _todo_options,
            lambda opts: f"todo-{opts['downsample']:g}",
            own_options={"downsample": "--downsample"},
        ),
        Method("none", "no merging (the unmerged baseline)", _apply_none, _no_options, lambda opts: "none"),
    )
}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise UserError(f"unknown method {name!r}; choose one of: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def method_options(options: ExportOptions) -> tuple[Method, dict]:
    """The method the options ask for (``--r 0`` is ``none``) and its checked ``apply`` options."""
    asked = get_method(options.method)
    for other in METHODS.values():  # options another method owns must stay unset
        given = [flag for name, flag in other.own_options.items() if getattr(options, name) is not None]
        if other is not asked and given:
            verb = "applies" if len(given) == 1 else "apply"
            raise UserError(f"{'/'.join(given)} {verb} to method {other.name!r}, not {asked.name!r}")
    name, opts = asked.parse_options(options)
    return METHODS[name], opts


__all__ = ["DEFAULT_NUM_STEPS", "DEFAULT_R", "METHODS", "Method", "get_method", "method_options"]
