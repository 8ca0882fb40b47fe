"""TDTM temporal merging, ONNX splitting and the dynamic-loading runtime (issue 5)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tome_export
from samples.stdit import stdit_single_frame, stdit_test, stdit_test_odd
from tome_export.cli import run as cli_run
from tome_export.errors import UserError
from tome_export.exporter.onnx_export import export_onnx
from tome_export.graph_passes.split import parse_bytes, split_model, write_blocks
from tome_export.merging.tdtm import (
    block_flops,
    denoising_step,
    forced,
    merge_frame_mask,
    merge_frames,
    merged_frames,
    unmerge_frames,
)
from tome_export.runtimes.dynamic import BlockFileError, DynamicRunner, block_session_options

# -- TDTM, eager ---------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(frames=st.integers(2, 9), spatial=st.integers(1, 5), dim=st.integers(1, 6), batch=st.integers(1, 2))
def test_merge_frames_averages_pairs_and_unmerge_repeats(frames, spatial, dim, batch):
    x = torch.randn(batch, frames * spatial, dim)
    merged = merge_frames(x, frames)
    assert merged.shape == (batch, merged_frames(frames) * spatial, dim)
    per_frame = x.reshape(batch, frames, spatial, dim)
    got = merged.reshape(batch, -1, spatial, dim)
    for i in range(frames // 2):
        torch.testing.assert_close(got[:, i], (per_frame[:, 2 * i] + per_frame[:, 2 * i + 1]) / 2)
    if frames % 2:  # the odd last frame passes through untouched
        assert torch.equal(got[:, -1], per_frame[:, -1])
    back = unmerge_frames(merged, frames).reshape(batch, frames, spatial, dim)
    for f in range(frames):
        assert torch.equal(back[:, f], got[:, min(f // 2, got.shape[1] - 1)])
    # Frames equal in pairs survive merge → unmerge exactly.
    paired = unmerge_frames(merge_frames(x, frames), frames)
    assert torch.equal(unmerge_frames(merge_frames(paired, frames), frames), paired)


def test_frame_mask_is_halved():
    mask = torch.tensor([[1.0, 0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 1.0, 1.0, 0.0]])
    assert merge_frame_mask(mask).tolist() == [[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]


def _inputs(model, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(batch, *s[1:]) for s in model.default_input_shapes]
    return [torch.randn(*s, generator=g) for s in shapes]


@pytest.mark.parametrize("factory, frames, merged", [(stdit_test, 4, 2), (stdit_test_odd, 5, 3)])
def test_tdtm_merges_attention_and_keeps_mlp_at_full_length(factory, frames, merged):
    model = factory().eval()
    inputs = _inputs(model)
    with torch.no_grad():
        reference = model(*inputs)
    tome_export.apply(model, method="tdtm", merge_steps=2, num_steps=10)
    seen = {}
    block = model.blocks[0]
    for name in ("attn_s", "attn_t", "cross_attn", "mlp"):
        getattr(block, name).register_forward_hook(lambda m, a, o, name=name: seen.__setitem__(name, a[0].shape))
    spatial, batch = model.spatial_tokens, inputs[0].shape[0]
    with torch.no_grad(), denoising_step(model, 0):
        early = model(*inputs)
    assert seen["attn_s"] == (batch * merged, spatial, model.dim)
    assert seen["attn_t"] == (batch * spatial, merged, model.dim)
    assert seen["cross_attn"][1] == merged * spatial
    assert seen["mlp"][1] == frames * spatial
    assert not torch.allclose(early, reference, atol=1e-3)  # merging changes the result
    with torch.no_grad(), denoising_step(model, 2):
        late = model(*inputs)
    assert torch.equal(late, reference)  # after merge_steps the block is the original one
    assert seen["mlp"][1] == frames * spatial and seen["attn_t"][1] == frames
    with torch.no_grad(), forced(model, True):
        assert torch.equal(model(*inputs), early)


def test_tdtm_with_frame_mask_ignores_masked_pairs():
    model = stdit_test().eval()
    tome_export.apply(model, method="tdtm", merge_steps=1)
    x, t, y = _inputs(model, batch=1)
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0]])  # the second merged frame is masked out entirely
    with torch.no_grad(), denoising_step(model, 0):
        out = model(x, t, y, mask)
        x2 = x.clone().reshape(1, 4, -1, x.shape[-1])
        x2[:, 2:] += 1.0  # changing masked frames must not change what unmasked frames see
        out2 = model(x2.reshape_as(x), t, y, mask)
    spatial = model.spatial_tokens
    # Temporal attention of frames 0–1 ignores frames 2–3; spatial/cross attention are per frame.
    torch.testing.assert_close(out[:, : 2 * spatial], out2[:, : 2 * spatial])
    assert not torch.allclose(out[:, 2 * spatial :], out2[:, 2 * spatial :])


def test_theoretical_ratio_is_between_one_and_two():
    flops = block_flops(num_frames=8, spatial=32, dim=1152, text_tokens=16)
    assert 1.0 < flops["ratio"] < 2.0


@pytest.mark.parametrize(
    "factory, options, needle",
    [
        (stdit_test, {"merge_steps": -1}, "≥ 0"),
        (stdit_test, {"merge_steps": 31, "num_steps": 30}, "≤ the number of denoising steps"),
        (stdit_single_frame, {"merge_steps": 2}, "T = 1"),
    ],
)
def test_tdtm_bad_options(factory, options, needle):
    with pytest.raises(UserError, match=needle):
        tome_export.apply(factory(), method="tdtm", **options)


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--merge-steps", "31", "--num-steps", "30"], "≤ the number of denoising steps"),
        (["--merge-steps", "-1"], "≥ 0"),
        ([], "needs --merge-steps"),
        (["--merge-steps", "2", "--dynamic-loading", "--memory-budget", "lots"], "malformed"),
        (["--merge-steps", "2", "--dynamic-loading"], "needs a memory budget"),
    ],
)
def test_cli_bad_tdtm_input_is_one_line_exit_2(tmp_path, capsys, args, needle):
    out = tmp_path / "b"
    code = cli_run(["samples.stdit:stdit_test", "--method", "tdtm", *args, "-o", str(out), "-q"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and needle in err and len(err.splitlines()) == 1 and err.startswith("error:")
    assert not out.exists()


def test_cli_single_frame_model_is_rejected(tmp_path, capsys):
    code = cli_run(
        ["samples.stdit:stdit_single_frame", "--method", "tdtm", "--merge-steps", "3", "-o", str(tmp_path / "b")]
    )
    assert code == 2 and "T = 1" in capsys.readouterr().err


def test_parse_bytes():
    assert parse_bytes("512MB") == 512 * 10**6 and parse_bytes("1.5GiB") == int(1.5 * 2**30)
    with pytest.raises(UserError):
        parse_bytes("-3MB")


# -- splitting and the dynamic runtime ----------------------------------------------------


@pytest.fixture(scope="module")
def vit_onnx() -> onnx.ModelProto:
    """Any exported model: the reference ViT with ToMe (merge op lowered to ScatterElements)."""
    from samples.reference_vit import vit_tiny_test

    model = tome_export.apply(vit_tiny_test().eval(), method="tome", r=4)
    return export_onnx(model, (torch.randn(1, 3, 64, 64),)).model


def _write_plan(model: onnx.ModelProto, budget: int, root: Path) -> tuple[list[dict], list[str]]:
    from tome_export.bundle import sha256_file

    plan = split_model(model, budget)
    entries = write_blocks(plan, root / "blocks", relative_to=root)
    for e in entries:
        e["sha256"] = {f: sha256_file(root / f) for f in (e["artifact"], e["weights"])}
    return entries, plan.outputs


def _weights(model: onnx.ModelProto) -> int:
    return sum(len(t.raw_data) for t in model.graph.initializer)


def test_split_vit_runs_identical_to_unsplit(vit_onnx, tmp_path):
    budget = int(_weights(vit_onnx) * 0.4)
    entries, outputs = _write_plan(vit_onnx, budget, tmp_path)
    assert len(entries) >= 3 and all(e["bytes"] <= budget for e in entries)
    feeds = {"x": np.random.default_rng(0).standard_normal((1, 3, 64, 64), dtype=np.float32)}
    expected = ort.InferenceSession(vit_onnx.SerializeToString(), block_session_options()).run(None, feeds)[0]
    manifest = {"dynamic_loading": {"blocks": entries, "outputs": outputs, "budget_bytes": budget}}
    for prefetch in (True, False):
        with DynamicRunner.from_manifest(tmp_path, manifest, prefetch=prefetch) as runner:
            for _ in range(2):
                got = runner.run(feeds)["output"]
                assert np.array_equal(got, expected)
                stats = runner.last_stats
                assert stats.peak_resident_block_bytes <= budget
                # RSS is sampled and other tests in this process may free memory meanwhile,
                # so only its presence is checked here; the benchmark measures it.
                assert stats.peak_rss_bytes > 0 and stats.baseline_rss_bytes > 0
                assert all(t.compute_s > 0 for t in stats.blocks)


def test_blocks_stay_resident_when_the_budget_allows(vit_onnx, tmp_path):
    total = _weights(vit_onnx)
    entries, outputs = _write_plan(vit_onnx, int(total * 0.5), tmp_path)
    roomy = {"dynamic_loading": {"blocks": entries, "outputs": outputs, "budget_bytes": 10 * total}}
    feeds = {"x": np.zeros((1, 3, 64, 64), np.float32)}
    with DynamicRunner.from_manifest(tmp_path, roomy) as runner:
        runner.run(feeds)
        assert all(t.loaded for t in runner.last_stats.blocks)
        runner.run(feeds)
        assert not any(t.loaded for t in runner.last_stats.blocks)  # all resident
    tight = {"dynamic_loading": {"blocks": entries, "outputs": outputs, "budget_bytes": int(total * 0.5)}}
    with DynamicRunner.from_manifest(tmp_path, tight) as runner:
        runner.run(feeds)
        runner.run(feeds)
        assert sum(t.loaded for t in runner.last_stats.blocks) >= len(entries) - 1  # had to reload


def test_budget_smaller_than_a_block_names_it(vit_onnx):
    with pytest.raises(UserError, match=r"smaller than block nodes \d+–\d+ .* of \d+\.\d [kM]B"):
        split_model(vit_onnx, 1000)


# -- the whole command ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tdtm_bundle(tmp_path_factory) -> Path:
    from tests.conftest import run_cli

    out = tmp_path_factory.mktemp("video") / "bundle"
    args = ["samples.stdit:stdit_test", "--method", "tdtm", "--merge-steps", "5", "--num-steps", "30"]
    done = run_cli(*args, "--dynamic-loading", "--memory-budget", "0.3MB", "--seeds", "1", "-o", str(out))
    assert done.returncode == 0, done.stderr
    return out


def test_cli_tdtm_bundle_has_both_variants_sharing_weights(tdtm_bundle):
    manifest = json.loads((tdtm_bundle / "manifest.json").read_text())
    variants = manifest["variants"]
    assert manifest["artifact"] == "model.onnx" and variants["full"]["artifact"] == "model.onnx"
    assert variants["merged"]["steps"] == [0, 5] and variants["full"]["steps"] == [5, 30]
    assert variants["merged"]["verification"]["passed"] and variants["full"]["verification"]["passed"]
    assert manifest["merge"]["frames"] == 4 and manifest["merge"]["frames_merged"] == 2
    shared = manifest["shared_weights"]
    assert shared["saved_bytes"] > 0.9 * shared["stored_bytes"]  # the weights are stored once
    for name in ("model.onnx", "model_merged.onnx"):
        graph = onnx.load(str(tdtm_bundle / name), load_external_data=False)
        locations = {e.value for t in graph.graph.initializer for e in t.external_data if e.key == "location"}
        assert locations == {"weights.bin"}
    # The two graphs really differ: the merged one runs attention on half the frames.
    feeds = {
        "x": np.ones((1, 32, 4), np.float32),
        "timestep": np.ones(1, np.float32),
        "text": np.ones((1, 4, 16), np.float32),
    }
    full = ort.InferenceSession(str(tdtm_bundle / "model.onnx")).run(None, feeds)[0]
    merged = ort.InferenceSession(str(tdtm_bundle / "model_merged.onnx")).run(None, feeds)[0]
    assert not np.allclose(full, merged, atol=1e-3)


@pytest.mark.parametrize("variant, artifact", [(None, "model.onnx"), ("merged", "model_merged.onnx")])
def test_cli_dynamic_blocks_match_unsplit(tdtm_bundle, variant, artifact):
    manifest = json.loads((tdtm_bundle / "manifest.json").read_text())
    section = manifest["dynamic_loading"] if variant is None else manifest["variants"][variant]["dynamic_loading"]
    assert len(section["blocks"]) >= 2 and section["verification"]["identical"]
    assert section["crossing_activations_at_cuts"] and set(section["crossing_activations_at_cuts"]) == {1}
    feeds = {
        n: np.random.default_rng(3).standard_normal(s, dtype=np.float32)
        for n, s in [("x", (1, 32, 4)), ("timestep", (1,)), ("text", (1, 4, 16))]
    }
    expected = ort.InferenceSession(str(tdtm_bundle / artifact), block_session_options()).run(None, feeds)[0]
    with DynamicRunner.from_manifest(tdtm_bundle, manifest, variant=variant) as runner:
        assert np.array_equal(runner.run(feeds)["output"], expected)


def test_runtime_load_picks_the_split_variant_per_step(tdtm_bundle):
    import tome_export.runtime

    manifest = json.loads((tdtm_bundle / "manifest.json").read_text())
    feeds = {
        n: np.random.default_rng(4).standard_normal(s, dtype=np.float32)
        for n, s in [("x", (1, 32, 4)), ("timestep", (1,)), ("text", (1, 4, 16))]
    }
    session = tome_export.runtime.load(tdtm_bundle)
    first, last = 0, manifest["variants"]["full"]["steps"][0]
    for step, artifact in ((first, "model_merged.onnx"), (last, "model.onnx")):
        expected = ort.InferenceSession(str(tdtm_bundle / artifact), block_session_options()).run(None, feeds)[0]
        assert np.array_equal(session.run(feeds, step=step)["output"], expected)


def test_missing_or_modified_block_file_is_a_clear_error(tdtm_bundle, tmp_path):
    import shutil

    copy = tmp_path / "b"
    shutil.copytree(tdtm_bundle, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    feeds = {
        "x": np.ones((1, 32, 4), np.float32),
        "timestep": np.ones(1, np.float32),
        "text": np.ones((1, 4, 16), np.float32),
    }
    last = manifest["dynamic_loading"]["blocks"][-1]
    weights = copy / last["weights"]
    data = bytearray(weights.read_bytes())
    data[100] ^= 0xFF
    weights.write_bytes(bytes(data))
    with DynamicRunner.from_manifest(copy, manifest) as runner:
        with pytest.raises(BlockFileError, match=f"{last['weights']} .* was modified"):
            runner.run(feeds)
    (copy / last["artifact"]).unlink()
    with DynamicRunner.from_manifest(copy, manifest) as runner:
        with pytest.raises(BlockFileError, match=f"{last['artifact']} is missing"):
            runner.run(feeds)


def test_cli_budget_below_largest_block_exit_2(tmp_path, capsys):
    out = tmp_path / "b"
    args = ["samples.stdit:stdit_test", "--method", "none", "--dynamic-loading", "--memory-budget", "1kB"]
    code = cli_run([*args, "--no-verify", "-o", str(out), "-q"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "smaller than block" in err and "model.blocks" in err and len(err.splitlines()) == 1
    assert not out.exists() and not list(tmp_path.iterdir())  # nothing half-written
