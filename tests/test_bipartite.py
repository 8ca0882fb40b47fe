"""The eager reference merge: ToMe's rules, checked against brute force."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tome_export.merging import bipartite


@st.composite
def merge_case(draw):
    batch = draw(st.integers(1, 3))
    protected = draw(st.integers(0, 2))
    tokens = draw(st.integers(protected + 2, protected + 40))
    r = draw(st.integers(0, bipartite.max_r(tokens, protected)))
    channels = draw(st.integers(1, 8))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    metric = torch.randn(batch, tokens, 4, generator=g)
    x = torch.randn(batch, tokens, channels, generator=g)
    size = torch.randint(1, 4, (batch, tokens, 1), generator=g).float()
    return metric, x, size, r, protected


@settings(max_examples=60, deadline=None)
@given(merge_case())
def test_merge_matches_brute_force_weighted_mean(case):
    metric, x, size, r, protected = case
    merged_x, merged_size, slot = bipartite.merge_tokens(metric, x, size, r, protected)
    batch, tokens, channels = x.shape
    assert merged_x.shape == (batch, tokens - r, channels)
    assert slot.shape == (batch, tokens)
    # Brute force: each output slot is the size-weighted mean of the tokens mapped to it.
    for b in range(batch):
        for out in range(tokens - r):
            members = (slot[b] == out).nonzero().flatten()
            assert len(members) >= 1
            weights = size[b, members]
            expected = (x[b, members] * weights).sum(0) / weights.sum()
            torch.testing.assert_close(merged_x[b, out], expected, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(merged_size[b, out, 0], weights.sum())
    # Protected tokens stay in place, untouched.
    assert torch.equal(slot[:, :protected], torch.arange(protected).expand(batch, protected))
    torch.testing.assert_close(merged_x[:, :protected], x[:, :protected])
    # Exactly r tokens disappear: r slots hold two or more tokens' worth.
    assert torch.equal(merged_size.sum(dim=(1, 2)), size.sum(dim=(1, 2)))


@settings(max_examples=30, deadline=None)
@given(merge_case())
def test_merges_pick_most_similar_edges(case):
    metric, x, size, r, protected = case
    decision = bipartite.match(metric, r, protected)
    body = torch.nn.functional.normalize(metric[:, protected:], dim=-1)
    scores = body[:, 0::2] @ body[:, 1::2].transpose(-1, -2)
    best = scores.max(dim=-1).values
    for b in range(metric.shape[0]):
        merged = best[b, decision.src_idx[b]]
        kept = best[b, decision.unm_idx[b]]
        if len(merged) and len(kept):
            assert merged.min() >= kept.max()
        # each source merges into its best B match
        assert torch.equal(decision.dst_idx[b], scores[b, decision.src_idx[b]].argmax(-1))


def test_unmerge_restores_token_count_and_values():
    g = torch.Generator().manual_seed(0)
    metric, x = torch.randn(2, 21, 8, generator=g), torch.randn(2, 21, 5, generator=g)
    size = torch.ones(2, 21, 1)
    merged, _, slot = bipartite.merge_tokens(metric, x, size, 6, 1)
    restored = bipartite.unmerge(merged, slot)
    assert restored.shape == x.shape
    unmerged_tokens = torch.bincount(slot[0], minlength=15) == 1
    # tokens that merged with nobody come back exactly
    for t in range(21):
        if unmerged_tokens[slot[0, t]]:
            torch.testing.assert_close(restored[0, t], x[0, t])


def test_r_beyond_cap_is_refused():
    metric = torch.randn(1, 11, 4)
    try:
        bipartite.match(metric, 6, protected=1)
    except ValueError as exc:
        assert "r=6" in str(exc)
    else:
        raise AssertionError("r above (N - protected) // 2 must be refused")
