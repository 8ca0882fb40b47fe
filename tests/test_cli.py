"""The CLI as a user runs it: a good export, and every bad input (exit 2, one line, nothing written)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from samples.reference_vit import vit_tiny_test
from tome_export.cli import run

TINY = "samples.reference_vit:vit_tiny_test"


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("error: ")
    return err[0]


def test_export_writes_verified_bundle(tmp_path, cli):
    out = tmp_path / "vit"
    result = cli(TINY, "--target", "onnx", "--r", "8", "--input-shape", "2,3,64,64", "-o", str(out), "--json")
    assert result.returncode == 0, result.stderr
    manifest = json.loads(result.stdout)
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert (out / "model.onnx").is_file()
    assert manifest["target"] == "onnx" and manifest["lowering"] == "scatter" and manifest["opset"] == 18
    assert manifest["inputs"] == [{"name": "x", "shape": [2, 3, 64, 64], "dtype": "float32"}]
    assert manifest["outputs"] == [{"name": "output", "shape": [2, 10], "dtype": "float32"}]
    assert manifest["merge"]["r_per_layer"] == [8, 8, 8, 8]
    assert manifest["merge"]["tokens_per_layer"] == [65, 57, 49, 41]
    verification = manifest["verification"]
    assert verification["passed"] and verification["max_abs_err"] <= 1e-4
    assert verification["decision_agreement"] == [1.0] * 4
    assert len(manifest["artifacts"]["model.onnx"]["sha256"]) == 64
    assert "verifying" in result.stderr  # progress goes to stderr, JSON alone on stdout
    assert not list(tmp_path.glob(".*partial"))


def test_r_zero_and_method_none_export_unmerged(tmp_path, capsys):
    for extra in (["--r", "0"], ["--method", "none"]):
        out = tmp_path / extra[-1]
        assert run([TINY, "--input-shape", "1,3,64,64", "-o", str(out), "-q", *extra]) == 0
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["merge"]["method"] == "none"
        assert manifest["verification"]["passed"]


def test_trust_pickle_loads_a_pickled_module(tmp_path):
    path = tmp_path / "vit.pt"
    torch.save(vit_tiny_test(), path)
    out = tmp_path / "out"
    assert run([str(path), "--trust-pickle", "--r", "4", "-o", str(out), "-q", "--seeds", "1"]) == 0
    assert json.loads((out / "manifest.json").read_text())["merge"]["r_per_layer"] == [4, 4, 4, 4]


def _pickled(tmp_path: Path) -> str:
    path = tmp_path / "vit.pt"
    torch.save(vit_tiny_test(), path)
    return str(path)


def _text_file(tmp_path: Path) -> str:
    path = tmp_path / "notes.pt"
    path.write_text("not a model")
    return str(path)


def _state_dict(tmp_path: Path) -> str:
    path = tmp_path / "weights.pt"
    torch.save(vit_tiny_test().state_dict(), path)
    return str(path)


BAD_INPUTS = {
    "missing file": (lambda p: ["missing.pt"], "does not exist"),
    "not a model": (lambda p: [_text_file(p)], "not a PyTorch file"),
    "state dict": (lambda p: [_state_dict(p)], "state dict"),
    "pickle without trust": (lambda p: [_pickled(p)], "--trust-pickle"),
    "no attention blocks": (lambda p: ["tests.fixtures.factories:mlp_only", "--input-shape", "1,3,8,8"], "no attention blocks"),
    "factory returns no module": (lambda p: ["tests.fixtures.factories:not_a_module"], "not a torch.nn.Module"),
    "unknown factory module": (lambda p: ["no_such_pkg.mod:make"], "cannot import"),
    "negative r": (lambda p: [TINY, "--r", "-3"], "≥ 0"),
    "schedule longer than depth": (lambda p: [TINY, "--schedule", "1,2,3,4,5"], "4 attention blocks"),
    "malformed schedule": (lambda p: [TINY, "--schedule", "8,x"], "malformed"),
    "unknown target": (lambda p: [TINY, "--target", "tflite"], "unknown target"),
    "unknown method": (lambda p: [TINY, "--method", "magic"], "unknown method"),
    "unknown lowering": (lambda p: [TINY, "--lowering", "fancy"], "unknown lowering"),
    "unknown device": (lambda p: [TINY, "--device", "toaster"], "unknown device"),
    "malformed input shape": (lambda p: [TINY, "--input-shape", "1,3,x"], "malformed"),
    "zero in input shape": (lambda p: [TINY, "--input-shape", "1,0,64,64"], "malformed"),
    "input shape the model rejects": (lambda p: [TINY, "--input-shape", "1,5,64,64"], "rejects input shape"),
    "r and schedule together": (lambda p: [TINY, "--r", "4", "--schedule", "4"], "not both"),
    "unknown option": (lambda p: [TINY, "--frobnicate"], "frobnicate"),
    "unknown timm model": (lambda p: ["timm:no_such_vit"], "timm"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2_nothing_written(case, tmp_path, capsys, monkeypatch):
    make_args, expected = BAD_INPUTS[case]
    args = make_args(tmp_path)
    out = tmp_path / "out"
    monkeypatch.chdir(Path(__file__).resolve().parent.parent)
    code = run([*args, "-o", str(out)])
    message = one_line_error(capsys)
    assert code == 2, message
    assert expected in message
    assert not out.exists()
    assert not list(tmp_path.glob(".out*"))


def test_existing_non_bundle_output_is_not_overwritten(tmp_path, capsys):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "thesis.txt").write_text("keep me")
    assert run([TINY, "-o", str(out)]) == 2
    assert "not a tome-export bundle" in one_line_error(capsys)
    assert (out / "thesis.txt").read_text() == "keep me"


def test_failed_verification_exits_1_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    # An impossible tolerance: fp32 rounding alone exceeds it.
    code = run([TINY, "--r", "8", "--atol", "0", "-o", str(out), "-q"])
    assert code == 1
    message = capsys.readouterr().err
    assert "verification FAILED" in message and "'output'" in message
    assert not out.exists()


def test_subprocess_bad_input_has_no_traceback(cli, tmp_path):
    result = cli(str(tmp_path / "nothing.pt"))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [f"error: model file {tmp_path / 'nothing.pt'} does not exist"]


def test_devices_lists_cpu(cli):
    result = cli("devices", "--json")
    assert result.returncode == 0
    assert "cpu" in [d["name"] for d in json.loads(result.stdout)]


def test_timm_model_spec_gives_the_same_random_weights_every_time():
    pytest.importorskip("timm")
    from tome_export.exporter.load import load_model

    first = load_model("timm:vit_tiny_patch16_224").module.state_dict()
    second = load_model("timm:vit_tiny_patch16_224").module.state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
