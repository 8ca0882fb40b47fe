"""Compare an exported model with the eager patched model: output error and decisions.

Merge decisions are discrete: a near-tie can flip under TF32 or fp16 and then outputs
differ a lot although nothing is wrong with the lowering. So every comparison reports
decision agreement (the fraction of tokens whose output slot matches) per merging layer
next to the output error.

With ``pin_decisions`` the eager model runs a second time with the merge decisions read
back from the exported graph's slot outputs (``merging.pinning``), and the result says
which of these it is: ``match`` (no pin needed), ``decision_flip`` (error vanishes when
pinned and the backend's decisions are near-ties in eager's scores: the lowering is
right), ``wrong_decisions`` (pinned outputs agree but the backend chose edges eager
scores clearly worse: its matching is wrong), ``lowering_error`` (error stays when pinned).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from tome_export.exporter.tracer import stable_sorts
from tome_export.inputs import make_inputs
from tome_export.merging import merge_state
from tome_export.merging.pinning import forced_decisions
from tome_export.outputs import flatten_outputs

# Largest drop in eager cosine similarity a pinned decision may cost and still count as
# a near-tie: fp16 rounds a cosine in [-1, 1] by up to ~5e-4, TF32 dot products by ~1e-3.
DEFAULT_TIE_TOL = 5e-3


@dataclass
class Verification:
    passed: bool
    atol: float | None
    max_abs_err: float
    cosine: float  # worst (lowest) over outputs and seeds
    worst_output: str
    decision_agreement: list[float] = field(default_factory=list)  # per merging layer, worst seed
    seeds: list[int] = field(default_factory=list)
    runtime: str = "onnxruntime"
    # Filled with pin_decisions: {"max_abs_err", "cosine", "max_tie_gap", "tie_tol", "diagnosis"}
    pinned: dict | None = None
    # Eager sorts run stable (exact ties in the exported graph's order; tracer.stable_sorts):
    # how many, and in how many the unstable kernel's tie order differed.
    exact_ties: dict = field(default_factory=dict)
    min_cosine: float | None = None  # reduced precision: the pass threshold on the worst cosine

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        agreement = min(self.decision_agreement) if self.decision_agreement else 1.0
        verdict = "passed" if self.passed else "FAILED"
        text = (
            f"verification {verdict}: max abs err {self.max_abs_err:.3g} on {self.worst_output!r} "
            f"(tolerance {_tolerance_text(self.atol, self.min_cosine)}), cosine {self.cosine:.6f}, "
            f"merge decisions agree {agreement:.2%} (worst layer)"
        )
        differing = [f"{i} ({a:.2%})" for i, a in enumerate(self.decision_agreement) if a < 1.0]
        if differing and not self.passed:
            text += f"; decisions differ in merging layers {', '.join(differing[:8])}"
        if self.exact_ties.get("tie_order_differed"):
            text += (
                f"; {self.exact_ties['tie_order_differed']} eager sorts had exact ties, "
                "ordered as the exported graph orders them (stable)"
            )
        if self.pinned is not None:
            text += (
                f"; pinned to the backend's decisions: max abs err {self.pinned['max_abs_err']:.3g}, "
                f"largest tie gap {self.pinned['max_tie_gap']:.2g} → {self.pinned['diagnosis']}"
            )
        return text


def _tolerance_text(atol: float | None, min_cosine: float | None) -> str:
    parts = ([f"≤ {atol:g}"] if atol is not None else []) + ([f"cosine ≥ {min_cosine:g}"] if min_cosine is not None else [])
    return ", ".join(parts) or "none"


def _within(err: float, cos: float, atol: float | None, min_cosine: float | None) -> bool:
    """The pass rule: max abs error ≤ atol (when set) and cosine ≥ min_cosine (when set); NaN fails."""
    return (atol is None or bool(err <= atol)) and (min_cosine is None or bool(cos >= min_cosine))


def random_inputs(shapes: list[tuple[int, ...]], seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=generator) for shape in shapes]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    denominator = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / denominator) if denominator else float(np.array_equal(a, b))


def verify(
    model: nn.Module,
    run_exported: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]],
    input_names: list[str],
    output_names: list[str],
    decision_names: list[str],
    input_shapes: list[tuple[int, ...]],
    seeds: Iterable[int] = (0, 1, 2),
    atol: float | None = 1e-4,
    on_seed: Callable[[int], None] | None = None,
    runtime: str = "onnxruntime",
    pin_decisions: bool = False,
    tie_tol: float = DEFAULT_TIE_TOL,
    min_cosine: float | None = None,
) -> Verification:
    """Run eager and exported on the same random inputs for each seed and compare.

    ``pin_decisions``: also compare against eager forced to the exported graph's merge
    decisions (see the module doc); the export then passes when outputs match unpinned,
    or when they match pinned and every differing decision is a near-tie (≤ ``tie_tol``).
    "Match" means max abs error ≤ ``atol`` (None: not checked) and worst output cosine ≥
    ``min_cosine`` (None: not checked) — reduced precisions are judged on the cosine."""
    worst_err, worst_output, worst_cos = 0.0, output_names[0], 1.0
    pinned_err, pinned_cos, max_gap, invalid = 0.0, 1.0, 0.0, None
    agreement = [1.0] * len(decision_names)
    made_stable = tie_order_changed = 0
    seeds = list(seeds)
    for seed in seeds:
        inputs = make_inputs(model, input_shapes, seed)
        with torch.no_grad(), stable_sorts() as sorts:
            eager = model(*inputs)
        made_stable += sorts.made_stable
        tie_order_changed += sorts.tie_order_changed
        eager_outs = [t for _, t in flatten_outputs(eager)]
        state = merge_state(model)
        eager_slots = [s.numpy() for s in state.slots] if state is not None else []
        got = run_exported({n: t.numpy() for n, t in zip(input_names, inputs)})
        for name, ref in zip(output_names, eager_outs):
            ref = ref.detach().numpy()
            err = float(np.abs(got[name].astype(np.float64) - ref).max()) if ref.size else 0.0
            if err > worst_err or np.isnan(err):
                worst_err, worst_output = err, name
            cos = cosine(got[name], ref)
            worst_cos = cos if np.isnan(cos) else min(worst_cos, cos)
        for layer, name in enumerate(decision_names):
            if layer < len(eager_slots):
                agreement[layer] = min(agreement[layer], float((got[name] == eager_slots[layer]).mean()))
        if pin_decisions:
            try:
                slot_maps = [got[name] for name in decision_names]
                with torch.no_grad(), stable_sorts(), forced_decisions(slot_maps) as forced:
                    pinned = model(*inputs)
            except ValueError as exc:  # the graph's slot maps are no merge decision at all
                invalid = str(exc)
            else:
                max_gap = max([max_gap, *forced.tie_gaps])
                pinned_outs = [t for _, t in flatten_outputs(pinned)]
                for name, ref in zip(output_names, pinned_outs):
                    ref = ref.detach().numpy()
                    err = float(np.abs(got[name].astype(np.float64) - ref).max()) if ref.size else 0.0
                    pinned_err = err if np.isnan(err) else max(pinned_err, err)
                    pinned_cos = min(pinned_cos, cosine(got[name], ref))
        if on_seed:
            on_seed(seed)
    passed = _within(worst_err, worst_cos, atol, min_cosine)
    pinned_report = None
    if pin_decisions:
        if invalid is not None:
            diagnosis = "lowering_error"
        elif passed:
            diagnosis = "match"
        elif not _within(pinned_err, pinned_cos, atol, min_cosine):
            diagnosis = "lowering_error"
        elif max_gap > tie_tol:
            diagnosis = "wrong_decisions"
        else:
            diagnosis = "decision_flip"
        pinned_report = {
            "max_abs_err": float("nan") if invalid else pinned_err,
            "cosine": float("nan") if invalid else pinned_cos,
            "max_tie_gap": max_gap,
            "tie_tol": tie_tol,
            "diagnosis": diagnosis,
        }
        if invalid:
            pinned_report["invalid_decisions"] = invalid
        passed = diagnosis in ("match", "decision_flip")
    exact_ties = {"eager_sorts_made_stable": made_stable, "tie_order_differed": tie_order_changed}
    return Verification(
        passed, atol, worst_err, worst_cos, worst_output, agreement, seeds, runtime, pinned_report,
        exact_ties=exact_ties, min_cosine=min_cosine,
    )
