"""Graph-level ToMe insertion: same results and decisions as the eager patcher."""

from __future__ import annotations

import copy
import json
import zipfile

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

import tome_export
from samples.plain_transformer import from_reference
from samples.reference_vit import VisionTransformer, vit_tiny_test
from tome_export import cli
from tome_export.errors import UserError
from tome_export.exporter.insert import insert_merges
from tome_export.exporter.load import load_model
from tome_export.exporter.repropagate import _view_groups
from tome_export.merging import merge_state
from tome_export.pipeline import ExportOptions, export


def run_both(eager: nn.Module, merged: nn.Module, x: torch.Tensor):
    """Outputs' max abs difference and per-layer decision equality."""
    with torch.no_grad():
        a = eager(x)
        eager_slots = [s.clone() for s in merge_state(eager).slots]
        b = merged(x)
        graph_slots = list(merge_state(merged).slots)
    assert len(eager_slots) == len(graph_slots)
    same = [bool(torch.equal(p, q)) for p, q in zip(eager_slots, graph_slots)]
    return float((a - b).abs().max()), same


def save_pt2(model: nn.Module, x: torch.Tensor, path) -> str:
    torch.export.save(torch.export.export(model, (x,)), str(path))
    return str(path)


def test_pt2_archive_matches_eager_patch(tmp_path):
    vit = vit_tiny_test(depth=3)
    x = torch.randn(2, 3, 64, 64)
    loaded = load_model(save_pt2(vit, x, tmp_path / "vit.pt2"))
    assert loaded.program is not None and loaded.default_input_shape == (2, 3, 64, 64)
    merged = insert_merges(loaded.program, (x,), schedule=[12, 8, 40])
    eager = tome_export.apply(copy.deepcopy(vit), schedule=[12, 8, 40])
    err, same = run_both(eager, merged, x)
    assert err <= 1e-5 and all(same) and len(same) == 3
    info, reference = merged.info(), merge_state(eager).info()
    for key in ("r_per_layer", "tokens_per_layer", "tokens_out", "protected_tokens"):
        assert info[key] == reference[key]
    assert info["r_per_layer"] == [12, 8, 22]  # the last r capped by the token count
    assert info["insertion"] == "graph" and len(info["attention_blocks"]) == 3
    # Shape metadata follows the merged token counts: fake propagation equals a real run.
    recorded = {n: tuple(n.meta["val"].shape) for n in merged.graph_module.graph.nodes if _is_tensor(n)}
    ShapeProp(merged.graph_module).propagate(x)
    real = {n: tuple(n.meta["tensor_meta"].shape) for n in recorded}
    assert recorded == real and {shape[1] for shape in real.values() if len(shape) == 3} >= {65, 53, 45, 23}


def _is_tensor(node) -> bool:
    return isinstance(node.meta.get("val"), torch.Tensor)


def test_sdpa_model_with_other_names_matches_eager_patch():
    vit = vit_tiny_test()
    plain = from_reference(vit)
    assert not any(hasattr(m, "qkv") for m in plain.modules())
    x = torch.randn(2, 3, 64, 64)
    merged = insert_merges(plain, (x,), r=10)
    eager = tome_export.apply(copy.deepcopy(vit), r=10)
    err, same = run_both(eager, merged, x)
    assert err <= 1e-5 and all(same) and len(same) == 4
    assert {b["kind"] for b in merged.info()["attention_blocks"]} == {"sdpa"}
    # Proportional attention matters: without it the outputs differ from the reference.
    no_prop = insert_merges(plain, (x,), r=10, prop_attn=False)
    with torch.no_grad():
        assert float((no_prop(x) - eager(x)).abs().max()) > 1e-4


def test_given_protected_tokens_match_eager():
    vit = vit_tiny_test(depth=2)
    x = torch.randn(1, 3, 64, 64)
    eager = copy.deepcopy(vit)
    eager.num_prefix_tokens = 5  # the eager patcher protects num_prefix_tokens
    tome_export.apply(eager, r=12)
    merged = insert_merges(vit, (x,), r=12, protected=5)
    err, same = run_both(eager, merged, x)
    assert err <= 1e-5 and all(same)
    assert merge_state(merged).slots[0][0, :5].tolist() == [0, 1, 2, 3, 4]


@settings(max_examples=6, deadline=None)
@given(
    shape=st.sampled_from([(16, 1), (16, 2), (32, 4)]),
    depth=st.integers(1, 3),
    grid=st.integers(2, 4),
    batch=st.integers(1, 2),
    r=st.integers(0, 12),
    prefix=st.sampled_from([(True, False), (False, False), (True, True)]),
    prop_attn=st.booleans(),
    sdpa=st.booleans(),
)
def test_graph_insertion_equals_eager_patch(shape, depth, grid, batch, r, prefix, prop_attn, sdpa):
    dim, heads = shape
    class_token, distilled = prefix
    torch.manual_seed(grid * 10 + depth)
    vit = VisionTransformer(
        img_size=4 * grid,
        patch_size=4,
        dim=dim,
        depth=depth,
        num_heads=heads,
        num_classes=3,
        class_token=class_token,
        distilled=distilled,
    ).eval()
    graph_model = from_reference(vit) if sdpa and not distilled else vit
    x = torch.randn(batch, 3, 4 * grid, 4 * grid)
    merged = insert_merges(graph_model, (x,), r=r, prop_attn=prop_attn)
    eager = tome_export.apply(copy.deepcopy(vit), r=r, prop_attn=prop_attn)
    err, same = run_both(eager, merged, x)
    assert err <= 1e-5 and all(same)
    assert merged.info()["protected_tokens"] == int(class_token) + int(distilled)
    assert merged.info()["r_per_layer"] == merge_state(eager).info()["r_per_layer"]


class TokenMixer(nn.Module):
    """Transformer-shaped but without attention: nothing to merge after."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 16)
        self.mix = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        return (h + self.mix(h).softmax(-1)).mean(1)


def test_no_attention_block_is_a_user_error(tmp_path, capsys):
    x = torch.randn(1, 10, 8)
    with pytest.raises(UserError, match="no attention blocks found"):
        insert_merges(TokenMixer(), (x,), r=2)
    archive = save_pt2(TokenMixer(), x, tmp_path / "mixer.pt2")
    out = tmp_path / "out"
    assert cli.run([archive, "--r", "2", "-o", str(out), "-q"]) == 2
    message = capsys.readouterr().err.strip()
    assert message.startswith("error: no attention blocks found") and "\n" not in message
    assert not out.exists()


class CausalBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.proj = nn.Linear(16, 48), nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).reshape(1, 12, 3, 2, 8).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return x + self.proj(y.transpose(1, 2).reshape(1, 12, 16))


def test_causal_attention_is_passed_over_with_a_reason():
    with pytest.raises(UserError, match="causal attention"):
        insert_merges(CausalBlock(), (torch.randn(1, 12, 16),), r=2)


class TokenLengthConstant(nn.Module):
    """Adds a (1, N, C) constant between blocks: it cannot follow merged tokens."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.vit = vit_tiny_test(depth=2)
        self.late_positions = nn.Parameter(torch.randn(1, 65, 64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        vit = self.vit
        h = torch.cat([vit.cls_token.expand(x.shape[0], -1, -1), vit.patch_embed(x).flatten(2).transpose(1, 2)], 1)
        h = vit.blocks[0](h + vit.pos_embed) + self.late_positions
        return vit.blocks[1](h)[:, 0]


def test_node_that_cannot_follow_the_merge_is_named():
    with pytest.raises(UserError, match=r"cannot adapt node add_\d+"):
        insert_merges(TokenLengthConstant(), (torch.randn(1, 3, 64, 64),), r=4)


def test_view_groups():
    assert _view_groups((2, 65, 192), (2, 65, 3, 4, 16)) == [([0], [0]), ([1], [1]), ([2], [2, 3, 4])]
    assert _view_groups((2, 65, 4, 16), (2, 65, 64)) == [([0], [0]), ([1], [1]), ([2, 3], [2])]
    assert _view_groups((130, 64), (2, 65, 64)) == [([0], [0, 1]), ([1], [2])]


def test_pt2_with_pickled_members_is_refused(tmp_path):
    vit = vit_tiny_test(depth=1)
    clean = save_pt2(vit, torch.randn(1, 3, 64, 64), tmp_path / "clean.pt2")
    tampered = tmp_path / "tampered.pt2"
    with zipfile.ZipFile(clean) as src, zipfile.ZipFile(tampered, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename.endswith("_weights_config.json"):
                config = json.loads(data)
                config["config"]["cls_token"]["use_pickle"] = True
                data = json.dumps(config).encode()
            dst.writestr(item, data)
    with pytest.raises(UserError, match="cls_token.*--trust-pickle"):
        load_model(str(tampered))
    with pytest.raises(UserError, match="exported for input shape 1,3,64,64"):
        export(ExportOptions(model=clean, r=4, input_shape="2,3,64,64", out=str(tmp_path / "o")))
    assert not (tmp_path / "o").exists()


def test_cli_pt2_export_verifies_on_onnxruntime(tmp_path, cli):
    vit = vit_tiny_test(img_size=32, dim=32, depth=2, num_heads=2)
    archive = save_pt2(vit, torch.randn(1, 3, 32, 32), tmp_path / "vit.pt2")
    out = tmp_path / "bundle"
    result = cli(archive, "--r", "4", "-o", str(out), "--seeds", "2", "--json")
    assert result.returncode == 0, result.stderr
    assert "inserted merges at graph level" in result.stderr
    manifest = json.loads(result.stdout)
    assert manifest["merge"]["insertion"] == "graph"
    assert manifest["merge"]["r_per_layer"] == [4, 4] and manifest["merge"]["protected_tokens"] == 1
    verification = manifest["verification"]
    assert verification["passed"] and verification["max_abs_err"] <= 1e-5
    assert verification["decision_agreement"] == [1.0, 1.0]
    assert (out / "model.onnx").is_file()


def test_pipeline_falls_back_to_graph_insertion_for_unknown_models(tmp_path):
    out, manifest = export(
        ExportOptions(
            model="samples.plain_transformer:plain_micro_test",
            r=4,
            input_shape="2,3,32,32",
            out=str(tmp_path / "plain"),
            seeds=1,
            protected=1,
        )
    )
    assert manifest["merge"]["insertion"] == "graph"
    assert manifest["merge"]["protected_rule"] == "given: 1 protected"
    assert [spec["name"] for spec in manifest["inputs"]] == ["pixels"]  # the model's own input name
    assert manifest["verification"]["passed"] and manifest["verification"]["max_abs_err"] <= 1e-5
    assert manifest["verification"]["decision_agreement"] == [1.0, 1.0]
    with pytest.raises(UserError, match="--protected applies to graph-level insertion"):
        export(ExportOptions(model="samples.reference_vit:vit_tiny_test", r=4, protected=1, out=str(tmp_path / "x")))


def test_dynamic_program_is_specialized_to_the_input_shape():
    vit = vit_tiny_test(depth=1)
    x = torch.randn(2, 3, 64, 64)
    program = torch.export.export(vit, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    merged = insert_merges(program, (x[:1],), r=8)
    err, same = run_both(tome_export.apply(copy.deepcopy(vit), r=8), merged, x[:1])
    assert err <= 1e-5 and all(same)
    with pytest.raises(UserError, match="already merges tokens"):
        insert_merges(torch.export.export(merged, (x[:1],)), (x[:1],), r=8)


@pytest.mark.parametrize("variant", ["matmul", "sdpa"])
def test_core_aten_programs_are_found_too(variant):
    """After run_decompositions a 4-D matmul is expand → view → bmm and SDPA is spelled out."""
    vit = vit_tiny_test(depth=2)
    x = torch.randn(1, 3, 64, 64)
    model = vit if variant == "matmul" else from_reference(vit)
    program = torch.export.export(model, (x,)).run_decompositions()
    merged = insert_merges(program, (x,), r=8)
    err, same = run_both(tome_export.apply(copy.deepcopy(vit), r=8), merged, x)
    assert err <= 1e-5 and all(same) and len(same) == 2


class TwoTowers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.left, self.right = vit_tiny_test(depth=1).blocks[0], vit_tiny_test(depth=1).blocks[0]

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.left(x).mean(1) + self.right(y).mean(1)


def test_blocks_off_one_residual_stream_are_refused():
    with pytest.raises(UserError, match="not on one residual stream"):
        insert_merges(TwoTowers(), (torch.randn(1, 9, 64), torch.randn(1, 9, 64)), r=2)
