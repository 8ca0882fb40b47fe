"""Reduced precision on the one export path: which precision, how it is applied, how it is judged.

- :func:`resolve_precision` — ``--precision`` (default: the target's precision on the device
  profile) and ``--int8-mode`` checked against what the target can run (:data:`INT8_MODES`);
  a precision a target cannot run is a one-line UserError before any work.
- :data:`TOLERANCES` — the documented per-precision pass/fail table (``--atol`` /
  ``--min-cosine`` override it).
- :func:`load_calibration` — a user's ``--calibration FILE.npz`` checked against the graph's
  inputs.

The graph pass that applies a plan is ``targets/precision_pass.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from tome_export.errors import UserError

if TYPE_CHECKING:
    from tome_export.options import ExportOptions

PRECISIONS = ("fp32", "fp16", "int8")


@dataclass(frozen=True)
class Tolerance:
    """Pass when max abs error ≤ ``atol`` (if set) and the worst output cosine ≥ ``min_cosine`` (if set)."""

    atol: float | None
    min_cosine: float | None
    # --pin-decisions: the largest drop in eager's similarity score a differing decision may
    # have and still count as a near-tie the precision flipped (verify.DEFAULT_TIE_TOL for fp32)
    tie_tol: float = 5e-3

    def accepts(self, max_abs_err: float, cosine: float) -> bool:
        ok_err = self.atol is None or bool(max_abs_err <= self.atol)
        ok_cos = self.min_cosine is None or bool(cosine >= self.min_cosine)
        return ok_err and ok_cos

    def text(self) -> str:
        parts = [f"max abs err ≤ {self.atol:g}"] if self.atol is not None else []
        parts += [f"cosine ≥ {self.min_cosine:g}"] if self.min_cosine is not None else []
        return " and ".join(parts) or "none"


# The documented table (README "Precision"): fp32 must match eager to float rounding; reduced
# precisions are judged on the output direction, because an absolute error scales with the
# output's magnitude and fp16/int8 rounding is relative.
TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(atol=1e-4, min_cosine=None),
    "fp16": Tolerance(atol=None, min_cosine=0.999),
    "int8": Tolerance(atol=None, min_cosine=0.8, tie_tol=5e-2),
}

# How each target runs int8; the first is the default.
INT8_MODES: dict[str, tuple[str, ...]] = {
    "onnx": ("static", "dynamic"),  # ORT QDQ calibrated / ORT dynamic (int8 weights, per-run activations)
    "trt": ("static",),  # symmetric QDQ, float bias: what TensorRT for RTX fuses
    "coreml": ("weights",),  # coremltools.optimize linear weight quantization (int8 weights)
}
CALIBRATION_SEED_BASE = 1000  # calibration draws seeds the verification (0..seeds-1) never uses
CALIBRATION_SAMPLES = 8


@dataclass(frozen=True)
class PrecisionPlan:
    precision: str
    int8_mode: str | None
    fp32_metric: bool
    tolerance: Tolerance


def resolve_precision(options: ExportOptions, target: str, default: str) -> PrecisionPlan:
    """The precision this export runs at (``default``: the target's on the device profile) and
    how it is judged; UserError for what ``target`` cannot run."""
    precision = options.precision or default
    if precision not in PRECISIONS:
        raise UserError(f"--precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    mode = None
    if precision == "int8":
        modes = INT8_MODES.get(target, ())
        if not modes:
            raise UserError(f"target {target!r} cannot run int8; use --precision fp32 or fp16")
        mode = options.int8_mode or modes[0]
        if mode not in modes:
            raise UserError(
                f"target {target!r} runs int8 as {' or '.join(modes)}, not {mode!r}; use --int8-mode {modes[0]}"
            )
    elif options.int8_mode is not None:
        raise UserError("--int8-mode applies to --precision int8")
    if options.calibration is not None and mode != "static":
        raise UserError("--calibration applies to --precision int8 with static quantization (--int8-mode static)")
    table = TOLERANCES[precision]
    tolerance = Tolerance(
        atol=options.atol if options.atol is not None else table.atol,
        min_cosine=options.min_cosine if options.min_cosine is not None else table.min_cosine,
        tie_tol=table.tie_tol,
    )
    if tolerance.min_cosine is not None and not -1.0 <= tolerance.min_cosine <= 1.0:
        raise UserError(f"--min-cosine {tolerance.min_cosine:g} must lie in [-1, 1]")
    return PrecisionPlan(precision, mode, options.fp32_metric, tolerance)


def load_calibration(path: str | Path, input_names: list[str], input_shapes: list[tuple[int, ...]]) -> list[dict]:
    """Feeds from ``path`` (.npz): one array per graph input, named like it, of the input's shape
    (one sample) or (K, *shape) (K samples); UserError saying what to fix otherwise."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
    except FileNotFoundError:
        raise UserError(f"--calibration {path}: no such file") from None
    except Exception as exc:  # not an npz, object arrays, a truncated file
        raise UserError(f"--calibration {path} is not a readable .npz of arrays ({type(exc).__name__})") from None
    if sorted(arrays) != sorted(input_names):
        raise UserError(
            f"--calibration {path} holds arrays {sorted(arrays)}; the graph's inputs are {input_names} "
            "(one array per input, named like it)"
        )
    counts = set()
    for name, shape in zip(input_names, input_shapes):
        array = arrays[name]
        if tuple(array.shape) == tuple(shape):
            arrays[name] = array[None]
        elif tuple(array.shape[1:]) != tuple(shape) or array.shape[0] == 0:
            raise UserError(
                f"--calibration {path}: {name!r} has shape {list(array.shape)}, expected {list(shape)} "
                f"or [K, {', '.join(map(str, shape))}]"
            )
        if not np.issubdtype(arrays[name].dtype, np.number) or not np.isfinite(arrays[name]).all():
            raise UserError(f"--calibration {path}: {name!r} must hold finite numbers")
        counts.add(arrays[name].shape[0])
    if len(counts) != 1:
        raise UserError(f"--calibration {path}: every input needs the same number of samples, got {sorted(counts)}")
    return [
        {name: np.ascontiguousarray(arrays[name][k]).astype(np.float32, copy=False) for name in input_names}
        for k in range(counts.pop())
    ]


__all__ = [
    "INT8_MODES",
    "PRECISIONS",
    "TOLERANCES",
    "PrecisionPlan",
    "Tolerance",
    "load_calibration",
    "resolve_precision",
]
