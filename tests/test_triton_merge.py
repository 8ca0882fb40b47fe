"""The fused Triton merge kernel against merge_tokens, on CPU with Triton's interpreter.

TRITON_INTERPRET=1 must be set before triton is imported, so the comparison runs in a
fresh subprocess (another test may already have imported triton in this process)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import REPO

pytest.importorskip("triton")

SCRIPT = textwrap.dedent(
    """
    import os
    assert os.environ["TRITON_INTERPRET"] == "1"
    import random
    import torch
    from tome_export.merging.bipartite import max_r, merge_tokens
    from tome_export.kernels.triton_merge import merge_tokens_triton

    cases = [(2, 17, 8, 5, 4, 1), (1, 10, 4, 3, 5, 0), (3, 33, 6, 7, 0, 2), (2, 77, 40, 37, 30, 1)]
    rng = random.Random(0)
    for _ in range(6):  # random shapes and ratios, protected tokens included
        p = rng.randint(0, 2)
        n = rng.randint(p + 2, 70)
        cases.append((rng.randint(1, 3), n, rng.randint(1, 40), rng.randint(1, 40), rng.randint(0, max_r(n, p)), p))
    for i, (b, n, d, c, r, p) in enumerate(cases):
        g = torch.Generator().manual_seed(i)
        metric = torch.randn(b, n, d, generator=g)
        # No duplicated tokens here: BLAS rounds identical rows of the reference matmul
        # differently, so "ties" are not ties there (tie-breaks: tests/test_dense_merge.py).
        x = torch.randn(b, n, c, generator=g)
        size = torch.rand(b, n, 1, generator=g) + 0.5
        ref = merge_tokens(metric, x, size, r, p)
        got = merge_tokens_triton(metric, x, size, r, p)
        assert torch.equal(got[2], ref[2]), ("slots", (b, n, d, c, r, p))
        torch.testing.assert_close(got[0], ref[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got[1], ref[1], atol=1e-5, rtol=1e-5)
    print("OK", len(cases))
    """
)


def test_triton_kernel_matches_reference_in_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("OK")


@pytest.mark.parametrize("capability", [(8, 7), (9, 0)])
def test_aot_kernel_compiles_to_ptx_for_jetson_and_h100(capability):
    """What the TensorRT AOT plugin embeds: PTX of the same kernel (compiled here, not run)."""
    from tome_export.targets.trt_plugin import compile_merge_kernel

    kernel = compile_merge_kernel(capability)
    ptx = kernel.asm["ptx"]
    assert kernel.metadata.name == "bipartite_merge_kernel"
    assert f".target sm_{capability[0]}{capability[1]}" in ptx
    assert ".entry bipartite_merge_kernel" in ptx
