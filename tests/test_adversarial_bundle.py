"""Hostile bundles: malformed manifests, path escapes, symlinks, files swapped after load.

Every case must fail with one BundleError line (library) / one line and exit 2 (CLI), before
reading anything outside the bundle, and leave every file outside the bundle untouched.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

import tome_export.runtime as rt
from tests.adversarial_helpers import one_line, tree_state
from tome_export.bundle import BundleError, verify_bundle
from tome_export.cli import run as cli_run
from tome_export.errors import UserError

pytest_plugins = ["tests.adversarial_fixtures"]

BIG = "a" * 64


def _set(path: list, value):
    def mutate(manifest: dict) -> dict:
        holder = manifest
        for key in path[:-1]:
            holder = holder[key]
        holder[path[-1]] = value
        return manifest

    return mutate


def _add_artifact(name: str, sha: str = BIG, size: int = 1):
    def mutate(manifest: dict) -> dict:
        manifest["artifacts"][name] = {"sha256": sha, "bytes": size}
        return manifest

    return mutate


def _point_artifact_to(name: str):
    def mutate(manifest: dict) -> dict:
        entry = manifest["artifacts"].pop("model.onnx")
        manifest["artifacts"][name] = entry
        manifest["artifact"] = name
        return manifest

    return mutate


def _deep(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


# (case id, raw bytes or a function of the parsed manifest, what the message must say)
MANIFEST_CASES = [
    ("random-bytes", os.urandom(512) + b"\xff\xfe", "not UTF-8|not valid JSON"),
    ("non-utf8", b'{"schema_version": 1, "x": "\xff\xfe"}', "not UTF-8"),
    ("empty", b"", "not valid JSON"),
    ("list", b"[1, 2, 3]", "not a JSON object"),
    ("string", b'"manifest"', "not a JSON object"),
    ("null", b"null", "not a JSON object"),
    ("deep-nesting", _deep(200_000), "nested too deeply|not valid JSON"),
    ("nan-version", b'{"schema_version": NaN, "artifacts": {}}', "schema_version"),
    ("no-schema", lambda m: {k: v for k, v in m.items() if k != "schema_version"}, "schema_version"),
    ("schema-string", _set(["schema_version"], "1"), "schema_version"),
    ("schema-bool", _set(["schema_version"], True), "schema_version"),
    ("schema-zero", _set(["schema_version"], 0), "schema_version"),
    ("schema-future", _set(["schema_version"], 999), "upgrade tome-export"),
    ("no-artifacts", lambda m: {k: v for k, v in m.items() if k != "artifacts"}, "artifacts"),
    ("artifacts-list", _set(["artifacts"], ["model.onnx"]), "artifacts"),
    ("artifact-entry-string", _set(["artifacts", "model.onnx"], "deadbeef"), "no {sha256, bytes}"),
    ("sha-short", _set(["artifacts", "model.onnx", "sha256"], "abc"), "malformed sha256"),
    ("sha-upper", _set(["artifacts", "model.onnx", "sha256"], "A" * 64), "malformed sha256"),
    ("sha-int", _set(["artifacts", "model.onnx", "sha256"], 12), "malformed sha256"),
    ("bytes-negative", _set(["artifacts", "model.onnx", "bytes"], -1), "malformed size"),
    ("bytes-string", _set(["artifacts", "model.onnx", "bytes"], "100"), "malformed size"),
    ("bytes-bool", _set(["artifacts", "model.onnx", "bytes"], True), "malformed size"),
    ("artifact-absolute", _point_artifact_to("/etc/hostname"), "outside the bundle"),
    ("artifact-dotdot", _point_artifact_to("../outside.onnx"), "outside the bundle"),
    ("artifact-inner-dotdot", _point_artifact_to("sub/../../outside.onnx"), "outside the bundle"),
    ("artifact-backslash", _point_artifact_to("..\\outside.onnx"), "plain relative path"),
    ("artifact-drive", _point_artifact_to("C:/outside.onnx"), "outside the bundle"),
    ("artifact-nul", _point_artifact_to("model.onnx\x00.txt"), "plain relative path"),
    ("artifact-empty", _point_artifact_to(""), "non-empty string"),
    ("artifact-dot", _point_artifact_to("./model.onnx"), "outside the bundle"),
    ("artifact-manifest", _point_artifact_to("manifest.json"), "cannot be an artifact"),
    ("artifact-unlisted", _set(["artifact"], "unlisted.onnx"), "not listed under 'artifacts'"),
    ("artifact-not-string", _set(["artifact"], ["model.onnx"]), "non-empty string"),
    ("key-etc-passwd", _add_artifact("../../../../etc/passwd"), "outside the bundle"),
    ("key-etc-hostname", _add_artifact("/etc/hostname"), "outside the bundle"),
    ("key-double-slash", _add_artifact("blocks//x.onnx"), "outside the bundle"),
    ("key-home", _add_artifact("~/.ssh/id_rsa"), "incomplete|missing"),
    ("dtype-unknown", _set(["inputs", 0, "dtype"], "evil"), "unknown dtype"),
    ("dtype-object", _set(["inputs", 0, "dtype"], "object"), "unknown dtype"),
    ("dtype-not-string", _set(["outputs", 0, "dtype"], {"x": 1}), "unknown dtype"),
    ("inputs-dict", _set(["inputs"], {"x": 1}), "not a list"),
    ("input-no-name", _set(["inputs", 0], {"shape": [1]}), "no string name"),
    ("shape-string", _set(["inputs", 0, "shape"], "1,3,64,64"), "malformed shape"),
    ("shape-negative", _set(["inputs", 0, "shape"], [1, -3, 64, 64]), "malformed shape"),
    ("target-int", _set(["target"], 123), "not a string"),
    ("custom-domains-string", _set(["custom_domains"], "tome_export"), "not a list"),
    ("variants-list", _set(["variants"], ["model.onnx"]), "not an object"),
    ("variant-absolute", _set(["variants"], {"v": {"artifact": "/etc/hostname", "steps": [0, 1]}}), "outside"),
    ("variant-steps", _set(["variants"], {"v": {"artifact": "model.onnx", "steps": "0-5"}}), "steps"),
    ("source-string", _set(["source"], "os:abort"), "not an object"),
    ("dynamic-not-object", _set(["dynamic_loading"], []), "not an object"),
    ("dynamic-no-blocks", _set(["dynamic_loading"], {"budget_bytes": 10, "outputs": ["y"], "blocks": []}), "blocks"),
]


def _write_manifest(bundle: Path, case) -> None:
    path = bundle / "manifest.json"
    if isinstance(case, bytes):
        path.write_bytes(case)
    else:
        path.write_text(json.dumps(case(json.loads(path.read_text()))))


@pytest.mark.parametrize(("case", "message"), [c[1:] for c in MANIFEST_CASES], ids=[c[0] for c in MANIFEST_CASES])
def test_hostile_manifest_fails_in_one_line_on_load(adv_tiny, copy_of, tmp_path, case, message):
    bundle = copy_of(adv_tiny)
    (tmp_path / "outside.onnx").write_bytes((bundle / "model.onnx").read_bytes())  # a valid graph outside
    _write_manifest(bundle, case)
    before = tree_state(tmp_path)
    with pytest.raises(BundleError) as info:
        rt.load(bundle).run({"x": np.zeros((1, 3, 64, 64), np.float32)})
    text = str(info.value)
    assert "\n" not in text and len(text) < 600
    import re

    assert re.search(message, text), text
    assert tree_state(tmp_path) == before


@pytest.mark.parametrize(("case", "message"), [c[1:] for c in MANIFEST_CASES], ids=[c[0] for c in MANIFEST_CASES])
def test_hostile_manifest_cli_profile_exit_2(adv_tiny, copy_of, tmp_path, capsys, case, message):
    bundle = copy_of(adv_tiny)
    _write_manifest(bundle, case)
    db = tmp_path / "r.sqlite"
    code = cli_run(["profile", str(bundle), "--db", str(db), "--runs", "1", "--warmup", "0", "-q"])
    assert code == 2
    assert one_line(capsys.readouterr().err).startswith("error:")


# -- symlinks ------------------------------------------------------------------------------


def _symlink_model_outside(bundle: Path, outside: Path) -> None:
    shutil.copy(bundle / "model.onnx", outside / "model.onnx")  # identical bytes: the hash would pass
    (bundle / "model.onnx").unlink()
    (bundle / "model.onnx").symlink_to(outside / "model.onnx")


def _symlink_model_inside(bundle: Path, outside: Path) -> None:
    os.replace(bundle / "model.onnx", bundle / "real.onnx")
    (bundle / "model.onnx").symlink_to("real.onnx")


def _symlink_blocks_dir(bundle: Path, outside: Path) -> None:
    shutil.move(str(bundle / "blocks"), str(outside / "blocks"))
    (bundle / "blocks").symlink_to(outside / "blocks")


def _symlink_manifest(bundle: Path, outside: Path) -> None:
    shutil.move(str(bundle / "manifest.json"), str(outside / "manifest.json"))
    (bundle / "manifest.json").symlink_to(outside / "manifest.json")


def _symlink_block_weights(bundle: Path, outside: Path) -> None:
    name = next(p for p in (bundle / "blocks").iterdir() if p.suffix == ".weights")
    shutil.copy(name, outside / name.name)
    name.unlink()
    name.symlink_to(outside / name.name)


def _fifo_as_model(bundle: Path, outside: Path) -> None:
    (bundle / "model.onnx").unlink()
    os.mkfifo(bundle / "model.onnx")


def _folder_as_model(bundle: Path, outside: Path) -> None:
    (bundle / "model.onnx").unlink()
    (bundle / "model.onnx").mkdir()


def _hardlink_is_just_a_file(bundle: Path, outside: Path) -> None:
    shutil.copy(bundle / "model.onnx", outside / "model.onnx")
    (bundle / "model.onnx").unlink()
    os.link(outside / "model.onnx", bundle / "model.onnx")  # same bytes: allowed, it is a regular file


@pytest.mark.parametrize(
    ("case", "message"),
    [
        (_fifo_as_model, "not a regular file"),
        (_folder_as_model, "not a regular file"),
        (_hardlink_is_just_a_file, None),
    ],
    ids=["fifo", "folder", "hardlink"],
)
def test_special_files_in_place_of_an_artifact(adv_tiny, copy_of, tmp_path, case, message):
    bundle = copy_of(adv_tiny)
    outside = tmp_path / "outside"
    outside.mkdir()
    case(bundle, outside)
    if message is None:
        assert rt.load(bundle).run({"x": np.zeros((1, 3, 64, 64), np.float32)})
        return
    with pytest.raises(BundleError, match=message):
        rt.load(bundle)


SYMLINK_CASES = {
    "model-to-outside": _symlink_model_outside,
    "model-to-inside": _symlink_model_inside,
    "blocks-dir-to-outside": _symlink_blocks_dir,
    "manifest-to-outside": _symlink_manifest,
    "block-weights-to-outside": _symlink_block_weights,
}


@pytest.mark.parametrize("case", list(SYMLINK_CASES))
def test_symlinks_in_a_bundle_are_refused(adv_dynamic, copy_of, tmp_path, case):
    bundle = copy_of(adv_dynamic)
    outside = tmp_path / "outside"
    outside.mkdir()
    SYMLINK_CASES[case](bundle, outside)
    with pytest.raises(BundleError, match="symbolic link"):
        rt.load(bundle).run({"x": np.zeros((1, 3, 64, 64), np.float32)})


def test_bundle_folder_itself_may_be_a_link(adv_tiny, copy_of, tmp_path):
    bundle = copy_of(adv_tiny)
    link = tmp_path / "link"
    link.symlink_to(bundle)
    out = rt.load(link).run({"x": np.zeros((1, 3, 64, 64), np.float32)})
    assert np.isfinite(next(iter(out.values()))).all()


# -- time of check vs time of use ----------------------------------------------------------


def _other_graph(bundle: Path) -> bytes:
    import onnx

    model = onnx.load(str(bundle / "model.onnx"))
    model.doc_string = "swapped"
    return model.SerializeToString()


@pytest.mark.parametrize("keep_mtime", [False, True])
def test_model_swapped_after_load_is_caught_when_used(adv_tiny, copy_of, keep_mtime):
    bundle = copy_of(adv_tiny)
    session = rt.load(bundle)  # checks every hash
    path = bundle / "model.onnx"
    stat = path.stat()
    path.write_bytes(_other_graph(bundle))
    if keep_mtime:
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(BundleError, match="model.onnx"):
        session.run({"x": np.zeros((1, 3, 64, 64), np.float32)})


@pytest.mark.parametrize("which", ["graph", "weights"])
@pytest.mark.parametrize("keep_mtime", [False, True])
def test_dynamic_block_changed_between_runs_is_caught(adv_dynamic, copy_of, which, keep_mtime):
    bundle = copy_of(adv_dynamic)
    manifest = json.loads((bundle / "manifest.json").read_text())
    session = rt.load(bundle)
    feeds = {"x": np.random.default_rng(0).standard_normal((1, 3, 64, 64)).astype(np.float32)}
    first = session.run(feeds)
    block = manifest["dynamic_loading"]["blocks"][0]  # unloaded again by the small budget
    path = bundle / block["artifact" if which == "graph" else "weights"]
    stat = path.stat()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # same size
    path.write_bytes(bytes(data))
    if keep_mtime:
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(UserError, match="was modified"):
        session.run(feeds)
    assert next(iter(first.values())).shape[0] == 1


def test_unchanged_dynamic_bundle_runs_every_time(adv_dynamic, adv_tiny):
    feeds = {"x": np.random.default_rng(1).standard_normal((1, 3, 64, 64)).astype(np.float32)}
    session = rt.load(adv_dynamic)
    runs = [session.run(feeds)["output"] for _ in range(2)]
    assert np.array_equal(runs[0], runs[1])


@pytest.mark.parametrize("change", ["truncate", "append", "flip", "delete"])
def test_altered_artifact_fails_verify_in_one_line(adv_dynamic, copy_of, change):
    bundle = copy_of(adv_dynamic)
    path = next(p for p in sorted((bundle / "blocks").iterdir()) if p.suffix == ".weights")
    data = path.read_bytes()
    if change == "truncate":
        path.write_bytes(data[:-10])
    elif change == "append":
        path.write_bytes(data + b"\0")
    elif change == "flip":
        path.write_bytes(bytes([data[0] ^ 1]) + data[1:])
    else:
        path.unlink()
    with pytest.raises(BundleError) as info:
        verify_bundle(bundle)
    assert path.name in str(info.value) and "\n" not in str(info.value)


def test_external_data_reference_outside_the_bundle_is_not_read(adv_tiny, copy_of, tmp_path):
    """A graph whose weights point at an absolute path or ../ gets nothing from disk."""
    import hashlib

    import onnx
    from onnx import TensorProto, helper

    bundle = copy_of(adv_tiny)
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.arange(4, dtype=np.float32).tobytes())
    weight = onnx.TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[4])
    weight.data_location = TensorProto.EXTERNAL
    for key, value in (("location", str(secret)), ("offset", "0"), ("length", "16")):
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["output"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [4])],
        [weight],
    )
    data = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]).SerializeToString()
    (bundle / "model.onnx").write_bytes(data)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["artifacts"]["model.onnx"] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    manifest["inputs"] = [{"name": "x", "shape": [4], "dtype": "float32"}]
    manifest["outputs"] = [{"name": "output", "shape": [4], "dtype": "float32"}]
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="ONNX Runtime cannot load model.onnx"):
        rt.load(bundle).run({"x": np.zeros(4, np.float32)})
    assert str(secret).encode() in data  # the graph really referenced the file


# -- malformed runtime inputs ----------------------------------------------------------------

X = np.zeros((1, 3, 64, 64), np.float32)
INPUT_CASES = {
    "extra-input": ({"x": X, "y": X}, "unexpected input"),
    "missing-input": ({}, "missing input"),
    "wrong-name": ({"image": X}, "unexpected input"),
    "string-array": ({"x": np.array(["a", "b"])}, "holds <U1"),
    "string-scalar": ({"x": "pixels"}, "holds <U6"),
    "object-array": ({"x": np.array([object()])}, "holds object"),
    "ragged-list": ({"x": [[1.0, 2.0], [3.0]]}, "not a rectangular"),
    "none-value": ({"x": None}, "holds object"),
    "complex": ({"x": X.astype(np.complex64)}, "complex64"),
    "wrong-shape": ({"x": np.zeros((1, 3, 32, 32), np.float32)}, "has shape"),
    "wrong-rank": ({"x": np.zeros((3, 64, 64), np.float32)}, "has shape"),
    "scalar": ({"x": 1.0}, "has shape"),
    "positional-too-many": ([X, X], "takes 1 inputs"),
    "positional-none": ([], "takes 1 inputs"),
    "not-a-container": (42, "must be a dict"),
    "a-set": ({X.tobytes()}, "must be a dict"),
    "non-string-key": ({0: X}, "unexpected input"),
    "nested-dict": ({"x": {"x": X}}, "holds object"),
}


@pytest.mark.parametrize("case", list(INPUT_CASES))
def test_malformed_runtime_inputs_raise_one_typed_line(adv_tiny, case):
    inputs, message = INPUT_CASES[case]
    session = rt.load(adv_tiny)
    with pytest.raises(rt.InputError) as info:
        session.run(inputs)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_castable_inputs_still_run(adv_tiny):
    session = rt.load(adv_tiny)
    as_float64 = session.run({"x": np.zeros((1, 3, 64, 64))})["output"]
    as_list = session.run([np.zeros((1, 3, 64, 64), np.float32).tolist()])["output"]
    assert np.array_equal(as_float64, as_list)
