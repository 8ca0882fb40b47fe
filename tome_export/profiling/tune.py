"""Pick the merge ratio (and precision) that meets a latency budget with the best fidelity, from measured points.

Owns ``tome-export tune``: parsing the budget, reusing points from the result store for the
same model, device, input shape and tool version, measuring the missing candidates (export +
:func:`tome_export.profiling.sweep.profile_bundle`) and choosing among them; candidates are
r × precision.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

from tome_export import __version__
from tome_export.errors import UserError
from tome_export.profiling.store import ResultStore
from tome_export.progress import Progress

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
) -> dict:
    """Use stored points for (model, device, input shape, this version); measure missing candidates.

    Candidates are every r × ``precisions`` (default fp32 only); ``min_cosine``: the least
    fidelity (cosine vs the unmerged fp32 model) a choice may have."""
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
    missing = [(r, p) for r in candidates for p in precisions if (r, p) not in points]
    if missing:
        with tempfile.TemporaryDirectory(prefix="tome-tune-") as tmp:
            for r, precision in missing:
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
    }
