"""Measure a bundle: latency, throughput by batch size, memory, per-op breakdown, fidelity."""

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
from tome_export.bundle import verify_bundle
from tome_export.devices import DeviceProfile, get_device
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
    artifact: Path,
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
    table = node_attribution(onnx.load(str(artifact), load_external_data=False))
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


def fidelity(artifact: Path, manifest: dict, reference, providers: tuple[str, ...]) -> dict:
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


def load_reference(manifest: dict, trust_pickle: bool = False):
    """The unmerged source model recorded in the manifest, or None if it cannot be loaded here."""
    from tome_export.exporter.load import load_model

    source = manifest.get("source", {})
    try:
        return load_model(source["model"], source.get("weights"), trust_pickle).module.eval()
    except (UserError, KeyError):
        return None


def record_for(manifest: dict, device: DeviceProfile, measured: dict, batch: int) -> dict:
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
        **measured,
    }


def export_variant(
    manifest: dict,
    out: Path,
    progress: Progress,
    r: int | None = None,
    batch: int | None = None,
    trust_pickle: bool = False,
    precision: str | None = None,
) -> tuple[Path, dict]:
    """Re-export the bundle's source model with another r, batch size and/or precision (same target)."""
    from tome_export.pipeline import ExportOptions, export

    source = manifest.get("source", {})
    if "model" not in source:
        raise UserError("the bundle's manifest does not record its source model; re-export it with this tome-export")
    shapes = input_shape_of(manifest)
    if batch is not None:
        shapes = [[batch, *s[1:]] for s in shapes]
    merge = manifest.get("merge", {})
    method, schedule, constant_r = schedule_key(merge)
    options = ExportOptions(
        model=source["model"],
        target=manifest.get("target", "onnx"),
        method="tome" if (r is not None or method == "none") else method,
        input_shape=";".join(",".join(str(d) for d in s) for s in shapes),
        out=str(out),
        lowering=manifest.get("lowering"),
        device=manifest.get("device"),
        opset=manifest.get("opset", 18),
        seeds=1,
        weights=source.get("weights"),
        trust_pickle=trust_pickle,
        prop_attn=merge.get("prop_attn", True),
    )
    options.min_cosine = manifest.get("verification", {}).get("min_cosine")  # the bundle's tolerance, if set
    if precision is None or precision == manifest.get("precision"):
        # the bundle's precision (a re-export of an int8 bundle stays int8, same mode)
        options.precision = manifest.get("precision")
        options.int8_mode = manifest.get("precision_detail", {}).get("int8_mode")
    else:  # another precision: its default int8 mode
        options.precision = precision
    if r is not None:
        options.r = r
    elif method == "none":
        options.r = 0
    elif constant_r is not None:
        options.r = constant_r
    elif method == "tome":
        options.schedule = schedule.removeprefix("list:")
    quiet = Progress(quiet=True)
    with progress.step(
        f"re-exporting {source['model']} ({'r=' + str(r) if r is not None else schedule}, batch {batch or shapes[0][0]})"
    ):
        return export(options, quiet)


def token_cap(manifest: dict, trust_pickle: bool = False) -> int | None:
    """Largest constant r the bundle's model accepts (half its unprotected tokens)."""
    from tome_export.merging.bipartite import max_r

    merge = manifest.get("merge", {})
    if merge.get("tokens_per_layer"):
        return max_r(merge["tokens_per_layer"][0], merge.get("protected_tokens", 0))
    import torch

    from tome_export.merging import apply, merge_state

    model = load_reference(manifest, trust_pickle)
    if model is None:
        return None
    apply(model, "tome", r=1)
    with torch.no_grad():
        model(*[torch.zeros([d if isinstance(d, int) else 1 for d in s]) for s in input_shape_of(manifest)])
    state = merge_state(model)
    if state is None or not state.tokens_per_layer:
        return None
    return max_r(state.tokens_per_layer[0], state.protected)


def profile_bundle(
    bundle: str | Path,
    device_name: str | None = None,
    runs: int = 30,
    warmup: int = 5,
    batch_sizes: list[int] | None = None,
    sweep: list[int] | None = None,
    progress: Progress | None = None,
    trust_pickle: bool = False,
    with_fidelity: bool = True,
    precisions: list[str] | None = None,
) -> list[dict]:
    """Profile a bundle (and its re-exports for other batch sizes / sweep ratios / precisions): one record each."""
    progress = progress or Progress(quiet=True)
    bundle = Path(bundle)
    manifest = verify_bundle(bundle)
    device = get_device(device_name or manifest.get("device", "cpu"))
    if manifest.get("target", "onnx") != "onnx" or not manifest.get("artifact"):
        raise UserError(
            f"{bundle}: profiling measures single-artifact ONNX bundles here (target {manifest.get('target')!r}); "
            "TensorRT layer profiles are not wired in this version"
        )
    providers = tuple(device.providers) or ("CPUExecutionProvider",)
    if runs < 1 or warmup < 0:
        raise UserError("--runs must be ≥ 1 and --warmup ≥ 0")
    base_batch = input_shape_of(manifest)[0][0]
    static = isinstance(base_batch, int)
    batch_sizes = batch_sizes or [base_batch if static else 1]
    if any(b < 1 for b in batch_sizes):
        raise UserError(f"--batch-sizes must be positive integers, got {batch_sizes}")
    if sweep is not None:
        cap = token_cap(manifest, trust_pickle)
        bad = [r for r in sweep if r < 0 or (cap is not None and r > cap)]
        if bad:
            raise UserError(
                f"--sweep value(s) {bad} out of range: r must be in 0..{cap if cap is not None else '∞'} for this model"
            )
    reference = None
    if with_fidelity:
        with progress.step("loading the unmerged source model for fidelity"):
            reference = load_reference(manifest, trust_pickle)
        if reference is None:
            progress.say("fidelity skipped: the source model recorded in the manifest does not load here")
    records = []
    with tempfile.TemporaryDirectory(prefix="tome-profile-exports-") as tmp:
        configs = [(r, p, b) for r in (sweep or [None]) for p in (precisions or [None]) for b in batch_sizes]
        for index, (r, precision, batch) in enumerate(configs):
            same_r = r is None or schedule_key(manifest.get("merge", {}))[2] == r
            same_precision = precision is None or precision == manifest.get("precision")
            if same_r and same_precision and (not static or batch == base_batch):  # the bundle itself
                path, variant = bundle, manifest
            else:
                path, variant = export_variant(
                    manifest,
                    Path(tmp) / f"v{index}",
                    progress,
                    r=r,
                    batch=batch if static else None,
                    trust_pickle=trust_pickle,
                    precision=precision,
                )
            feeds = random_feeds(variant, 0, None if static else batch)
            at = f", {variant.get('precision', 'fp32')}" if precisions else ""
            label = f"{schedule_key(variant.get('merge', {}))[1]}{at}, batch {batch}"
            with progress.step(f"measuring {label} on {device.name} ({warmup} warm-up + {runs} runs)"):
                measured = measure_onnx(path / variant["artifact"], feeds, providers, runs, warmup, progress)
            if reference is not None:
                with progress.step(f"fidelity of {label} vs the unmerged model"):
                    measured["fidelity"] = fidelity(path / variant["artifact"], variant, reference, providers)
            else:
                measured["fidelity"] = None
            records.append(record_for(variant, device, measured, batch))
    return records
