"""Measuring one exported bundle as it is: latency, memory, per-op breakdown and fidelity.

Owns everything that reads a bundle without re-exporting it: random inputs in the
manifest's shapes, the timed runs, ONNX Runtime's profiler breakdown (merge ops' share),
fidelity against the unmerged eager model, and turning one measurement into a result
record (:func:`record_for`, with the cost model's predicted speed-up). Re-exporting for other ratios or batch sizes is
:mod:`tome_export.profiling.sweep`'s job.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

from tome_export import __version__
from tome_export.cost_model import predicted_for
from tome_export.devices import DeviceProfile
from tome_export.errors import UserError
from tome_export.profiling.breakdown import breakdown, node_attribution
from tome_export.profiling.stats import latency_stats
from tome_export.progress import Progress

PROFILED_RUNS = 10  # runs under ONNX Runtime's profiler (it slows each node a little)
FIDELITY_SEEDS = range(8)  # batches of random inputs compared with the unmerged model


def schedule_key(merge: dict) -> tuple[str, str, int | None]:
    """(method, schedule as text, constant r or None) from a manifest's ``merge`` entry."""
    method = merge.get("method", "none")
    if method == "none":
        return "none", "r=0", 0
    schedule = merge.get("schedule") or {}
    kind = schedule.get("kind")
    if kind == "constant":
        return method, f"r={schedule['r']}", int(schedule["r"])
    if kind == "list":
        return method, "list:" + ",".join(str(v) for v in schedule["r"]), None
    if kind == "linear":
        return method, f"linear:{schedule['r']}:{schedule['inflection']}", None
    return method, json.dumps(schedule, sort_keys=True), None


def input_shape_of(manifest: dict) -> list[list[int | str]]:
    """Every input's shape as the manifest records it (symbolic dims stay strings)."""
    return [list(spec["shape"]) for spec in manifest.get("inputs", [])]


def random_feeds(manifest: dict, seed: int = 0, batch: int | None = None) -> dict[str, np.ndarray]:
    """Random normal inputs in the manifest's shapes (a symbolic batch dim takes ``batch``)."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in manifest["inputs"]:
        shape = [d if isinstance(d, int) else (batch or 1) for d in spec["shape"]]
        if batch is not None:
            shape[0] = batch
        dtype = np.dtype(spec.get("dtype", "float32"))
        feeds[spec["name"]] = (
            rng.standard_normal(shape).astype(dtype) if dtype.kind == "f" else np.zeros(shape, dtype=dtype)
        )
    return feeds


def _rss_bytes() -> int | None:
    try:
        import psutil
    except ImportError:
        return None
    return psutil.Process().memory_info().rss


def _runtime_version() -> str:
    import onnxruntime

    return f"onnxruntime {onnxruntime.__version__}"


def time_runs(run, feeds, runs: int, warmup: int, progress: Progress) -> list[float]:
    """Seconds per call of ``run(feeds)`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        run(feeds)
    times = []
    tick_every = max(1, runs // 10)
    for i in range(runs):
        start = time.perf_counter()
        run(feeds)
        times.append(time.perf_counter() - start)
        if i % tick_every == 0:
            progress.tick()
    return times


def measure_onnx(
    artifact: Path | bytes,
    feeds: dict[str, np.ndarray],
    providers: tuple[str, ...],
    runs: int,
    warmup: int,
    progress: Progress,
) -> dict:
    """Latency on a plain session, then a breakdown on a profiling session."""
    import onnx

    from tome_export.runtimes.onnxruntime import OnnxRuntimeRunner

    rss_before = _rss_bytes()
    runner = OnnxRuntimeRunner(artifact, providers=providers)
    times = time_runs(runner.run, feeds, runs, warmup, progress)
    rss_after = _rss_bytes()
    with tempfile.TemporaryDirectory(prefix="tome-profile-") as tmp:
        profiled = OnnxRuntimeRunner(artifact, providers=providers, profile_prefix=str(Path(tmp) / "ort"))
        for _ in range(2):
            profiled.run(feeds)  # warm-up inside the profile; dropped below by run index
        for _ in range(PROFILED_RUNS):
            profiled.run(feeds)
        events = json.loads(Path(profiled.end_profiling()).read_text())
    runs_seen = sorted(e["ts"] for e in events if e.get("name") == "model_run")
    first_kept = runs_seen[2] if len(runs_seen) > 2 else 0
    events = [e for e in events if e.get("ts", 0) >= first_kept]
    graph = (
        onnx.load_from_string(artifact)
        if isinstance(artifact, bytes)
        else onnx.load(str(artifact), load_external_data=False)
    )
    table = node_attribution(graph)
    arena_peak = max(
        (int(e["args"]["mem_in_use_peak"]) for e in events if "mem_in_use_peak" in e.get("args", {})), default=None
    )
    return {
        "latency_ms": latency_stats(times),
        "memory": {
            "rss_increase_mb": (rss_after - rss_before) / 2**20 if rss_before is not None else None,
            "arena_peak_mb": arena_peak / 2**20 if arena_peak is not None else None,
        },
        "breakdown": breakdown(events, table),
    }


def fidelity(artifact: Path | bytes, manifest: dict, reference, providers: tuple[str, ...]) -> dict:
    """Cosine and top-1 agreement of the bundle's first output with the unmerged eager model."""
    import torch

    from tome_export.runtimes.onnxruntime import OnnxRuntimeRunner
    from tome_export.verify import cosine

    runner = OnnxRuntimeRunner(artifact, providers=providers)
    cosines, agree, total = [], 0, 0
    for seed in FIDELITY_SEEDS:
        feeds = random_feeds(manifest, seed)
        got = runner.run(feeds)[manifest["outputs"][0]["name"]]
        with torch.no_grad():
            ref = reference(*[torch.from_numpy(v) for v in feeds.values()])
        ref = (ref[0] if isinstance(ref, (tuple, list)) else ref).numpy()
        cosines.append(cosine(got, ref))
        if got.ndim >= 2:
            agree += int((got.argmax(-1) == ref.argmax(-1)).sum())
            total += got.argmax(-1).size
    return {
        "reference": "unmerged eager PyTorch",
        "samples": total,
        "cosine": float(np.mean(cosines)),
        "cosine_min": float(np.min(cosines)),
        "top1_agreement": agree / total if total else None,
    }


def load_reference(manifest: dict, trust_pickle: bool = False, trust_source: bool = False, progress=None):
    """The unmerged source model recorded in the manifest, or None if it cannot be loaded here.

    The manifest is untrusted: re-loading its source imports code it names, so this needs
    ``trust_source`` (``--trust-source``) and says what it imports."""
    from tome_export.exporter.load import load_model

    source = manifest.get("source") or {}
    if not trust_source or not isinstance(source.get("model"), str):
        return None
    weights = source.get("weights") if isinstance(source.get("weights"), str) else None
    if progress is not None:
        progress.say(f"--trust-source: loading {source['model']!r} (named by the bundle's manifest), running its code")
    try:
        return load_model(source["model"], weights, trust_pickle).module.eval()
    except UserError:
        return None


def record_for(manifest: dict, device: DeviceProfile, measured: dict, batch: int) -> dict:
    """One result-store record: what was measured, on which device, with which tool versions."""
    method, schedule, r = schedule_key(manifest.get("merge", {}))
    latency = measured["latency_ms"]
    return {
        "id": uuid.uuid4().hex,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device.name,
        "model": manifest.get("source", {}).get("model", "?"),
        "method": method,
        "schedule": schedule,
        "r": r,
        "r_per_layer": manifest.get("merge", {}).get("r_per_layer", []),
        "target": manifest.get("target", "onnx"),
        "tool_version": f"tome-export {__version__}",
        "runtime": _runtime_version(),
        "lowering": manifest.get("lowering"),
        "precision": manifest.get("precision"),
        "input_shape": input_shape_of(manifest),
        "batch_size": batch,
        "host": f"{platform.system()} {platform.machine()} {os.cpu_count()} cpus",
        "source": "measured",
        "throughput_per_s": batch / (latency["median"] / 1e3),
        # the cost model's speed-up vs r=0, shown next to the measured one (None: not calibrated here)
        "predicted": predicted_for(manifest, device.name),
        **measured,
    }
