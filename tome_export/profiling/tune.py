"""Pick the merge ratio (and precision) that meets a latency budget with the best fidelity, from measured points.

Owns ``tome-export tune``: parsing the budget, reusing points from the result store for the
same model, device, input shape and tool version, measuring the missing candidates (export +
:func:`tome_export.profiling.sweep.profile_bundle`) and choosing among them; candidates are
r × precision. Before exporting a candidate it asks the cost model
(:mod:`tome_export.cost_model`) whether it can pay or fit the budget and skips
the ones that can't (``pruned``); what it returns is always measured.
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tome_export import __version__
from tome_export.cost_model import (
    Coefficients,
    ModelShape,
    Prediction,
    coefficients_for,
    constant_plan,
    predict,
    shape_of,
)
from tome_export.errors import UserError
from tome_export.profiling.store import ResultStore
from tome_export.progress import Progress

PRUNE_TOLERANCE = 0.25  # a candidate predicted this far over the budget is not measured
_UNITS_MS = {"ms": 1.0, "s": 1000.0, "us": 1e-3, "µs": 1e-3, "": 1.0}


def parse_budget(text: str) -> float:
    """``20ms``, ``20``, ``0.02s``, ``500us`` → milliseconds."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(ms|s|us|µs)?\s*", text)
    if not match or float(match.group(1)) <= 0:
        raise UserError(f"--latency-budget {text!r} is malformed: give a positive time like 20ms or 0.02s")
    return float(match.group(1)) * _UNITS_MS[match.group(2) or ""]


def choose(points: list[dict], budget_ms: float, min_cosine: float | None = None) -> dict | None:
    """Best fidelity (cosine, then top-1) among points within budget (and ≥ ``min_cosine``); ties → faster."""
    fitting = [p for p in points if p["median_ms"] <= budget_ms]
    if min_cosine is not None:
        fitting = [p for p in fitting if (p.get("cosine") or 0.0) >= min_cosine]
    if not fitting:
        return None
    return max(fitting, key=lambda p: (p.get("cosine") or 0.0, p.get("top1_agreement") or 0.0, -p["median_ms"]))


def _point(rec: dict) -> dict:
    fidelity = rec.get("fidelity") or {}
    return {
        "r": rec["r"],
        "precision": rec.get("precision") or "fp32",
        "schedule": rec["schedule"],
        "median_ms": rec["latency_ms"]["median"],
        "spread_ms": rec["latency_ms"].get("spread"),
        "cosine": fidelity.get("cosine"),
        "top1_agreement": fidelity.get("top1_agreement"),
        "created": rec["created"],
        "from": "database",
    }


@dataclass
class _Predictor:
    """The cost model for one model (its shape, token count, depth), predicting any constant r;
    :meth:`ms` turns a prediction into milliseconds with the points measured so far."""

    shape: ModelShape
    tokens: int
    protected: int
    depth: int
    coefficients: Coefficients

    def predict(self, r: int) -> Prediction:
        return predict(*constant_plan(self.tokens, self.depth, r, self.protected), self.shape, self.coefficients)

    def ms(self, r: int, measured: list[dict]) -> float | None:
        """Predicted median: the model's ms scaled by measured/predicted of the fp32 points."""
        scales = sorted(p["median_ms"] / self.predict(p["r"]).total_ms for p in measured if p["precision"] == "fp32")
        return self.predict(r).total_ms * scales[len(scales) // 2] if scales else None


def model_predictor(
    model: str, input_shape: str | None, device: str, trust_pickle: bool, coefficients: Coefficients | None
) -> _Predictor | None:
    """The cost model for MODEL at its input shape: one eager forward with ToMe at r=1 gives
    the token count, protected tokens and depth; None when that model can't be patched here."""
    import torch

    from tome_export.devices import get_device
    from tome_export.exporter.load import load_model
    from tome_export.inputs import default_input_shapes, make_inputs
    from tome_export.merging import apply, merge_state
    from tome_export.options import parse_input_shape

    coefficients = coefficients or coefficients_for(device, get_device(device).default_target)
    if coefficients is None:
        return None
    loaded = load_model(model, None, trust_pickle)
    shapes = parse_input_shape(input_shape) if input_shape else default_input_shapes(loaded.module)
    shapes = shapes or ([loaded.default_input_shape] if loaded.default_input_shape else None)
    if shapes is None:
        return None
    try:
        module = apply(loaded.module, "tome", r=1)
        with torch.no_grad():
            module(*make_inputs(module, shapes, 0))
    except Exception:  # noqa: BLE001 - not patchable eagerly (graph insertion, other blocks): no pruning
        return None
    state = merge_state(module)
    if state is None or not state.tokens_per_layer:
        return None
    tokens, protected = state.tokens_per_layer[0], state.protected
    batch = shapes[0][0] if isinstance(shapes[0][0], int) else 1
    shape = shape_of(module, batch, patch_tokens=tokens - protected)
    if shape is None:
        return None
    return _Predictor(shape, tokens, protected, len(state.tokens_per_layer), coefficients)


def prune_reason(
    r: int, predictor: _Predictor, budget_ms: float, measured: list[dict], candidates: list[int]
) -> tuple[str, dict] | None:
    """Why fp32 candidate ``r`` need not be measured (None: measure it), with the prediction.

    Not paying (predicted slower than r=0, which is a candidate and more faithful), or predicted
    over the budget by more than the model's tolerance. The candidate predicted fastest is
    always measured, so the reported fastest point is a measurement."""
    prediction = predictor.predict(r)
    info = {"r": r, "precision": "fp32", "predicted_speedup": round(prediction.speedup, 3)}
    if r > 0 and 0 in candidates and prediction.speedup < 1.0:
        return f"predicted {prediction.speedup:.2f}× vs r=0: slower than the unmerged model", info
    fastest = max(candidates, key=lambda c: predictor.predict(c).speedup)
    predicted_ms = predictor.ms(r, measured)
    if predicted_ms is not None:
        info["predicted_ms"] = round(predicted_ms, 3)
        if r != fastest and predicted_ms > budget_ms * (1 + PRUNE_TOLERANCE):
            return f"predicted {predicted_ms:.2f} ms, over the {budget_ms:g} ms budget", info
    return None


def tune(
    model: str,
    device: str,
    budget_ms: float,
    candidates: list[int],
    store: ResultStore,
    input_shape: str | None = None,
    runs: int = 20,
    warmup: int = 3,
    remeasure: bool = False,
    progress: Progress | None = None,
    trust_pickle: bool = False,
    precisions: list[str] | None = None,
    min_cosine: float | None = None,
    prune: bool = True,
    coefficients: Coefficients | None = None,
) -> dict:
    """Use stored points for (model, device, input shape, this version); measure missing candidates.

    Candidates are every r × ``precisions`` (default fp32 only); ``min_cosine``: the least
    fidelity (cosine vs the unmerged fp32 model) a choice may have. With ``prune``, fp32
    candidates the cost model (``coefficients``, default: the device's calibrated ones) says
    cannot pay or cannot fit the budget are not exported; they are listed under ``pruned``
    and never chosen: the choice is always a measured point."""
    from tome_export.devices import get_device
    from tome_export.pipeline import ExportOptions, export
    from tome_export.profiling.sweep import profile_bundle, token_cap

    progress = progress or Progress(quiet=True)
    profile = get_device(device)
    if any(r < 0 for r in candidates):
        raise UserError(f"--candidates must be ≥ 0, got {candidates}")
    precisions = list(precisions or ["fp32"])
    points: dict[tuple[int, str], dict] = {}
    if not remeasure:
        for rec in store.records(model=model, device=profile.name, tool_version=f"tome-export {__version__}"):
            key = (rec.get("r"), rec.get("precision") or "fp32")
            if key[0] in candidates and key[1] in precisions and rec.get("fidelity") and rec.get("target") == "onnx":
                if input_shape is None or rec.get("input_shape") == [
                    [int(d) for d in s.split(",")] for s in input_shape.split(";")
                ]:
                    points[key] = _point(rec)  # later records win
    missing = [(r, p) for r in sorted(candidates) for p in precisions if (r, p) not in points]
    pruned, fp32_missing = [], [r for r, p in missing if p == "fp32"]
    predictor = None
    if prune and len(fp32_missing) > 1:
        with progress.step(f"cost model: reading {model}'s shape and token counts"):
            predictor = model_predictor(model, input_shape, profile.name, trust_pickle, coefficients)
    if missing:
        with tempfile.TemporaryDirectory(prefix="tome-tune-") as tmp:
            for r, precision in missing:
                if prune and predictor is not None and precision == "fp32":
                    reason = prune_reason(r, predictor, budget_ms, list(points.values()), candidates)
                    if reason is not None:
                        progress.say(f"not measuring r={r}: {reason[0]}")
                        pruned.append({**reason[1], "why": reason[0]})
                        continue
                options = ExportOptions(
                    model=model,
                    r=r,
                    input_shape=input_shape,
                    out=str(Path(tmp) / f"r{r}-{precision}"),
                    device=profile.name,
                    seeds=1,
                    trust_pickle=trust_pickle,
                    precision=precision,
                )
                with progress.step(f"exporting {model} at r={r}, {precision}"):
                    path, manifest = export(options, Progress(quiet=True))
                cap = token_cap(manifest, trust_pickle, trust_source=True)  # the user named MODEL
                if cap is not None and r > cap:
                    raise UserError(f"--candidates value {r} is beyond this model's cap r ≤ {cap}")
                records = profile_bundle(
                    path, profile.name, runs, warmup, progress=progress, trust_pickle=trust_pickle, trust_source=True
                )
                store.add(records)
                points[(r, precision)] = {**_point(records[0]), "from": "measured now"}
    ordered = [points[key] for key in sorted(points)]
    best = choose(ordered, budget_ms, min_cosine)
    return {
        "model": model,
        "device": profile.name,
        "latency_budget_ms": budget_ms,
        "min_cosine": min_cosine,
        "met": best is not None,
        "choice": best,
        "fastest": min(ordered, key=lambda p: p["median_ms"]) if ordered else None,
        "points": ordered,
        "pruned": pruned,
    }
