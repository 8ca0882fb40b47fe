"""Padded text batches merge exactly as each sentence alone, unpadded (graph-level insertion).

A batch of sentences of different lengths, padded to one length, must give every sentence
the same real-token outputs and the same merge decisions on its real tokens as that
sentence exported alone at its own length with the same r — in eager (the graph-inserted
model) and on ONNX Runtime. Random-weight BERT/MiniLM configs (``samples/hf_small.py``),
SDPA and eager attention; the real all-MiniLM-L6-v2 test lives in test_hf_models.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("transformers")

from samples import hf_small  # noqa: E402
from tome_export.exporter import graph_masks  # noqa: E402
from tome_export.exporter.insert import insert_merges  # noqa: E402
from tome_export.merging import schedule  # noqa: E402

DEPTH = 2  # hf_small text models have 2 layers


def padded_batch(lengths: list[int], total: int, side: str = "right", seed: int = 0):
    """(input_ids, attention_mask) int64 of random sentences padded to ``total`` (pad id 0)."""
    ids = torch.randint(1, 100, (len(lengths), total), generator=torch.Generator().manual_seed(seed))
    mask = torch.zeros(len(lengths), total, dtype=torch.int64)
    for row, n in enumerate(lengths):
        if side == "right":
            mask[row, :n] = 1
        else:
            mask[row, total - n :] = 1
    return ids * mask, mask


def merged_maps(slots: list[torch.Tensor], mask: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per merging layer: the merged token every input token is in, (B, N), and which merged
    tokens hold padding mixed with real tokens, (B, N').

    Follows the documented layout (graph_masks): before each merge real tokens move to the
    front, padded ones after, each kind in its order; the layer's slot map is in that order."""
    real = mask.bool()
    where = torch.arange(mask.shape[1]).expand_as(mask)
    maps, mixed = [], []
    for slot in slots:
        source = torch.sort((~real).long(), dim=1, stable=True).indices  # new position → old
        moved_to = torch.argsort(source, dim=1)  # old position → new
        where = slot.gather(1, moved_to.gather(1, where))
        moved_real = real.gather(1, source)
        empty = torch.zeros(slot.shape[0], int(slot.max()) + 1, dtype=torch.int64)
        has_real = empty.scatter_reduce(1, slot, moved_real.long(), "amax", include_self=False).bool()
        has_pad = empty.scatter_reduce(1, slot, (~moved_real).long(), "amax", include_self=False).bool()
        maps.append(where)
        mixed.append(has_real & has_pad)
        real = has_real
    return maps, mixed


def partition(labels: torch.Tensor) -> list[int]:
    """Which tokens share a merged token, as each token's first partner's index."""
    values = labels.tolist()
    return [values.index(v) for v in values]


def pooled(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask[..., None].float()
    return (hidden * weights).sum(1) / weights.sum(1)


def check_against_alone(model, lengths, total, r, side="right", protected=None, split=None, atol=1e-5):
    """Padded batch vs each sentence alone, eager graph insertion: outputs and decisions."""
    ids, mask = padded_batch(lengths, total, side, seed=sum(lengths) + r)
    batch = insert_merges(model, (ids, mask), r=r, protected=protected, split=split)
    with torch.no_grad():
        together = batch(ids, mask).last_hidden_state
    state = batch._tome_state
    assert state.r_per_layer == [r] * DEPTH
    maps, mixed = merged_maps(state.slots, mask)
    assert not any(m.any() for m in mixed), "a merged token mixes padding and real tokens"
    for row, n in enumerate(lengths):
        real = mask[row].bool()
        alone_ids = ids[row, real][None]
        alone = insert_merges(model, (alone_ids, torch.ones_like(alone_ids)), r=r, protected=protected, split=split)
        with torch.no_grad():
            want = alone(alone_ids, torch.ones_like(alone_ids)).last_hidden_state[0]
        assert alone._tome_state.r_per_layer == [r] * DEPTH  # the alone export merges r per layer too
        got = together[row, real]
        assert (got - want).abs().max().item() <= atol, f"sentence {row} ({n} tokens)"
        alone_maps, _ = merged_maps(alone._tome_state.slots, torch.ones_like(alone_ids))
        for layer, (padded_map, alone_map) in enumerate(zip(maps, alone_maps)):
            assert partition(padded_map[row, real]) == partition(alone_map[0]), f"layer {layer}, sentence {row}"
    return together, ids, mask


@pytest.mark.parametrize("family", ["bert", "minilm"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_padded_batch_is_each_sentence_alone(family, attn):
    model = getattr(hf_small, family)(attn)
    together, ids, mask = check_against_alone(model, [24, 11, 17], 24, r=3)
    with torch.no_grad():  # merging happened: the real tokens differ from the unmerged model
        unmerged = model(ids, mask).last_hidden_state
    assert (together - unmerged).abs().max().item() > 1e-3


@settings(max_examples=8, deadline=None)
@given(
    attn=st.sampled_from(["sdpa", "eager"]),
    r=st.integers(1, 4),
    prefix=st.sampled_from([(None, None), (1, "prefix"), (1, "official")]),
    data=st.data(),
)
def test_padded_batch_is_each_sentence_alone_property(attn, r, prefix, data):
    protected, split = prefix
    p = protected or 0
    shortest = 3 * r + p + 1  # enough real tokens for r merges in both layers
    lengths = data.draw(st.lists(st.integers(shortest, 30), min_size=1, max_size=3), label="lengths")
    extra = data.draw(st.integers(0, 12), label="padding")
    total = max(lengths) + extra  # ≤ 42 of the config's 64 positions
    plans = [schedule.plan([r] * DEPTH, n, p)[0] for n in lengths]
    assert all(plan == [r] * DEPTH for plan in plans)
    check_against_alone(hf_small.minilm(attn), lengths, total, r, protected=protected, split=split, atol=2e-5)


def test_left_padding_merges_as_alone_when_the_model_ignores_positions():
    """Left padding is handled by the merge (real tokens move to the front). HF BERT itself
    gives left-padded tokens other position ids; without position embeddings it is
    padding-side independent, and then the merged left-padded batch matches each sentence
    alone as well."""
    model = hf_small.minilm("sdpa")
    model.embeddings.position_embeddings.weight.data.zero_()
    check_against_alone(model, [20, 9, 14], 24, r=3, side="left")


def test_more_merges_than_real_tokens_go_to_the_padding():
    """r above a sentence's real A tokens: every real A token merges, padding absorbs the
    rest, and no merged token mixes padding with real tokens."""
    model = hf_small.minilm("eager")
    ids, mask = padded_batch([24, 7], 24, seed=4)
    graph = insert_merges(model, (ids, mask), r=5)
    with torch.no_grad():
        graph(ids, mask)
    maps, mixed = merged_maps(graph._tome_state.slots, mask)
    assert not any(m.any() for m in mixed)
    short_real = mask[1].bool()
    # 7 real tokens (A B A B A B A): 4 A tokens merge in layer 1, 2 of the 3 left in layer 2.
    assert len(set(maps[0][1, short_real].tolist())) == 3
    assert len(set(maps[1][1, short_real].tolist())) == 1


def test_all_real_mask_is_tome_without_mask():
    """An all-real mask changes nothing: the widened metric is a monotone map of ToMe's
    cosine, the move is the identity — same decisions and outputs as the model run with no
    mask at all (ToMe's own metric)."""

    class IdsOnly(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids):
            return self.model(input_ids=input_ids).last_hidden_state

    for attn in ("sdpa", "eager"):
        model = hf_small.minilm(attn)
        ids, mask = padded_batch([19, 19], 19, seed=8)
        masked = insert_merges(model, (ids, mask), r=4)
        plain = insert_merges(IdsOnly(model), (ids,), r=4)
        with torch.no_grad():
            got, want = masked(ids, mask).last_hidden_state, plain(ids)
        assert plain._tome_state.info().get("insertion") == "graph"
        for a, b in zip(masked._tome_state.slots, plain._tome_state.slots):
            assert torch.equal(a, b)
        assert (got - want).abs().max().item() <= 1e-6


def test_widened_metric_orders_real_before_padding():
    """The appended components (graph_masks): unit rows; real·real = (c + 1)/2 ≥ 0 >
    padded A · padded B = -α² > real · padded = -α/√2."""
    real = torch.tensor(graph_masks.REAL_EXTRA)
    pad_a, pad_b = torch.tensor(graph_masks.PAD_A_EXTRA), torch.tensor(graph_masks.PAD_B_EXTRA)
    alpha = graph_masks._PAD_KIND
    for row in (pad_a, pad_b):
        assert abs(row.norm().item() - 1) < 1e-6
    assert abs(graph_masks.REAL_SCALE**2 + real.norm().item() ** 2 - 1) < 1e-6
    assert abs(float(pad_a @ pad_b) + alpha**2) < 1e-6
    assert abs(float(pad_a @ real) + alpha / math.sqrt(2)) < 1e-6
    assert abs(float(pad_b @ real) + alpha / math.sqrt(2)) < 1e-6
    assert -alpha / math.sqrt(2) < -(alpha**2) < 0


@pytest.mark.parametrize("attn, lowering", [("sdpa", "scatter"), ("eager", "dense")])
def test_padded_batch_is_each_sentence_alone_on_onnxruntime(attn, lowering):
    from tome_export.exporter.onnx_export import export_onnx
    from tome_export.runtimes.onnxruntime import OnnxRuntimeRunner

    def run_onnx(graph, ids, mask):
        exported = export_onnx(graph, (ids, mask), lowering)
        feeds = dict(zip(exported.input_names, (ids.numpy(), mask.numpy())))
        out = OnnxRuntimeRunner(exported.with_decisions, spinning=False).run(feeds)
        slots = [torch.from_numpy(out[name]) for name in exported.decision_names]
        return torch.from_numpy(out["last_hidden_state"]), slots

    model = hf_small.minilm(attn)
    lengths, r = [20, 11], 3
    ids, mask = padded_batch(lengths, 20, seed=9)
    graph = insert_merges(model, (ids, mask), r=r)
    together, slots = run_onnx(graph, ids, mask)
    with torch.no_grad():
        eager = graph(ids, mask).last_hidden_state
    assert (together - eager).abs().max().item() <= 1e-5
    for got, want in zip(slots, graph._tome_state.slots):  # ORT decides as eager does
        assert torch.equal(got, want)
    maps, mixed = merged_maps(slots, mask)
    assert not any(m.any() for m in mixed)
    for row in range(len(lengths)):
        real = mask[row].bool()
        alone_ids = ids[row, real][None]
        alone_mask = torch.ones_like(alone_ids)
        alone, alone_slots = run_onnx(insert_merges(model, (alone_ids, alone_mask), r=r), alone_ids, alone_mask)
        assert (together[row, real] - alone[0]).abs().max().item() <= 1e-5
        cosine = torch.nn.functional.cosine_similarity(
            pooled(together[row : row + 1], mask[row : row + 1]), pooled(alone, alone_mask)
        )
        assert cosine.item() >= 1 - 1e-6
        alone_maps, _ = merged_maps(alone_slots, alone_mask)
        for padded_map, alone_map in zip(maps, alone_maps):
            assert partition(padded_map[row, real]) == partition(alone_map[0])
    assert np.isfinite(together.numpy()).all()
