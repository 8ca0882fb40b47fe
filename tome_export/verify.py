"""Compare an exported model with the eager patched model: output error and decisions.

Merge decisions are discrete: a near-tie can flip under TF32 or fp16 and then outputs
differ a lot although nothing is wrong with the lowering. So every comparison reports
decision agreement (the fraction of tokens whose output slot matches) per merging layer
next to the output error.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from tome_export.inputs import make_inputs
from tome_export.merging import merge_state


@dataclass
class Verification:
    passed: bool
    atol: float
    max_abs_err: float
    cosine: float  # worst (lowest) over outputs and seeds
    worst_output: str
    decision_agreement: list[float] = field(default_factory=list)  # per merging layer, worst seed
    seeds: list[int] = field(default_factory=list)
    runtime: str = "onnxruntime"

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        agreement = min(self.decision_agreement) if self.decision_agreement else 1.0
        verdict = "passed" if self.passed else "FAILED"
        return (
            f"verification {verdict}: max abs err {self.max_abs_err:.3g} on {self.worst_output!r} "
            f"(tolerance {self.atol:g}), cosine {self.cosine:.6f}, "
            f"merge decisions agree {agreement:.2%} (worst layer)"
        )


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
    atol: float = 1e-4,
    on_seed: Callable[[int], None] | None = None,
    runtime: str = "onnxruntime",
) -> Verification:
    """Run eager and exported on the same random inputs for each seed and compare."""
    worst_err, worst_output, worst_cos = 0.0, output_names[0], 1.0
    agreement = [1.0] * len(decision_names)
    seeds = list(seeds)
    for seed in seeds:
        inputs = make_inputs(model, input_shapes, seed)
        with torch.no_grad():
            eager = model(*inputs)
        eager_outs = list(eager) if isinstance(eager, (tuple, list)) else [eager]
        state = merge_state(model)
        eager_slots = [s.numpy() for s in state.slots] if state is not None else []
        got = run_exported({n: t.numpy() for n, t in zip(input_names, inputs)})
        for name, ref in zip(output_names, eager_outs):
            ref = ref.detach().numpy()
            err = float(np.abs(got[name].astype(np.float64) - ref).max()) if ref.size else 0.0
            if err > worst_err or np.isnan(err):
                worst_err, worst_output = err, name
            worst_cos = min(worst_cos, cosine(got[name], ref))
        for layer, name in enumerate(decision_names):
            if layer < len(eager_slots):
                agreement[layer] = min(agreement[layer], float((got[name] == eager_slots[layer]).mean()))
        if on_seed:
            on_seed(seed)
    passed = bool(worst_err <= atol)
    return Verification(passed, atol, worst_err, worst_cos, worst_output, agreement, seeds, runtime)
