"""Core ML with a tomesd or ToDo UNet: converts (tomesd merges as dense ops), or refuses in
one line — never a converter's traceback."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tome_export.errors import UserError
from tome_export.merging.tomesd_merge import max_ratio, merge_tokens, merge_tokens_dense, partition, tokens_merged
from tome_export.pipeline import ExportOptions, export


@settings(max_examples=25, deadline=None)
@given(
    h=st.integers(2, 9),
    w=st.integers(2, 9),
    sx=st.integers(1, 3),
    sy=st.integers(1, 3),
    fraction=st.floats(0.0, 1.0),
    ties=st.booleans(),
)
def test_dense_tomesd_merge_is_the_op(h, w, sx, sy, fraction, ties):
    if sx > w or sy > h:
        return
    r = tokens_merged(h * w, fraction * max_ratio(sx, sy), len(partition(h, w, sx, sy)[0]))
    generator = torch.Generator().manual_seed(h * 10 + w)
    metric = torch.randn(2, h * w, 4, generator=generator)
    if ties:  # repeated tokens: exact ties in the scores, broken lower index first by both
        metric = metric[:, torch.arange(h * w) % 3]
    x = torch.randn(2, h * w, 6, generator=generator)
    merged, slot = merge_tokens(metric, x, h, w, sx, sy, r)
    dense_merged, dense_slot = merge_tokens_dense(metric, x, h, w, sx, sy, r, -1)
    assert torch.equal(slot, dense_slot)
    torch.testing.assert_close(dense_merged, merged, atol=1e-5, rtol=1e-5)


pytest.importorskip("coremltools")
pytest.importorskip("diffusers")


def test_tomesd_unet_converts_to_coreml_without_scatter(tmp_path):
    _, manifest = export(
        ExportOptions(
            model="samples.tiny_unet:tiny_unet", method="tomesd", ratio=0.5, target="coreml", out=str(tmp_path / "b")
        )
    )
    assert manifest["verification"]["passed"] and manifest["verification"]["decision_agreement"] == [1.0] * 3
    model = manifest["coreml"]["models"][0]
    assert model["scatter_ops"] == 0


def test_a_conversion_failure_is_one_line(tmp_path, monkeypatch):
    from tome_export.targets import coreml

    def broken(*args, **kwargs):
        raise RuntimeError("No ONNX function found for tome_export::tomesd_merge\nand 80 more lines")

    monkeypatch.setattr(coreml, "convert_program", broken)
    out = tmp_path / "b"
    with pytest.raises(UserError) as info:
        export(ExportOptions(model="samples.tiny_unet:tiny_unet", method="tomesd", target="coreml", out=str(out)))
    assert "--target coreml refuses this model" in str(info.value) and "\n" not in str(info.value)
    assert not out.exists()
