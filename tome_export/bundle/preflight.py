"""Checks on an export's options made before any work: bad input exits 2 up front, not after
minutes of exporting (or, worse, in a verification that "fails" because of a typo).

Covers the output path (``-o ''``, the current folder, a filesystem root), the opset range
the exporter really emits, the tolerance, seeds and flag combinations that can't work.
"""

from __future__ import annotations

import math

from tome_export.bundle.writer import check_output_path
from tome_export.errors import UserError

# torch.onnx (dynamo) + onnxscript emit opset 18 at least (a lower request silently gives
# 18); ONNX Runtime 1.32 rejects graphs above 25 (measured: opset 26 fails on Gelu).
MIN_OPSET = 18
MAX_OPSET = 25


def check_export_options(options) -> None:
    """Raise UserError (one line) for options that can't give a correct export."""
    check_output_path(options.out)
    opset = options.opset
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise UserError(f"--opset {opset} is not supported: the exporter emits opsets {MIN_OPSET} to {MAX_OPSET}")
    atol = options.atol  # None: the precision's default tolerance (tome_export/precision.py)
    bad_atol = isinstance(atol, bool) or not isinstance(atol, (int, float)) or not math.isfinite(atol) or atol < 0
    if atol is not None and bad_atol:
        raise UserError(f"--atol {atol} is not a tolerance: give a finite number ≥ 0 like 1e-4")
    if options.verify and (isinstance(options.seeds, bool) or not isinstance(options.seeds, int) or options.seeds < 1):
        raise UserError(f"--seeds {options.seeds} must be a positive integer")
    if options.pin_decisions and not options.verify:
        raise UserError("--pin-decisions is part of verification; drop --no-verify or --pin-decisions")
