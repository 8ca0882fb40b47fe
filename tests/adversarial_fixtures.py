"""Bundles the adversarial suite attacks: each exported once per session, copied per case."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

TINY = "samples.reference_vit:vit_tiny_test"


def _export(out: Path, **options) -> Path:
    from tome_export.pipeline import ExportOptions, export

    export(ExportOptions(model=TINY, out=str(out), seeds=1, **options))
    return out


@pytest.fixture(scope="session")
def adv_tiny(tmp_path_factory) -> Path:
    """The reference ViT, r=4, batch 1 at 64×64: the smallest real bundle."""
    return _export(tmp_path_factory.mktemp("adv") / "tiny", r=4, input_shape="1,3,64,64")


@pytest.fixture(scope="session")
def adv_dynamic(tmp_path_factory) -> Path:
    """The same model split into blocks for dynamic loading."""
    return _export(
        tmp_path_factory.mktemp("adv") / "dynamic",
        r=4,
        input_shape="1,3,64,64",
        dynamic_loading=True,
        memory_budget="0.6MB",
    )


@pytest.fixture(scope="session")
def adv_plugin(tmp_path_factory) -> Path:
    """Plugin lowering: one tome_export.BipartiteMerge node per merge."""
    return _export(tmp_path_factory.mktemp("adv") / "plugin", r=4, input_shape="1,3,64,64", lowering="plugin")


@pytest.fixture
def copy_of(tmp_path):
    """``copy_of(bundle)`` → a fresh copy under this test's tmp_path."""

    def make(bundle: Path, name: str = "bundle") -> Path:
        return Path(shutil.copytree(bundle, tmp_path / name, symlinks=True))

    return make
