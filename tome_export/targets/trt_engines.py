"""``--target trt`` after the verified ONNX exists: check it with TensorRT's parser, build engines.

- ``check_graph``: the TensorRT for RTX ONNX parser's verdict when ``tensorrt_rtx`` is
  installed (the truth: a rejected node is exit 2 naming node and op); the hand-written
  rules (``graph_passes/trt_readiness.py``) where it is not. The report says which checked it.
- ``finish_trt_bundle`` (the trt target's finalize hook, run once every graph of the bundle
  exists: main graph, TDTM variants, dynamic-loading blocks): for RTX-class devices (and no
  device) one engine per graph with TensorRT for RTX, ahead of time, plus its layer report
  and Polygraphy scripts; for Jetson / data-centre profiles the standard-TensorRT scripts.
"""

from __future__ import annotations

import json
import os
import shlex
import tempfile
from pathlib import Path

import onnx

from tome_export.contract import BIPARTITE_OP_TYPE
from tome_export.errors import BackendMissing, UserError
from tome_export.targets import trt_rtx
from tome_export.targets.base import ExportContext
from tome_export.targets.common import save_onnx
from tome_export.targets.trt_scripts import export_precision, tensorrt_available, write_build_scripts

FIX_MERGE = "export with --lowering dense (plain TensorRT layers)"
HAND_CHECK = "hand-written readiness rules (graph_passes/trt_readiness.py)"
COMPARE_SCRIPT = "compare_engine.sh"
INSPECT_SCRIPT = "inspect_engine.sh"


def engine_flavour(ctx: ExportContext) -> str:
    """``rtx``: TensorRT for RTX engines built here; ``standard``: scripts for standard TensorRT."""
    device = ctx.device
    return "rtx" if device.get("tensorrt_flavour") == "rtx" or device.kind == "cpu" else "standard"


def require_engine_backend(ctx: ExportContext) -> None:
    """``--build-engine`` without the TensorRT an engine needs: exit 3 before any work."""
    if not getattr(ctx.options, "build_engine", False) or engine_flavour(ctx) != "rtx":
        return
    if not trt_rtx.rtx_available():
        raise BackendMissing(
            f"--build-engine needs TensorRT for RTX: {trt_rtx.INSTALL_HINT}; without --build-engine the "
            "verified ONNX graph and build scripts are still produced"
        )


def _plugin_registrar(plugin_nodes: int):
    if not plugin_nodes:
        return None
    from tome_export.targets import trt_rtx_plugin

    return trt_rtx_plugin.register if trt_rtx_plugin.can_register() else False


def _plugin_blocked() -> str:
    from tome_export.targets import trt_rtx_plugin

    return trt_rtx_plugin.blocked_reason() or "the merge plugin could not be registered"


def check_graph(
    ctx: ExportContext, model: onnx.ModelProto, plugin_nodes: int, trt_version: str, weights_dir: Path | None = None
) -> dict:
    """The parser's verdict (or the hand-written one); UserError (exit 2) naming the node if it fails.

    Runs as a graph pass, before the graph is saved into the bundle: the parser reads a
    temporary copy (outside the bundle, removed after) — or, for a graph whose weights are
    in an external file (``weights_dir``), a hidden copy beside that file, removed after."""
    from tome_export.graph_passes.trt_readiness import check_trt_readiness

    registrar = _plugin_registrar(plugin_nodes) if trt_rtx.rtx_available() else False
    if trt_rtx.rtx_available() and registrar is not False:
        with ctx.progress.step(f"parsing with {trt_rtx.parser_name()}"):
            if weights_dir is not None:
                path = weights_dir / ".trt-parse-check.onnx"
                save_onnx(model, path)
                try:
                    verdict = trt_rtx.parse_onnx(path, registrar)
                finally:
                    path.unlink()
            else:
                with tempfile.TemporaryDirectory(prefix="tome_export_parse_") as tmp:
                    save_onnx(model, Path(tmp) / "model.onnx")
                    verdict = trt_rtx.parse_onnx(Path(tmp) / "model.onnx", registrar)
        if not verdict.ok:
            op = verdict.errors[0]["op"]
            fix = FIX_MERGE if op.startswith("Scatter") or op == BIPARTITE_OP_TYPE else "rewrite that part of the model"
            raise UserError(f"{verdict.parser} rejects the graph: {verdict.first_error()}; {fix}")
        ctx.progress.say(f"{verdict.parser}: parsed, {verdict.layers} network layers")
        return {"checked_by": verdict.parser, "ready": True, "network_layers": verdict.layers}
    report = check_trt_readiness(model, trt_version, flavour=engine_flavour(ctx))
    ctx.progress.say(report.text())
    if not report.ready:
        raise UserError(f"the graph would not build with TensorRT {trt_version}:\n{report.text()}")
    why = "TensorRT for RTX is not installed" if not trt_rtx.rtx_available() else _plugin_blocked()
    return {"checked_by": HAND_CHECK, "why_not_parser": why, **report.to_dict()}


def bundle_graphs(manifest: dict) -> list[tuple[str, dict]]:
    """(ONNX artifact, the manifest entry to annotate) for every graph an engine is built from."""
    graphs = [(manifest["artifact"], manifest)] if manifest.get("artifact") else []
    variants = manifest.get("variants", {})
    for name, variant in variants.items():
        if name != "full" and variant.get("artifact"):
            graphs.append((variant["artifact"], variant))
    for section in [manifest.get("dynamic_loading"), *(v.get("dynamic_loading") for v in variants.values())]:
        for block in (section or {}).get("blocks", []):
            graphs.append((block["artifact"], block))
    return graphs


def finish_trt_bundle(ctx: ExportContext) -> None:
    """Engines (TensorRT for RTX) or standard-TensorRT scripts for every graph of the bundle."""
    info = ctx.manifest.setdefault("tensorrt", {})
    plugin_nodes = len(info.get("plugins", []))
    if engine_flavour(ctx) == "standard":
        info["scripts"] = write_build_scripts(ctx, ctx.manifest["artifact"], plugin_nodes)
        return _standard_engine(ctx, info, plugin_nodes)
    if not trt_rtx.rtx_available():
        info["scripts"] = write_build_scripts(ctx, ctx.manifest["artifact"], plugin_nodes)
        info["engine"] = None
        ctx.progress.say(
            f"note: TensorRT for RTX is not installed, so no engine was built; the bundle holds the verified ONNX "
            f"graph and build scripts. For engines: {trt_rtx.INSTALL_HINT} (exit status 0)"
        )
        return
    registrar = _plugin_registrar(plugin_nodes)
    if registrar is False:
        why = _plugin_blocked()
        if getattr(ctx.options, "build_engine", False):
            raise UserError(f"--build-engine with --lowering plugin: {why}; use --lowering dense")
        info["scripts"] = write_build_scripts(ctx, ctx.manifest["artifact"], plugin_nodes)
        info.update({"engine": None, "engine_blocked": why})
        ctx.progress.say(f"note: no engine for the plugin lowering: {why}; --lowering dense builds one (exit status 0)")
        return
    precision = export_precision(ctx)
    capabilities = list(ctx.device.get("compute_capabilities") or trt_rtx.DEFAULT_CAPABILITIES)
    for key in ("trtexec", "tensorrt_version_expected"):  # standard TensorRT's; this engine is built already
        info.pop(key, None)
    info.update({"flavour": trt_rtx.FLAVOUR, "version": trt_rtx.version(), "compute_capabilities": capabilities})
    engines = []
    for artifact, entry in bundle_graphs(ctx.manifest):
        engines.append(_build_one(ctx, artifact, entry, precision, capabilities, registrar))
    main = engines[0]
    info.update(
        {
            "engine": main["artifact"],
            "engines": engines,
            "precision": precision,
            "runtime_needs": _runtime_needs(plugin_nodes),
            "scripts": _write_polygraphy_scripts(ctx, main, precision),
        }
    )
    total = sum(e["build_seconds"] for e in engines)
    ctx.progress.say(
        f"{trt_rtx.FLAVOUR} {info['version']}: {len(engines)} engine(s) built ahead of time in {total:.1f} s "
        f"for {', '.join(capabilities)} ({main['artifact']}: {main['bytes'] / 2**20:.1f} MB, {precision}); "
        "running them needs an RTX-class GPU"
    )


def _build_one(ctx, artifact: str, entry: dict, precision: str, capabilities, registrar) -> dict:
    bundle = ctx.bundle_dir
    stem = artifact[: -len(".onnx")] if artifact.endswith(".onnx") else artifact
    source = artifact
    record: dict = {"onnx": artifact}
    if precision == "fp16" and _has_fp16(bundle / artifact):  # the precision pass converted (and verified) it
        kept = ctx.manifest.get("precision_detail", {}).get("fp32_nodes", [])
        record["fp16"] = {"converted_by": "precision pass (precision_detail)", "kept_fp32_nodes": len(kept)}
    elif precision == "fp16":
        source, record["fp16"] = _write_fp16(ctx, artifact, stem, entry is ctx.manifest)
    engine_name = f"{stem}.engine"
    with ctx.progress.step(f"building {engine_name} with {trt_rtx.FLAVOUR} ({precision}, no GPU needed)"):
        try:
            built = trt_rtx.build_engine(
                bundle / source, bundle / engine_name, capabilities, ctx.device.get("workspace_mb"), registrar
            )
        except trt_rtx.EngineBuildError as exc:
            raise UserError(f"{trt_rtx.FLAVOUR} could not build {source}: {exc}") from None
    layers_name = f"{stem}.layers.json"
    (bundle / layers_name).write_text(json.dumps({"engine": engine_name, "layers": built.layers}, indent=1) + "\n")
    from tome_export.bundle import sha256_file

    record.update(
        {
            "artifact": engine_name,
            "built_from": source,
            "sha256": sha256_file(bundle / engine_name),
            "bytes": built.bytes,
            "build_seconds": round(built.seconds, 2),
            "compute_capabilities": built.capabilities,
            "precision": precision,
            "network_layers": built.network_layers,
            "engine_layers": len(built.layers),
            "layer_precisions": trt_rtx.precision_summary(built.layers),
            "layers_file": layers_name,
        }
    )
    entry["engine"] = engine_name
    return record


def _has_fp16(path: Path) -> bool:
    model = onnx.load(str(path), load_external_data=False)
    return any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer) or any(
        n.op_type == "Cast" and any(a.name == "to" and a.i == onnx.TensorProto.FLOAT16 for a in n.attribute)
        for n in model.graph.node
    )


def _write_fp16(ctx, artifact: str, stem: str, compare: bool) -> tuple[str, dict]:
    """fp16 copy with the merge metric in fp32; the main graph is compared with fp32 on ORT."""
    from tome_export.graph_passes.fp16 import to_fp16

    fp32 = onnx.load(str(ctx.bundle_dir / artifact))
    half, summary = to_fp16(fp32)
    name = f"{stem}_fp16.onnx"
    save_onnx(half, ctx.bundle_dir / name)
    if compare:
        summary["against_fp32_onnxruntime"] = _compare_on_ort(ctx, fp32, ctx.bundle_dir / name)
    return name, summary


def _compare_on_ort(ctx, fp32: onnx.ModelProto, half_path: Path) -> dict:
    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    ref = ort.InferenceSession(fp32.SerializeToString(), options, providers=["CPUExecutionProvider"])
    got = ort.InferenceSession(str(half_path), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in ref.get_inputs()]
    worst, cosine = 0.0, 1.0
    for seed in range(ctx.options.seeds):
        feeds = {n: t.numpy() for n, t in zip(names, ctx.example_inputs(seed))}
        for a, b in zip(ref.run(None, feeds), got.run(None, feeds)):
            if a.dtype.kind != "f" or not a.size:
                continue
            a64, b64 = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
            worst = max(worst, float(np.abs(a64 - b64).max()))
            denom = float(np.linalg.norm(a64) * np.linalg.norm(b64)) or 1.0
            cosine = min(cosine, float(a64 @ b64) / denom)
    return {"max_abs_err": worst, "cosine": cosine, "seeds": ctx.options.seeds}


def _runtime_needs(plugin_nodes: int) -> str:
    base = "an RTX-class NVIDIA GPU (compute capability in compute_capabilities) and the TensorRT for RTX 1.7 runtime"
    if plugin_nodes:
        return base + "; the merge plugin: Python with tome_export's plugin registered (see docs/targets.md)"
    return base + "; nothing else (no plugins, no Python needed)"


def _write_polygraphy_scripts(ctx, main: dict, precision: str) -> list[str]:
    """Comparison of the shipped engine with ONNX Runtime, and layer inspection, run on the GPU."""
    tolerance = "1e-2" if precision == "fp16" else "1e-3"
    env = "export POLYGRAPHY_USE_TENSORRT_RTX=1  # Polygraphy drives TensorRT for RTX, not standard TensorRT"
    head = ["#!/bin/sh", "set -e", 'cd "$(dirname "$0")"', env]
    reference = shlex.join(
        ["polygraphy", "run", main["onnx"], "--onnxrt", "--save-inputs", "polygraphy_inputs.json",
         "--save-outputs", "polygraphy_onnxrt.json"]
    )
    engine = shlex.join(
        ["polygraphy", "run", main["artifact"], "--model-type", "engine", "--trt", "--load-inputs",
         "polygraphy_inputs.json", "--load-outputs", "polygraphy_onnxrt.json", "--atol", tolerance, "--rtol", tolerance]
    )
    compare = [*head, "# On an RTX-class GPU: the engine against ONNX Runtime CPU on the same random inputs.",
               reference, engine]
    inspect = [*head, "# On an RTX-class GPU: the engine's layers as specialised for it (JIT).",
               shlex.join(["polygraphy", "inspect", "model", main["artifact"], "--model-type", "engine",
                           "--show", "layers", "attrs"])]
    for name, lines in ((COMPARE_SCRIPT, compare), (INSPECT_SCRIPT, inspect)):
        path = ctx.bundle_dir / name
        path.write_text("\n".join(lines) + "\n")
        os.chmod(path, 0o755)
    return [COMPARE_SCRIPT, INSPECT_SCRIPT]


def _standard_engine(ctx, info: dict, plugin_nodes: int) -> None:
    """Jetson / data-centre: standard TensorRT builds the engine where it is installed, else the scripts."""
    on_device = bool(ctx.device.get("engine_built_on_device", False))
    info.setdefault("engine", None)
    if tensorrt_available() and not on_device:
        from tome_export.targets.trt_engine import build_engine as build

        with ctx.progress.step("building the TensorRT engine"):
            build(
                str(ctx.bundle_dir / ctx.manifest["artifact"]),
                str(ctx.bundle_dir / "model.plan"),
                fp16=export_precision(ctx) == "fp16",
                int8=export_precision(ctx) == "int8",
                workspace_mb=int(ctx.device.get("workspace_mb", 2048)),
                timing_cache=str(ctx.bundle_dir / "timing.cache"),
                merge_plugin=bool(plugin_nodes),
            )
        info["engine"] = "model.plan"
    elif on_device:
        ctx.progress.say(f"{ctx.device.name}: engines are built on the device — copy the bundle there, run build_engine.sh")
    else:
        ctx.progress.say(
            f"note: {ctx.device.name} needs standard TensorRT (TensorRT for RTX does not run on it); no engine was "
            "built here — the bundle holds the verified ONNX graph and build_engine.sh / build_engine.py (exit status 0)"
        )
