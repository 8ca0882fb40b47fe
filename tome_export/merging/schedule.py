"""r schedules: how many tokens each layer merges, and the static token counts.

The one place that says what a schedule argument means (``--schedule`` text, or the
``r=``/``schedule=`` arguments of ``apply(method="tome")`` and ``insert_merges``), so eager
patching and graph-level insertion cannot read the same value differently.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass

from tome_export.errors import UserError
from tome_export.merging.bipartite import max_r


@dataclass(frozen=True)
class Schedule:
    """A requested schedule: a constant r, a per-layer list, or ToMe's (r, inflection)."""

    kind: str  # "constant" | "list" | "linear"
    r: int = 0
    per_layer: tuple[int, ...] = ()
    inflection: float = 0.0

    def requested(self, depth: int) -> list[int]:
        """r per layer before capping by token count."""
        if self.kind == "constant":
            return [self.r] * depth
        if self.kind == "list":
            if len(self.per_layer) > depth:
                raise UserError(
                    f"schedule has {len(self.per_layer)} entries but the model has {depth} "
                    "attention blocks; give at most one r per block"
                )
            return list(self.per_layer) + [0] * (depth - len(self.per_layer))
        # Linear ramp with mean r: inflection 0 is constant, >0 merges more late, <0 early.
        if depth == 1:
            return [self.r]
        low = self.r * (1.0 - self.inflection)
        step = 2 * self.r * self.inflection / (depth - 1)
        return [max(0, int(low + step * i)) for i in range(depth)]

    def describe(self) -> dict:
        if self.kind == "constant":
            return {"kind": "constant", "r": self.r}
        if self.kind == "list":
            return {"kind": "list", "r": list(self.per_layer)}
        return {"kind": "linear", "r": self.r, "inflection": self.inflection}


def constant(r: int) -> Schedule:
    if r < 0:
        raise UserError(f"r must be ≥ 0, got {r}")
    return Schedule("constant", r=r)


def parse(text: str) -> Schedule:
    """Parse ``--schedule``: ``8,8,4,0`` (per layer) or ``linear:R:INFLECTION``."""
    text = text.strip()
    try:
        if text.startswith("linear:"):
            _, r_text, infl_text = text.split(":")
            r, inflection = int(r_text), float(infl_text)
            if r < 0 or not -1.0 <= inflection <= 1.0:
                raise UserError(f"--schedule {text!r}: need r ≥ 0 and -1 ≤ inflection ≤ 1")
            return Schedule("linear", r=r, inflection=inflection)
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise UserError(f"--schedule {text!r} is malformed: use a list like 16,16,8,0 or linear:R:INFLECTION") from None
    if any(v < 0 for v in values):
        raise UserError(f"--schedule {text!r}: every r must be ≥ 0")
    return Schedule("list", per_layer=values)


def coerce(
    r: int | None = None, schedule: Schedule | str | Sequence[int] | tuple[int, float] | None = None
) -> Schedule:
    """The schedule that ``r=`` / ``schedule=`` ask for; exactly one of them is given.

    - ``r=8``: constant;
    - a :class:`Schedule` as is; a string as ``--schedule`` reads it (``"8,8,4"``, ``"linear:8:0.5"``);
    - ``(r, inflection)`` with a *float* inflection: ToMe's linear schedule (``(8, -0.5)``);
    - any other sequence of ints: r per layer (``(8, 4)`` and ``[8, 4]`` both merge 8 tokens
      in the first block and 4 in the second).
    """
    if (r is None) == (schedule is None):
        raise UserError("give exactly one of r= or schedule= for method 'tome'")
    if r is not None:
        if _integer(r) is None:
            raise UserError(f"r must be an integer ≥ 0, got {r!r}")
        return constant(_integer(r))
    if isinstance(schedule, Schedule):
        return schedule
    if isinstance(schedule, str):
        return parse(schedule)
    values = tuple(schedule)
    if len(values) == 2 and _integer(values[0]) is not None and isinstance(values[1], float):
        r_value, inflection = _integer(values[0]), float(values[1])
        if r_value < 0 or not -1.0 <= inflection <= 1.0:
            raise UserError(f"schedule {values}: linear (r, inflection) needs r ≥ 0 and -1 ≤ inflection ≤ 1")
        return Schedule("linear", r=r_value, inflection=inflection)
    if any(_integer(v) is None for v in values):
        raise UserError(
            f"schedule {values!r}: give r per layer as integers, or (r, inflection) with a float inflection"
        )
    values = tuple(_integer(v) for v in values)
    if any(v < 0 for v in values):
        raise UserError(f"schedule {list(values)}: every r must be ≥ 0")
    return Schedule("list", per_layer=values)


def _integer(value) -> int | None:
    """``value`` as an int if it is an integer (numpy's included, bool not), else None."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def plan(requested: list[int], num_tokens: int, protected: int) -> tuple[list[int], list[int]]:
    """Cap each layer's r by its token count: (r per layer, tokens entering each layer)."""
    effective, tokens = [], []
    for r in requested:
        tokens.append(num_tokens)
        r = min(r, max_r(num_tokens, protected))
        effective.append(r)
        num_tokens -= r
    tokens.append(num_tokens)
    return effective, tokens
