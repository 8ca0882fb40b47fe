"""Core ML target: dense conversion, structure, ANE audit, chunking, verification via ORT.

Core ML prediction needs macOS: nothing here runs a Core ML model."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("coremltools")


def vit_two_blocks():
    """Factory the CLI loads as ``tests.test_coreml_target:vit_two_blocks`` (fewer ops to convert)."""
    from samples.reference_vit import vit_tiny_test

    return vit_tiny_test(depth=2)


def test_chunks_respect_the_limit_and_reproduce_the_whole():
    from samples.reference_vit import vit_tiny_test
    from tome_export.merging import apply
    from tome_export.merging.dense import export_dense
    from tome_export.targets.common import weight_bytes
    from tome_export.targets.coreml_chunks import split_into_chunks

    model = apply(vit_tiny_test(depth=3), "tome", r=6)
    x = torch.randn(1, 3, 64, 64)
    program = export_dense(model, (x,))
    limit = 120_000
    chunks, err = split_into_chunks(program, (x,), limit, "fp16")
    assert len(chunks) >= 3
    assert err == 0.0
    largest_tensor = max(t.numel() * 2 for t in model.parameters())
    assert all(c.weight_bytes <= max(limit, largest_tensor) for c in chunks)
    assert sum(c.weight_bytes for c in chunks) == weight_bytes(model, "fp16")
    # Each piece with its own weights gives what it gave inside the split program.
    for chunk in chunks:
        with torch.no_grad():
            out = chunk.module(*chunk.example_inputs)
        assert all(torch.isfinite(o).all() for o in (out if isinstance(out, tuple) else (out,)))


def test_cli_coreml_chunked_bundle(cli, tmp_path):
    out = tmp_path / "bundle"
    done = cli(
        "tests.test_coreml_target:vit_two_blocks", "--r", "8", "--input-shape", "1,3,64,64",
        "--device", "apple-a17-pro", "--seeds", "1", "--chunk-mb", "0.15", "-o", str(out),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["target"] == "coreml" and manifest["precision"] == "fp16"
    verification = manifest["verification"]
    assert verification["passed"] and min(verification["decision_agreement"]) == 1.0
    assert "onnxruntime" in verification["runtime"]
    coreml = manifest["coreml"]
    assert coreml["compute_units"] == "CPU_AND_NE" and coreml["minimum_deployment_target"] == "iOS17"
    models = coreml["models"]
    assert len(models) == 2 and coreml["chunks_max_abs_err_vs_whole"] == 0.0
    assert all(m["weights_mb"] <= 0.15 for m in models)
    assert all((out / m["file"]).is_dir() for m in models)
    assert all(m["scatter_ops"] == 0 for m in models)
    assert models[0]["inputs"] == [{"name": models[0]["inputs"][0]["name"], "shape": [1, 3, 64, 64]}]
    assert models[-1]["outputs"][0]["shape"] == [1, 10]
    audit = models[0]["audit"]
    assert audit["ops"] > 0 and "reduce_argmax" in audit["off_neural_engine"]
    assert "Neural Engine audit" in done.stderr and "Traceback" not in done.stderr
