"""r schedules: how many tokens each layer merges, and the static token counts.

Owns :class:`Schedule` (constant, per-layer list or linear), parsing a schedule from text
and :func:`plan`, which turns the requested r per layer into the r actually merged (capped
by what each layer's token count allows) and the token count entering each layer.
"""

from __future__ import annotations

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
