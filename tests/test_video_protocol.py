"""The TDTM block protocol (``merging/video_protocol.py``): who follows it, and clear refusals."""

from __future__ import annotations

import pytest
import torch

import tome_export
from samples.plain_transformer import plain_tiny_test
from samples.stdit import STDiTBlock, stdit_test
from tests.fixtures.video_blocks import GatedBlock, NarrowSpatialBlock, NoCrossBlock, VideoModel, gated_model
from tome_export.cli import run as cli_run
from tome_export.errors import UserError
from tome_export.merging.tdtm import forced
from tome_export.merging.video_protocol import TdtmBlock, find_tdtm_blocks, protocol_violations


def test_reference_stdit_block_follows_the_protocol():
    block = STDiTBlock(16, 2)
    assert isinstance(block, TdtmBlock)
    assert protocol_violations(block) == []
    assert len(find_tdtm_blocks(stdit_test())) == 2


def test_a_block_unlike_stdit_follows_it_and_r0_reproduces_the_unpatched_model():
    model = gated_model()
    x, t_mod, context = torch.randn(1, 4 * 3, 8), torch.randn(1, 8), torch.randn(1, 2, 8)
    with torch.no_grad():
        want = model(x, t_mod, context)
        tome_export.apply(model, method="tdtm", merge_steps=1)
        with forced(model, False):
            full = model(x, t_mod, context)
        with forced(model, True):
            merged = model(x, t_mod, context)
    assert all(type(b).__name__ == "TdtmGatedBlock" for b in model.blocks)
    torch.testing.assert_close(full, want)
    assert merged.shape == want.shape and not torch.allclose(merged, want)


def test_block_missing_members_is_refused_naming_class_and_members():
    model = VideoModel(NoCrossBlock)
    with pytest.raises(UserError) as info:
        tome_export.apply(model, method="tdtm", merge_steps=1)
    message = str(info.value)
    assert "NoCrossBlock" in message and "missing cross, feedforward" in message and "TdtmBlock" in message
    assert "\n" not in message
    assert all(type(b) is NoCrossBlock for b in model.blocks)  # nothing patched on refusal


def test_block_with_a_wrong_signature_is_refused():
    with pytest.raises(UserError, match=r"NarrowSpatialBlock .*spatial\(\) does not accept \(x, mods, num_frames\)"):
        tome_export.apply(VideoModel(NarrowSpatialBlock), method="tdtm", merge_steps=1)
    assert protocol_violations(GatedBlock(8)) == []
    assert protocol_violations(NarrowSpatialBlock(8)) == ["spatial() does not accept (x, mods, num_frames)"]


def test_model_without_video_blocks_names_the_protocol():
    with pytest.raises(UserError, match=r"no spatial-temporal blocks.*spatial\(x, mods, num_frames\).*TdtmBlock"):
        tome_export.apply(plain_tiny_test(), method="tdtm", merge_steps=1)


def test_cli_refuses_a_nonconforming_block_in_one_line(tmp_path, capsys):
    out = tmp_path / "b"
    code = cli_run(
        ["tests.fixtures.video_blocks:no_cross_model", "--method", "tdtm", "--merge-steps", "1", "-o", str(out)]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error:") and len(err.splitlines()) == 1
    assert "NoCrossBlock" in err and "missing cross, feedforward" in err
    assert not out.exists()
