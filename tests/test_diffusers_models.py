"""diffusers UNets as users hold them: raw UNet2DConditionModel of the SD-1.5, SD-2.1 and
SDXL layouts (small configs), a pipeline folder as MODEL, and bad input."""

from __future__ import annotations

import json

import pytest
import torch

from tome_export.pipeline import ExportOptions, export

pytest.importorskip("diffusers")


@pytest.mark.parametrize(
    ("factory", "method", "options"),
    [
        ("sd15_tiny", "tomesd", {"ratio": 0.5}),
        ("sd21_tiny", "todo", {"downsample": 2.0}),
        ("sdxl_tiny", "tomesd", {"ratio": 0.5, "max_downsample": 2}),
        ("sdxl_tiny", "todo", {"downsample": 2.0, "max_downsample": 2}),
    ],
)
def test_raw_unet_layouts_export_and_verify(tmp_path, factory, method, options):
    _, manifest = export(
        ExportOptions(model=f"samples.tiny_unet:{factory}", method=method, out=str(tmp_path / "b"), **options)
    )
    names = [i["name"] for i in manifest["inputs"]]
    expected = ["sample", "timestep", "encoder_hidden_states"] + (
        ["text_embeds", "time_ids"] if "xl" in factory else []
    )
    assert names == expected
    assert manifest["inputs"][1]["shape"] == [] and manifest["inputs"][1]["dtype"] == "int64"  # 0-d int timestep
    assert manifest["outputs"][0]["shape"] == [1, 4, 16, 16]  # UNet2DConditionOutput.sample, flattened
    assert manifest["verification"]["passed"] and manifest["verification"]["max_abs_err"] <= 1e-4
    merge = manifest["merge"]
    assert merge["method"] == method and merge["tokens_per_layer"] and all(r > 0 for r in merge["r_per_layer"])


def _pipeline_folder(root, unet_class="UNet2DConditionModel"):
    from samples.tiny_unet import sd15_tiny

    sd15_tiny().save_pretrained(root / "unet")  # safetensors + config.json
    (root / "vae").mkdir()
    (root / "vae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    index = {
        "_class_name": "StableDiffusionPipeline",
        "unet": ["diffusers", unet_class],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (root / "model_index.json").write_text(json.dumps(index))
    return root


def test_pipeline_folder_as_model(tmp_path, cli):
    folder = _pipeline_folder(tmp_path / "sd-pipeline")
    out = tmp_path / "bundle"
    result = cli(str(folder), "--method", "todo", "-o", str(out), "-q")
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["verification"]["passed"] and manifest["merge"]["kv_tokens_per_layer"]

    from samples.tiny_unet import sd15_tiny
    from tome_export.exporter.load import load_model

    loaded = load_model(str(folder), component="unet")  # the saved weights, not a fresh init
    reference = sd15_tiny()
    assert all(
        torch.equal(a, b) for a, b in zip(loaded.module.unet.state_dict().values(), reference.state_dict().values())
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--component", "vae"], "component 'vae' of"),
        (["--component", "text_encoder"], "has no component 'text_encoder'"),
        (["--method", "todo", "--downsample", "9"], "todo downsample factor 9.0 outside [1, 8]"),
        (["--method", "todo", "--downsample", "0.5"], "todo downsample factor 0.5 outside [1, 8]"),
        (["--method", "todo", "--ratio", "0.5"], "--ratio applies to method 'tomesd'"),
    ],
)
def test_bad_input_exits_2_one_line_nothing_written(tmp_path, cli, args, message):
    folder = _pipeline_folder(tmp_path / "sd")
    out = tmp_path / "bundle"
    result = cli(str(folder), *args, "-o", str(out))
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["sd"]


def test_folder_without_unet_and_sdxl_without_top_level_attention(tmp_path, cli):
    folder = tmp_path / "no-unet"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"vae": ["diffusers", "AutoencoderKL"]}))
    result = cli(str(folder), "--method", "tomesd", "-o", str(tmp_path / "b1"))
    assert result.returncode == 2 and "it has no UNet component" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    result = cli("samples.tiny_unet:sdxl_tiny", "--method", "tomesd", "-o", str(tmp_path / "b2"))
    assert result.returncode == 2 and "raise --max-downsample" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["no-unet"]
