"""A tiny exported bundle shared by the bundle and profiling tests (one export per session)."""

from __future__ import annotations

from pathlib import Path

import pytest

TINY = "samples.reference_vit:vit_tiny_test"


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> Path:
    from tome_export.pipeline import ExportOptions, export

    out = tmp_path_factory.mktemp("bundles") / "tiny-r8"
    export(ExportOptions(model=TINY, r=8, input_shape="2,3,64,64", out=str(out), seeds=1))
    return out
