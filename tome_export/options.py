"""``ExportOptions``: everything one export is asked to do, as the CLI and ``export()`` take it.

A plain dataclass with no heavy imports, shared by the pipeline, the method table and the
targets (so none of them imports another for the type). :meth:`ExportOptions.from_cli`
builds it from the ``export`` command's click parameters: a parameter is a field of the
same name, or ``no_<field>`` for a flag that turns a default-on field off.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from tome_export.errors import UserError


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
    atol: float | None = None  # None: the precision's tolerance (precision.TOLERANCES)
    min_cosine: float | None = None  # None: the precision's tolerance
    precision: str | None = None  # fp32 | fp16 | int8; None: the target's precision on the device profile
    int8_mode: str | None = None  # static | dynamic (onnx), static (trt), weights (coreml); None: the target's first
    calibration: str | None = None  # int8 static: an .npz of calibration inputs (default: random inputs)
    fp32_metric: bool = True  # reduced precision: the merge's nodes (metric, decisions, sizes) stay fp32
    unmerged_baseline: bool = True  # reduced precision: also verify the unmerged model at that precision
    weights: str | None = None
    trust_pickle: bool = False
    prop_attn: bool = True
    split: str | None = None  # tome: "official" | "prefix" (None: official for class-token models)
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
    num_steps: int | None = None  # tdtm: total denoising steps (default 30)
    dynamic_loading: bool = False
    memory_budget: str | None = None  # e.g. "512MB"; default: the device profile's
    external_data_threshold: int | None = None  # weights bytes over which they go to model.onnx.data (None: ~1.8 GB)
    force: bool = False  # replace an -o folder tome-export did not write (kept aside, not deleted)

    @classmethod
    def from_cli(cls, params: dict[str, Any]) -> ExportOptions:
        """From click's parameters: ``name`` sets the field ``name``, ``no_name`` sets it to False."""
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {}
        for name, value in params.items():
            if name in fields:
                values[name] = value
            elif name.startswith("no_") and name[3:] in fields:
                values[name[3:]] = not value
            else:  # a programming error: an export option with no field to go to
                raise TypeError(f"CLI parameter {name!r} has no ExportOptions field")
        return cls(**values)


def parse_input_shape(text: str) -> list[tuple[int, ...]]:
    """``1,3,224,224`` or several inputs separated by ``;`` (``scalar`` for a 0-d input)."""
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


__all__ = ["ExportOptions", "parse_input_shape"]
