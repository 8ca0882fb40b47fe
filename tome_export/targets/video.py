"""Bundle steps for video diffusion models: TDTM variants and dynamic loading (ONNX and TensorRT targets).

- ``build_tdtm_variants`` (the builder of methods whose record asks for variants): one
  export command writes the merged graph (used in the first ``merge_steps`` denoising
  steps) and the full graph (``model.onnx``, the later steps), each through the one
  export path (``export_path.build_single``) in its mode, both referencing one
  ``weights.bin``.
- ``add_dynamic_loading``: splits every graph of the bundle into blocks for a memory budget
  (``blocks/``), checks the block-by-block run against the unsplit graph and records block
  order, files, sha256 and sizes in the manifest.
"""

from __future__ import annotations

import numpy as np
import onnx

from tome_export.bundle import sha256_file
from tome_export.errors import UserError, VerificationError
from tome_export.graph_passes.external_data import save_sharing_weights
from tome_export.graph_passes.split import format_bytes, parse_bytes, split_model, write_blocks
from tome_export.targets.base import ExportContext, Target
from tome_export.targets.common import weight_bytes
from tome_export.targets.export_path import MAIN_ARTIFACT, build_single

MERGED_ARTIFACT = "model_merged.onnx"
SHARED_WEIGHTS = "weights.bin"
BLOCKS_DIR = "blocks"
_VARIANT_FIELDS = ("artifact", "inputs", "outputs", "rewrites", "verification")


def resolve_budget(dynamic_loading: bool, memory_budget: str | None, device_budget_bytes: int | None) -> int | None:
    """Budget in bytes when dynamic loading is on (``--memory-budget`` or the device profile's)."""
    if not dynamic_loading:
        if memory_budget is not None:
            raise UserError("--memory-budget applies with --dynamic-loading; add --dynamic-loading")
        return None
    if memory_budget is not None:
        return parse_bytes(memory_budget)
    if device_budget_bytes:
        return int(device_budget_bytes)
    raise UserError("--dynamic-loading needs a memory budget: pass --memory-budget like 512MB")


def check_budget_fits(model, budget_bytes: int) -> None:
    """Fail before exporting when one block of the model's block stack alone exceeds the budget.

    The block stack is the module list holding the most parameters (``blocks``); the split
    pass checks the exported graph again, exactly.
    """
    from torch import nn

    stacks = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.ModuleList, nn.Sequential)) and len(m) > 1]
    if not stacks:
        return
    # At the exported dtype, as the split pass counts the graph's initializers.
    name, stack = max(stacks, key=lambda item: weight_bytes(item[1]))
    index, block = max(enumerate(stack), key=lambda item: weight_bytes(item[1]))
    if weight_bytes(block) > budget_bytes:
        raise UserError(
            f"memory budget {format_bytes(budget_bytes)} is smaller than block model.{name}.{index} "
            f"of {format_bytes(weight_bytes(block))}; raise --memory-budget to at least that"
        )


def build_tdtm_variants(ctx: ExportContext, target: Target) -> None:
    """Export, verify and save the merged and the full variant sharing one weights file."""
    from tome_export.merging.tdtm import forced, tdtm_state

    state = tdtm_state(ctx.model)
    exported = {}
    variants = {}
    if state.merge_steps > 0:
        with forced(ctx.model, True):
            exported[MERGED_ARTIFACT] = build_single(ctx, target, MERGED_ARTIFACT, external_data=False).model
        variants["merged"] = {k: ctx.manifest.pop(k) for k in _VARIANT_FIELDS if k in ctx.manifest}
        variants["merged"]["steps"] = [0, state.merge_steps]
    with forced(ctx.model, False):
        exported[MAIN_ARTIFACT] = build_single(ctx, target, MAIN_ARTIFACT, external_data=False).model
    variants["full"] = {"artifact": MAIN_ARTIFACT, "steps": [state.merge_steps, state.num_steps]}
    if "verification" in ctx.manifest:
        variants["full"]["verification"] = ctx.manifest["verification"]
    shared = save_sharing_weights(
        {ctx.bundle_dir / name: model for name, model in exported.items()}, ctx.bundle_dir / SHARED_WEIGHTS
    )
    ctx.manifest["variants"] = variants
    ctx.manifest["shared_weights"] = shared
    ctx.manifest["step_rule"] = (
        "use variants[v].artifact for denoising steps in [steps[0], steps[1]) (null: to the end)"
    )
    ctx.progress.say(
        f"TDTM: merged graph for steps [0, {state.merge_steps}), full graph after; "
        f"{format_bytes(shared['stored_bytes'])} of weights stored once for both"
    )


def add_dynamic_loading(ctx: ExportContext, budget_bytes: int) -> None:
    """Split each graph of the bundle into blocks within ``budget_bytes``; verify; manifest."""
    from tome_export.runtimes.dynamic import DynamicRunner

    bundle = ctx.bundle_dir
    if not (bundle / MAIN_ARTIFACT).is_file():
        raise UserError(f"--dynamic-loading splits {MAIN_ARTIFACT}, which target {ctx.options.target!r} did not write")
    variants = ctx.manifest.get("variants", {})
    # The main graph first, so block weight files are named after it; the merged variant's
    # blocks point into the same files (equal tensors are stored once).
    graphs = [(None, MAIN_ARTIFACT, "")]
    if "merged" in variants:
        graphs.append(("merged", variants["merged"]["artifact"], "merged_"))
    weight_files: dict = {}
    sections = {}
    for variant, artifact, prefix in graphs:
        model = onnx.load(str(bundle / artifact))
        with ctx.progress.step(f"splitting {artifact} into blocks for a {format_bytes(budget_bytes)} budget"):
            plan = split_model(model, budget_bytes)
            entries = write_blocks(plan, bundle / BLOCKS_DIR, prefix, weight_files, relative_to=bundle)
        sections[variant] = (artifact, plan, entries)
        del model  # weights of an SD-size graph: GBs
    for _, _, entries in sections.values():
        for entry in entries:
            entry["sha256"] = {f: sha256_file(bundle / f) for f in (entry["artifact"], entry["weights"])}
    for variant, (artifact, plan, entries) in sections.items():
        section = {
            "budget_bytes": budget_bytes,
            "inputs": plan.inputs,
            "outputs": plan.outputs,
            "blocks": entries,
            "crossing_activations_at_cuts": plan.crossing_at_cuts,
        }
        if ctx.options.verify:
            with ctx.progress.step(f"checking {len(entries)} blocks against the unsplit graph"):
                runner = DynamicRunner.from_manifest(bundle, {"dynamic_loading": section})
                section["verification"] = _compare_with_unsplit(ctx, bundle / artifact, runner)
                runner.close()
            if not section["verification"]["identical"] and section["verification"]["max_abs_err"] > (
                1e-4 if ctx.options.atol is None else ctx.options.atol
            ):
                raise VerificationError(
                    f"block-by-block run differs from {MAIN_ARTIFACT} by {section['verification']['max_abs_err']:.3g}"
                )
        if variant is None:
            ctx.manifest["dynamic_loading"] = section
        else:
            variants[variant]["dynamic_loading"] = section
        sizes = ", ".join(format_bytes(e["bytes"]) for e in entries)
        ctx.progress.say(
            f"dynamic loading{'' if variant is None else f' ({variant})'}: {len(entries)} blocks ({sizes})"
        )


def _compare_with_unsplit(ctx: ExportContext, graph_path, runner) -> dict:
    import onnxruntime as ort

    from tome_export.runtimes.dynamic import block_session_options

    # From the file: a graph with external weights (over 2 GB) has no single-proto form.
    unsplit = ort.InferenceSession(str(graph_path), block_session_options())
    names = [i.name for i in unsplit.get_inputs()]
    worst, identical = 0.0, True
    for seed in range(ctx.options.seeds):
        feeds = {n: t.numpy() for n, t in zip(names, ctx.example_inputs(seed))}
        expected = dict(zip([o.name for o in unsplit.get_outputs()], unsplit.run(None, feeds)))
        got = runner.run(feeds)
        for name, value in expected.items():
            identical &= bool(np.array_equal(value, got[name]))
            worst = max(worst, float(np.abs(value.astype(np.float64) - got[name]).max()) if value.size else 0.0)
    stats = runner.last_stats
    return {
        "against": "unsplit graph on ONNX Runtime, same session options",
        "seeds": ctx.options.seeds,
        "identical": identical,
        "max_abs_err": worst,
        "peak_rss_over_baseline_bytes": stats.peak_rss_over_baseline if stats else None,
    }
