"""Bundles: checksums on load, schema version, preprocessing, variants, the sample apps."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import tome_export
from tome_export.bundle import SCHEMA_VERSION, BundleWriter
from tome_export.errors import UserError

pytest_plugins = ["tests.bundle_fixtures"]  # the session-wide tiny_bundle fixture


@pytest.fixture
def bundle_copy(tiny_bundle, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_bundle, tmp_path / "copy"))


def test_manifest_describes_inputs_preprocessing_and_checksums(tiny_bundle):
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    assert manifest["schema_version"] == SCHEMA_VERSION
    assert manifest["inputs"] == [{"name": "x", "shape": [2, 3, 64, 64], "dtype": "float32"}]
    pre = manifest["preprocessing"]
    assert pre["layout"] == "NCHW" and pre["size"] == [64, 64]
    assert pre["mean"] is None and pre["std"] is None  # the reference ViT declares none
    assert len(manifest["artifacts"]["model.onnx"]["sha256"]) == 64


def test_load_runs_like_onnxruntime(tiny_bundle):
    import onnxruntime as ort

    session = tome_export.runtime.load(tiny_bundle)
    x = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
    got = session.run({"x": x})["output"]
    direct = ort.InferenceSession(str(tiny_bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(got, direct.run(None, {"x": x})[0])
    np.testing.assert_array_equal(session.run([x])["output"], got)
    with pytest.raises(UserError, match=r"shape \[1, 3, 64, 64\]"):
        session.run({"x": x[:1]})


def test_tampered_artifact_fails_naming_the_file(bundle_copy):
    data = bytearray((bundle_copy / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bundle_copy / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"model\.onnx fails its sha256"):
        tome_export.runtime.load(bundle_copy)


def test_truncated_and_missing_artifacts_fail_naming_the_file(bundle_copy):
    path = bundle_copy / "model.onnx"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(UserError, match=r"model\.onnx has 1000 bytes"):
        tome_export.runtime.load(bundle_copy)
    path.unlink()
    with pytest.raises(UserError, match=r"artifact model\.onnx is missing"):
        tome_export.runtime.load(bundle_copy)


def test_newer_schema_and_not_a_bundle(bundle_copy, tmp_path):
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    manifest["schema_version"] = SCHEMA_VERSION + 1
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="newer than this tome-export reads"):
        tome_export.runtime.load(bundle_copy)
    with pytest.raises(UserError, match="manifest.json is missing"):
        tome_export.runtime.load(tmp_path)
    with pytest.raises(UserError, match="not a folder"):
        tome_export.runtime.load(tmp_path / "nothing")


def test_cli_profile_of_tampered_bundle_is_one_line_exit_2(bundle_copy, cli):
    (bundle_copy / "model.onnx").write_bytes(b"not onnx")
    result = cli("profile", str(bundle_copy), "--db", str(bundle_copy.parent / "r.sqlite"))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "model.onnx" in lines[0] and lines[0].startswith("error:")
    assert result.stdout == ""


# -- variants (TDTM merged/full by step) -------------------------------------------------

FRAMES, SHAPE = 4, [1, 2, 4, 3, 3]  # (batch, channels, frames, h, w)


def _denoiser(merge_frames: bool) -> onnx.ModelProto:
    """eps = 0.1·x; the merged variant first averages consecutive frame pairs (TDTM) and repeats."""
    nodes, source = [], "sample"
    if merge_frames:
        nodes += [
            helper.make_node("Reshape", ["sample", "pairs"], ["paired"]),
            helper.make_node("ReduceMean", ["paired", "axis"], ["mean"], keepdims=1),
            helper.make_node("Expand", ["mean", "pairs"], ["repeated"]),
            helper.make_node("Reshape", ["repeated", "full"], ["merged"]),
        ]
        source = "merged"
    nodes.append(helper.make_node("Mul", [source, "scale"], ["eps"]))
    inits = [
        helper.make_tensor("scale", TensorProto.FLOAT, [], [0.1]),
        helper.make_tensor("pairs", TensorProto.INT64, [6], [1, 2, FRAMES // 2, 2, 3, 3] if merge_frames else [1] * 6),
        helper.make_tensor("axis", TensorProto.INT64, [1], [3]),
        helper.make_tensor("full", TensorProto.INT64, [5], SHAPE),
    ]
    graph = helper.make_graph(
        nodes,
        "denoiser",
        [
            helper.make_tensor_value_info("sample", TensorProto.FLOAT, SHAPE),
            helper.make_tensor_value_info("timestep", TensorProto.INT64, [1]),
        ],
        [helper.make_tensor_value_info("eps", TensorProto.FLOAT, SHAPE)],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


@pytest.fixture
def video_bundle(tmp_path) -> Path:
    out = tmp_path / "video"
    with BundleWriter(out) as bundle:
        onnx.save(_denoiser(True), bundle.path / "merged.onnx")
        onnx.save(_denoiser(False), bundle.path / "full.onnx")
        bundle.write_manifest(
            {
                "target": "onnx",
                "device": "cpu",
                "merge": {"method": "tdtm"},
                "inputs": [
                    {"name": "sample", "shape": SHAPE, "dtype": "float32"},
                    {"name": "timestep", "shape": [1], "dtype": "int64"},
                ],
                "outputs": [{"name": "eps", "shape": SHAPE, "dtype": "float32"}],
                "variants": {
                    "merged": {"artifact": "merged.onnx", "steps": [0, 3]},
                    "full": {"artifact": "full.onnx", "steps": [3, 6]},
                },
            }
        )
    return out


def test_variants_pick_the_artifact_by_step(video_bundle):
    session = tome_export.runtime.load(video_bundle)
    x = np.random.default_rng(1).standard_normal(SHAPE).astype(np.float32)
    feeds = {"sample": x, "timestep": np.array([999])}
    early = session.run(feeds, step=0)["eps"]
    late = session.run(feeds, step=5)["eps"]
    np.testing.assert_allclose(late, 0.1 * x, rtol=1e-6)
    np.testing.assert_allclose(early[:, :, 0], early[:, :, 1])  # frames 0 and 1 merged
    assert not np.allclose(early, late)
    with pytest.raises(UserError, match="pass step="):
        session.run(feeds)
    with pytest.raises(UserError, match="step 6 is in no variant"):
        session.run(feeds, step=6)


def test_video_app_runs_the_loop(video_bundle, capsys):
    from samples import video_app

    assert video_app.main([str(video_bundle), "--steps", "6"]) == 0
    err = capsys.readouterr().err
    assert err.count("variant merged") == 3 and err.count("variant full") == 3


def test_classify_app_top5_matches_the_session(tiny_bundle, tmp_path, capsys):
    from samples import classify_app

    pixels = (np.random.default_rng(2).random((80, 96, 3)) * 255).astype(np.uint8)
    np.save(tmp_path / "img.npy", pixels)
    assert classify_app.main([str(tiny_bundle), str(tmp_path / "img.npy"), "--json"]) == 0
    top5 = json.loads(capsys.readouterr().out)
    session = tome_export.runtime.load(tiny_bundle)
    x = classify_app.preprocess(classify_app.load_pixels(tmp_path / "img.npy", 64, 64), None, 2)
    logits = session.run({"x": x})["output"][0]
    assert [e["class"] for e in top5] == list(np.argsort(-logits)[:5])
    assert all(a["probability"] >= b["probability"] for a, b in zip(top5, top5[1:]))


def test_classify_app_decodes_an_image_file(tiny_bundle, tmp_path, capsys):
    from PIL import Image as pil  # Pillow: a dependency of matplotlib, always installed

    from samples import classify_app

    pixels = (np.random.default_rng(3).random((90, 70, 3)) * 255).astype(np.uint8)
    pil.fromarray(pixels).save(tmp_path / "img.png")
    assert classify_app.main([str(tiny_bundle), str(tmp_path / "img.png")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 5 and all("class " in line for line in lines)


def test_preprocessing_takes_mean_std_from_the_models_declaration():
    import torch

    from tome_export.bundle import preprocessing_for

    model = torch.nn.Conv2d(3, 8, 4)
    model.pretrained_cfg = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225), "crop_pct": 0.9}
    spec = preprocessing_for(model, [(1, 3, 224, 224)])
    assert spec["mean"] == [0.485, 0.456, 0.406] and spec["std"] == [0.229, 0.224, 0.225]
    assert spec["size"] == [224, 224] and spec["resize"]["crop_pct"] == 0.9
    assert preprocessing_for(model, [(1, 16, 128)]) is None  # not an image input
