"""Device profiles: data files, the `devices` command, --device selection and errors."""

from __future__ import annotations

import dataclasses
import json

import pytest

from tome_export.devices import get_device, profiles
from tome_export.errors import UserError
from tome_export.targets import TARGETS

EXPECTED = {
    "cpu": "onnx",
    "nvidia-sm80": "trt",
    "nvidia-sm90": "trt",
    "jetson-orin-nano": "trt",
    "jetson-orin-nx": "trt",
    "jetson-agx-orin": "trt",
    "apple-a17-pro": "coreml",
    "apple-m-series": "coreml",
    **{f"nvidia-rtx-{gen}-{form}": "trt" for gen in ("ampere", "ada", "blackwell") for form in ("laptop", "desktop")},
}


def test_every_device_has_a_profile_with_a_registered_target():
    table = profiles()
    assert {name: p.default_target for name, p in table.items()} == EXPECTED
    for profile in table.values():
        assert profile.default_target in TARGETS
        assert profile.precision in ("fp32", "fp16")
        assert profile.lowering in TARGETS[profile.default_target].lowerings or profile.name == "cpu"


def test_jetson_profiles_build_on_device_and_know_their_dla():
    for name in ("jetson-orin-nano", "jetson-orin-nx", "jetson-agx-orin"):
        device = get_device(name)
        assert device.get("engine_built_on_device") is True
        assert device.get("jetpack") and device.get("tensorrt")
        assert device.memory_budget_mib and device.get("memory_gb")
    assert get_device("jetson-orin-nano").get("dla_cores") == 0
    assert get_device("jetson-agx-orin").get("dla_cores") == 2


def test_apple_profiles_are_fp16_static_and_chunk_on_ios():
    a17 = get_device("apple-a17-pro")
    assert a17.precision == "fp16" and a17.get("static_shapes") is True
    assert a17.get("compute_units") == "CPU_AND_NE" and a17.get("minimum_deployment_target") == "iOS17"
    assert a17.get("max_weights_per_chunk_mb") == 1024


def test_unknown_device_is_a_user_error():
    with pytest.raises(UserError, match="tome-export devices"):
        get_device("tpu-v9")


def test_devices_command_lists_profiles(cli):
    done = cli("devices", "--json")
    assert done.returncode == 0, done.stderr
    names = [p["name"] for p in json.loads(done.stdout)]
    assert set(names) == set(EXPECTED)
    plain = cli("devices")
    assert "jetson-agx-orin" in plain.stdout and "coreml" in plain.stdout


def test_unknown_device_exits_2(cli, tmp_path):
    done = cli("samples.reference_vit:vit_tiny_test", "--device", "tpu-v9", "-o", str(tmp_path / "b"))
    assert done.returncode == 2
    assert done.stderr.startswith("error: unknown device") and "Traceback" not in done.stderr
    assert not (tmp_path / "b").exists()


def test_onnx_on_nvidia_without_cuda_provider_exits_3(cli, tmp_path):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has the CUDA provider")
    out = tmp_path / "b"
    done = cli(
        "samples.reference_vit:vit_tiny_test", "--r", "4", "--input-shape", "1,3,64,64",
        "--device", "nvidia-sm90", "--target", "onnx", "-o", str(out),
    )  # fmt: skip
    assert done.returncode == 3, done.stderr
    assert "pip install 'tome-export[gpu]'" in done.stderr and "Traceback" not in done.stderr
    assert not out.exists()


def test_missing_coremltools_exits_3_without_traceback(tmp_path):
    """coremltools made unimportable in a subprocess: one line naming the extra, exit 3."""
    import subprocess
    import sys

    from tests.conftest import REPO

    out = tmp_path / "b"
    code = (
        "import sys; sys.modules['coremltools'] = None\n"
        "from tome_export.cli import run\n"
        f"sys.exit(run(['samples.reference_vit:vit_tiny_test', '--r', '4', '--input-shape', '1,3,64,64', "
        f"'--device', 'apple-a17-pro', '-o', {str(out)!r}]))"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 3, done.stderr[-2000:]
    assert "pip install 'tome-export[coreml]'" in done.stderr and "Traceback" not in done.stderr
    assert not out.exists()


def test_memory_budget_is_enforced():
    import types

    from samples.reference_vit import vit_tiny_test
    from tome_export.targets.common import check_memory_budget

    model = vit_tiny_test()
    tiny = dataclasses.replace(get_device("jetson-orin-nano"), name="tiny", memory_budget_mib=0.1)
    with pytest.raises(UserError, match="memory budget"):
        check_memory_budget(types.SimpleNamespace(device=tiny, model=model))
    assert check_memory_budget(types.SimpleNamespace(device=get_device("jetson-orin-nano"), model=model)) > 0


def test_rtx_profiles_target_tensorrt_for_rtx_capabilities():
    from tome_export.targets.trt_rtx import SUPPORTED_CAPABILITIES

    expected = {"ampere": "SM86", "ada": "SM89", "blackwell": "SM120"}
    for name, device in profiles().items():
        if not name.startswith("nvidia-rtx-"):
            continue
        assert device.get("tensorrt_flavour") == "rtx" and device.precision == "fp16"
        assert device.get("compute_capabilities") == [expected[name.split("-")[2]]]
        assert set(device.get("compute_capabilities")) <= set(SUPPORTED_CAPABILITIES)
        assert 0 < device.memory_budget_mib < device.get("gpu_memory_gb") * 1024
