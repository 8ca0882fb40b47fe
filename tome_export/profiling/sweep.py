"""Sweeps that re-export a bundle's source model: other merge ratios and batch sizes.

Owns :func:`profile_bundle` (the ``profile`` command's driver): it validates the request,
re-exports the bundle's recorded source model for every (r, batch) pair that differs from
the bundle itself (:func:`export_variant`), bounds the sweep by the model's token count
(:func:`token_cap`) and hands each variant to :mod:`tome_export.profiling.measure`.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from tome_export.bundle import read_verified, verify_bundle
from tome_export.devices import get_device
from tome_export.errors import UserError
from tome_export.profiling.measure import (
    fidelity,
    input_shape_of,
    load_reference,
    measure_onnx,
    random_feeds,
    record_for,
    schedule_key,
)
from tome_export.progress import Progress


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


def token_cap(manifest: dict, trust_pickle: bool = False, trust_source: bool = False) -> int | None:
    """Largest constant r the bundle's model accepts (half its unprotected tokens)."""
    from tome_export.merging.bipartite import max_r

    merge = manifest.get("merge", {})
    if merge.get("tokens_per_layer"):
        return max_r(merge["tokens_per_layer"][0], merge.get("protected_tokens", 0))
    import torch

    from tome_export.merging import apply, merge_state

    model = load_reference(manifest, trust_pickle, trust_source)
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
    trust_source: bool = False,
    source: str | None = None,
    precisions: list[str] | None = None,
) -> list[dict]:
    """Profile a bundle (and its re-exports for other batch sizes / sweep ratios / precisions): one record each.

    Re-exports and the fidelity reference load the source model the manifest names: only
    with ``trust_source`` (fidelity is skipped with a note otherwise), or ``source``: the
    MODEL the user names instead (then the manifest's is not used)."""
    progress = progress or Progress(quiet=True)
    bundle = Path(bundle)
    manifest = verify_bundle(bundle)
    if source is not None:
        manifest = {**manifest, "source": {**(manifest.get("source") or {}), "model": source, "weights": None}}
        trust_source = True
    device = get_device(device_name or manifest.get("device") or "cpu")
    if (manifest.get("target") or "onnx") != "onnx" or not manifest.get("artifact"):
        raise UserError(
            f"{bundle}: profiling measures single-artifact ONNX bundles here (target {manifest.get('target')!r}); "
            "TensorRT layer profiles are not wired in this version"
        )
    if manifest.get("variants") or manifest.get("dynamic_loading") or manifest.get("shared_weights"):
        raise UserError(
            f"{bundle} holds TDTM variants or dynamic-loading blocks; profile measures one graph as it runs, "
            "so it would mislabel them: time these bundles with bench/bench_video.py"
        )
    if (sweep is not None or batch_sizes or precisions) and not trust_source:
        source = (manifest.get("source") or {}).get("model")
        raise UserError(
            f"--sweep/--batch-sizes re-export the source model the manifest names ({str(source)[:80]!r}), which "
            "runs its code: pass --trust-source if you trust this bundle's author"
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
        cap = token_cap(manifest, trust_pickle, trust_source)
        bad = [r for r in sweep if r < 0 or (cap is not None and r > cap)]
        if bad:
            raise UserError(
                f"--sweep value(s) {bad} out of range: r must be in 0..{cap if cap is not None else '∞'} for this model"
            )
    reference = None
    if with_fidelity:
        with progress.step("loading the unmerged source model for fidelity"):
            reference = load_reference(manifest, trust_pickle, trust_source, progress)
        if reference is None and not trust_source:
            progress.say(
                "fidelity skipped: it re-loads the source model the manifest names, which runs its code "
                "(pass --trust-source if you trust this bundle)"
            )
        elif reference is None:
            progress.say("fidelity skipped: the source model recorded in the manifest does not load here")
    records = []
    with tempfile.TemporaryDirectory(prefix="tome-profile-exports-") as tmp:
        configs = [(r, p, b) for r in (sweep or [None]) for p in (precisions or [None]) for b in batch_sizes]
        for index, (r, precision, batch) in enumerate(configs):
            same_r = r is None or schedule_key(manifest.get("merge", {}))[2] == r
            same_precision = precision is None or precision == manifest.get("precision")
            if same_r and same_precision and (not static or batch == base_batch):  # the bundle itself: no re-export
                # Measured from the verified bytes: the file can't change between check and use.
                path, variant = read_verified(bundle, manifest, manifest["artifact"]), manifest
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
                artifact = path if isinstance(path, bytes) else path / variant["artifact"]
                measured = measure_onnx(artifact, feeds, providers, runs, warmup, progress)
            if reference is not None:
                with progress.step(f"fidelity of {label} vs the unmerged model"):
                    measured["fidelity"] = fidelity(artifact, variant, reference, providers)
            else:
                measured["fidelity"] = None
            records.append(record_for(variant, device, measured, batch))
    return records
