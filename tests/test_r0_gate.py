"""The eager patcher's r=0 gate and one-line refusals for families ToMe cannot merge."""

from __future__ import annotations

import pytest
import torch

from tome_export.errors import UserError
from tome_export.merging import apply
from tome_export.merging.families import unmergeable_reason
from tome_export.merging.tome import UNSUPPORTED_ATTENTION, check_r0_equivalence, merge_state

timm = pytest.importorskip("timm")
from timm.models.vision_transformer import Block  # noqa: E402

from tests.fixtures import factories  # noqa: E402


class HalfResidualBlock(Block):
    """Looks like a timm block, but scales its attention branch: the patcher's own forward
    would silently drop that — exactly what the gate is for."""

    def forward(self, x, attn_mask=None, is_causal=False):
        x = x + 0.5 * self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


def _small_vit(**kwargs):
    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=8,
        embed_dim=32,
        depth=2,
        num_heads=2,
        **kwargs,
    ).eval()


def _inputs(seeds=2):
    return [(torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(s)),) for s in range(seeds)]


def test_gate_passes_for_a_block_the_patcher_reproduces():
    model = _small_vit()
    err = check_r0_equivalence(model, _inputs())
    assert err <= 1e-5
    assert merge_state(model) is None and type(model.blocks[0]) is Block  # left unpatched


def test_gate_refuses_a_block_it_does_not_reproduce_and_names_it():
    model = _small_vit(block_fn=HalfResidualBlock)
    with pytest.raises(UserError, match=r"HalfResidualBlock: the ToMe patcher at r=0 does not reproduce") as info:
        check_r0_equivalence(model, _inputs())
    assert "--r 0" in str(info.value) and "\n" not in str(info.value)
    assert merge_state(model) is None and type(model.blocks[0]) is HalfResidualBlock  # unpatched again


def test_eva02_with_qv_biases_is_not_claimed():
    model = factories.eva02_qv_bias()
    x = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        reference = model(x)
    with pytest.raises(UserError, match="EvaBlock: the ToMe patcher does not implement separate q/v biases"):
        apply(model, "tome", r=0)
    # Without the static claim check, the gate still refuses it (its rotary embeddings and
    # q/v biases would be dropped): the patched model would be a different model.
    saved = dict(UNSUPPORTED_ATTENTION)
    UNSUPPORTED_ATTENTION.clear()
    try:
        with pytest.raises(UserError, match="EvaBlock"):
            check_r0_equivalence(model, [(x,)])
    finally:
        UNSUPPORTED_ATTENTION.update(saved)
    with torch.no_grad():
        assert torch.equal(model(x), reference)  # the refused patch left nothing behind


def test_unmergeable_families_are_named():
    assert unmergeable_reason(factories.swin_small()).startswith(
        "SwinTransformerBlock: token merging does not support windowed"
    )
    assert "relative position bias" in unmergeable_reason(factories.beit_small())
    assert unmergeable_reason(_small_vit()) is None


@pytest.mark.parametrize(
    "factory, words",
    [
        ("swin_small", "SwinTransformerBlock: token merging does not support windowed attention"),
        ("beit_small", "token merging does not support relative position bias"),
        ("eva02_qv_bias", "EvaBlock: the ToMe patcher does not implement separate q/v biases"),
    ],
)
def test_cli_refuses_in_one_line(cli, tmp_path, factory, words):
    out = tmp_path / "bundle"
    done = cli(f"tests.fixtures.factories:{factory}", "--r", "4", "-o", str(out), "-q")
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and words in lines[0] and "--r 0" in lines[0], done.stderr
    assert "Traceback" not in done.stderr and "rejects input shape" not in done.stderr
    assert not out.exists()


def test_cli_beit_exports_unmerged_at_r0(cli, tmp_path):
    out = tmp_path / "bundle"
    done = cli("tests.fixtures.factories:beit_small", "--r", "0", "-o", str(out), "-q", "--seeds", "1")
    assert done.returncode == 0, done.stderr
    assert (out / "manifest.json").is_file()


def test_wrong_input_size_names_the_expected_one(cli, tmp_path):
    done = cli(
        "tests.fixtures.factories:swin_small", "--r", "0", "--input-shape", "1,3,64,64", "-o", str(tmp_path / "b")
    )
    assert done.returncode == 2
    assert "1,3,56,56" in done.stderr and "Traceback" not in done.stderr
