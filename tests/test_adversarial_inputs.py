"""Bad input to the CLI: options, model factories, weights, corrupt archives, results files, profile.

Every case: the right exit code (2 for bad input), one error line without a traceback,
nothing written (no output folder, no partial, no stored result).
"""

from __future__ import annotations

import json
import uuid
import zipfile
from pathlib import Path

import pytest
import torch

from tests.adversarial_helpers import one_line, tree_state
from tome_export.cli import run as cli_run
from tome_export.profiling import ResultStore

pytest_plugins = ["tests.adversarial_fixtures"]

TINY = ["samples.reference_vit:vit_tiny_test", "--r", "4", "--input-shape", "1,3,64,64", "--seeds", "1", "-q"]


def _nothing_written(folder: Path, before: dict) -> None:
    assert tree_state(folder) == before
    assert not [p for p in folder.iterdir() if p.name.endswith(".partial")]


# -- options checked before any work -----------------------------------------------------------

OPTION_CASES = {
    "opset-1": (["--opset", "1"], "--opset 1 is not supported"),
    "opset-17": (["--opset", "17"], "opsets 18 to 25"),
    "opset-26": (["--opset", "26"], "opsets 18 to 25"),
    "opset-99": (["--opset", "99"], "opsets 18 to 25"),
    "opset-negative": (["--opset", "-18"], "not supported"),
    "atol-negative": (["--atol", "-1"], "--atol -1.0 is not a tolerance"),
    "atol-nan": (["--atol", "nan"], "is not a tolerance"),
    "atol-inf": (["--atol", "inf"], "is not a tolerance"),
    "atol-minus-inf": (["--atol", "-inf"], "is not a tolerance"),
    "pin-without-verify": (["--pin-decisions", "--no-verify"], "--pin-decisions is part of verification"),
    "out-empty": (["-o", ""], "-o '' names no folder"),
    "out-blank": (["-o", "  "], "names no folder"),
    "seeds-zero": (["--seeds", "0"], "--seeds"),
    "r-negative": (["--r", "-3"], "--r must be ≥ 0"),
    "bad-shape": (["--input-shape", "1,x"], "--input-shape"),
    "unknown-method": (["--method", "evil"], "unknown method"),
    "unknown-device": (["--device", "toaster"], "toaster"),
}


@pytest.mark.parametrize("case", list(OPTION_CASES))
def test_bad_options_exit_2_up_front(tmp_path, capsys, monkeypatch, case):
    args, message = OPTION_CASES[case]
    monkeypatch.chdir(tmp_path)
    argv = [*TINY, *args] if "-o" in args else [*TINY, "-o", str(tmp_path / "out"), *args]
    assert cli_run(argv) == 2
    assert message in one_line(capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == []


def test_manifest_records_the_graph_opset(adv_tiny):
    import onnx

    manifest = json.loads((adv_tiny / "manifest.json").read_text())
    graph = onnx.load(str(adv_tiny / "model.onnx"), load_external_data=False)
    assert manifest["opset"] == next(o.version for o in graph.opset_import if o.domain == "") == 18


# -- model factories and weights ---------------------------------------------------------------

FACTORY_SOURCES = {
    "raises": ("def make():\n    raise RuntimeError('no GPU here')\n", "raised RuntimeError: no GPU here"),
    "syntax-error": ("def make(:\n    pass\n", "SyntaxError"),
    "import-raises": ("raise ValueError('bad config')\ndef make():\n    pass\n", "ValueError: bad config"),
    "missing-dependency": ("import no_such_package_xyz\ndef make():\n    pass\n", "No module named"),
    "returns-dict": ("def make():\n    return {'a': 1}\n", "not a torch.nn.Module"),
    "not-callable": ("make = 3\n", "no callable 'make'"),
    "system-exit": ("def make():\n    raise SystemExit(5)\n", "raised SystemExit: 5"),
    "recursion": ("def make():\n    return make()\n", "RecursionError"),
}


@pytest.mark.parametrize("case", list(FACTORY_SOURCES))
def test_broken_factory_is_one_line_exit_2(tmp_path, capsys, monkeypatch, case):
    source, message = FACTORY_SOURCES[case]
    name = f"adv_factory_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(source)
    monkeypatch.chdir(tmp_path)
    before = tree_state(tmp_path)
    code = cli_run([f"{name}:make", "-o", str(tmp_path / "out"), "-q"])
    assert code == 2 and message in one_line(capsys.readouterr().err)
    _nothing_written(tmp_path, before)


WEIGHT_CASES = {
    "wrong-keys": {"nope.weight": torch.zeros(2)},
    "wrong-shape": {"1.weight": torch.zeros(9, 9), "1.bias": torch.zeros(9)},
    "strings": {"1.weight": "x", "1.bias": "y"},
    "empty": {},
}


@pytest.mark.parametrize("case", list(WEIGHT_CASES))
def test_weights_that_do_not_fit_exit_2(tmp_path, capsys, case):
    weights = tmp_path / "w.pt"
    torch.save(WEIGHT_CASES[case], weights)
    before = tree_state(tmp_path)
    code = cli_run(["tests.fixtures.factories:mlp_only", "--weights", str(weights), "-o", str(tmp_path / "o"), "-q"])
    assert code == 2
    assert "does not fit" in one_line(capsys.readouterr().err)
    _nothing_written(tmp_path, before)


# -- corrupt .pt2 archives ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def pt2_file(tmp_path_factory) -> Path:
    from tests.fixtures.factories import mlp_only

    path = tmp_path_factory.mktemp("pt2") / "mlp.pt2"
    torch.export.save(torch.export.export(mlp_only().eval(), (torch.randn(1, 3, 8, 8),)), str(path))
    return path


def _flip_in_member(path: Path, pick) -> None:
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if pick(i) and i.file_size > 8)
        header = info.header_offset
    data = bytearray(path.read_bytes())
    name_len = int.from_bytes(data[header + 26 : header + 28], "little")
    extra_len = int.from_bytes(data[header + 28 : header + 30], "little")
    start = header + 30 + name_len + extra_len
    data[start + info.compress_size // 2] ^= 0x40
    path.write_bytes(bytes(data))


def _rewrite_member(path: Path, pick, content: bytes) -> None:
    with zipfile.ZipFile(path) as archive:
        members = [(i, archive.read(i)) for i in archive.infolist()]
    with zipfile.ZipFile(path, "w") as archive:
        for info, data in members:
            archive.writestr(info, content if pick(info) else data)


PT2_CASES = {
    "crc-in-weights": (lambda p: _flip_in_member(p, lambda i: "/data/" in i.filename), "fails its CRC check"),
    "crc-in-graph-json": (lambda p: _flip_in_member(p, lambda i: i.filename.endswith(".json")), "CRC"),
    "non-utf8-config": (
        lambda p: _rewrite_member(p, lambda i: i.filename.endswith("_config.json"), b"\xff\xfe\x00bad"),
        "not a readable torch.export archive",
    ),
    "config-wrong-type": (
        lambda p: _rewrite_member(p, lambda i: i.filename.endswith("_config.json"), b'{"config": {"w": 5}}'),
        "not a readable torch.export archive",
    ),
    "graph-not-json": (
        lambda p: _rewrite_member(p, lambda i: i.filename.endswith("model.json"), b"\xff not json"),
        "cannot load",
    ),
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), "torch.export archive"),
    "random-bytes": (lambda p: p.write_bytes(bytes(range(256)) * 8), "torch.export archive"),
    "empty-file": (lambda p: p.write_bytes(b""), "torch.export archive"),
}


@pytest.mark.parametrize("case", list(PT2_CASES))
def test_corrupt_pt2_is_one_line_naming_the_archive(pt2_file, tmp_path, capsys, case):
    damage, message = PT2_CASES[case]
    path = tmp_path / "model.pt2"
    path.write_bytes(pt2_file.read_bytes())
    damage(path)
    before = tree_state(tmp_path)
    assert cli_run([str(path), "--input-shape", "1,3,8,8", "-o", str(tmp_path / "out"), "-q"]) == 2
    line = one_line(capsys.readouterr().err)
    assert str(path) in line and (message in line or "torch.export" in line), line
    _nothing_written(tmp_path, before)


# -- results files -------------------------------------------------------------------------------


def _record(**changes) -> dict:
    record = {
        "id": uuid.uuid4().hex,
        "created": "2026-11-24T10:00:00+00:00",
        "device": "cpu",
        "model": "m",
        "method": "tome",
        "schedule": "r=8",
        "r": 8,
        "target": "onnx",
        "tool_version": "tome-export 0.1.0",
        "batch_size": 1,
        "latency_ms": {"median": 5.0, "p90": 6.0, "spread": 1.0},
        "breakdown": {"merge_share": 0.1, "coverage": 1.0, "consistent": True, "by_layer": {"blocks.0": 1.0}},
        "fidelity": {"cosine": 0.99, "top1_agreement": 1.0},
    }
    for key, value in changes.items():
        if value is _DROP:
            record.pop(key)
        else:
            record[key] = value
    return record


_DROP = object()


def _doc(*records) -> bytes:
    return json.dumps({"schema": "tome-export-results", "schema_version": 1, "results": list(records)}).encode()


STORE_CASES = {
    "nan-median": _doc(_record()).replace(b'"median": 5.0', b'"median": NaN'),
    "infinite-median": _doc(_record()).replace(b'"median": 5.0', b'"median": Infinity'),
    "zero-median": _doc(_record(latency_ms={"median": 0})),
    "negative-median": _doc(_record(latency_ms={"median": -2.0})),
    "string-median": _doc(_record(latency_ms={"median": "5"})),
    "bool-median": _doc(_record(latency_ms={"median": True})),
    "no-median": _doc(_record(latency_ms={"p90": 3.0})),
    "latency-list": _doc(_record(latency_ms=[5.0])),
    "p90-string": _doc(_record(latency_ms={"median": 5.0, "p90": "slow"})),
    "breakdown-string": _doc(_record(breakdown="fast")),
    "breakdown-by-layer-list": _doc(_record(breakdown={"by_layer": [1, 2]})),
    "breakdown-share-string": _doc(_record(breakdown={"merge_share": "10%"})),
    "breakdown-consistent-string": _doc(_record(breakdown={"consistent": "yes"})),
    "fidelity-list": _doc(_record(fidelity=[0.9])),
    "cosine-string": _doc(_record(fidelity={"cosine": "high"})),
    "batch-string": _doc(_record(batch_size="1")),
    "batch-zero": _doc(_record(batch_size=0)),
    "batch-bool": _doc(_record(batch_size=True)),
    "device-int": _doc(_record(device=5)),
    "model-empty": _doc(_record(model="")),
    "r-negative": _doc(_record(r=-1)),
    "r-float": _doc(_record(r=2.5)),
    "missing-id": _doc(_record(id=_DROP)),
    "record-list": _doc([1, 2]),
    "one-bad-among-good": _doc(_record(), _record(latency_ms={"median": None})),
    "deep-extra": _doc(_record(extra=json.loads("[" * 100 + "]" * 100))),
    "deep-document": b'{"schema": "tome-export-results", "results": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "results-not-list": json.dumps({"schema": "tome-export-results", "results": {"a": 1}}).encode(),
    "wrong-schema": json.dumps({"schema": "other", "results": []}).encode(),
    "schema-version-string": json.dumps({"schema": "tome-export-results", "schema_version": "1"}).encode(),
    "top-level-list": b"[]",
    "non-utf8": b'{"schema": "tome-export-results", "results": ["\xff"]}',
    "empty-file": b"",
    "random-bytes": bytes(range(256)),
}


@pytest.mark.parametrize("command", ["import-results", "report"])
@pytest.mark.parametrize("case", list(STORE_CASES))
def test_malformed_results_store_nothing(tmp_path, capsys, case, command):
    path = tmp_path / "results.json"
    path.write_bytes(STORE_CASES[case])
    db = tmp_path / "r.sqlite"
    argv = ["import-results", str(path)] if command == "import-results" else ["report", "--import", str(path)]
    assert cli_run([*argv, "--db", str(db), "-q"]) == 2
    assert one_line(capsys.readouterr().err).startswith("error:")
    with ResultStore(db) as store:
        assert store.records() == []
    assert cli_run(["report", "--db", str(db)]) == 0  # the store still reports


def test_good_results_still_import_and_report(tmp_path, capsys):
    path = tmp_path / "results.json"
    path.write_bytes(_doc(_record(), _record(schedule="r=0", r=0)))
    db = tmp_path / "r.sqlite"
    assert cli_run(["import-results", str(path), "--db", str(db)]) == 0
    assert "imported 2 new result(s) (0 already stored)" in capsys.readouterr().err
    assert cli_run(["report", "--db", str(db)]) == 0


# -- profile never runs code a manifest names --------------------------------------------------

PAYLOAD = "import pathlib\ndef make():\n    pathlib.Path('PWNED').write_text('x')\n    raise SystemExit(0)\n"


def _with_source(bundle: Path, source: str) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["source"] = {"model": source, "class": "X", "weights": None}
    (bundle / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("source", ["PAYLOAD:make", "os:abort", "samples.reference_vit:vit_tiny_test"])
def test_profile_does_not_import_the_manifest_source(adv_tiny, copy_of, tmp_path, capsys, monkeypatch, source):
    name = f"adv_payload_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(PAYLOAD)
    monkeypatch.chdir(tmp_path)
    bundle = copy_of(adv_tiny)
    _with_source(bundle, source.replace("PAYLOAD", name))
    code = cli_run(["profile", str(bundle), "--runs", "1", "--warmup", "0", "--db", str(tmp_path / "r.sqlite")])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "fidelity skipped" in err and "--trust-source" in err
    assert not (tmp_path / "PWNED").exists()


def test_profile_sweep_needs_trust_source(adv_tiny, copy_of, tmp_path, capsys):
    bundle = copy_of(adv_tiny)
    assert cli_run(["profile", str(bundle), "--sweep", "r=0,4", "--db", str(tmp_path / "r.sqlite"), "-q"]) == 2
    assert "pass --trust-source" in one_line(capsys.readouterr().err)


def test_source_given_by_the_user_replaces_the_manifests(adv_tiny, copy_of, tmp_path, capsys):
    bundle = copy_of(adv_tiny)
    _with_source(bundle, "os:abort")
    args = ["profile", str(bundle), "--runs", "1", "--warmup", "0", "--source", "samples.reference_vit:vit_tiny_test"]
    assert cli_run([*args, "--db", str(tmp_path / "r.sqlite"), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)["results"][0]
    assert record["fidelity"]["cosine"] > 0.5 and record["model"] == "samples.reference_vit:vit_tiny_test"


def test_trust_source_says_what_it_imports(adv_tiny, copy_of, tmp_path, capsys, monkeypatch):
    name = f"adv_payload_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(PAYLOAD.replace("raise SystemExit(0)", "return None"))
    monkeypatch.chdir(tmp_path)
    bundle = copy_of(adv_tiny)
    _with_source(bundle, f"{name}:make")
    args = ["profile", str(bundle), "--runs", "1", "--warmup", "0", "--trust-source"]
    assert cli_run([*args, "--db", str(tmp_path / "r.sqlite")]) == 0
    assert f"--trust-source: loading '{name}:make'" in capsys.readouterr().err
    assert (tmp_path / "PWNED").exists()  # it did import it: the flag is the user's decision


def _as_tdtm(bundle: Path) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["variants"] = {"merged": {"artifact": "model.onnx", "steps": [0, 5]}}
    (bundle / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("kind", ["variants", "dynamic"])
def test_profile_refuses_bundles_it_would_mislabel(adv_tiny, adv_dynamic, copy_of, tmp_path, capsys, kind):
    bundle = copy_of(adv_dynamic if kind == "dynamic" else adv_tiny)
    if kind == "variants":
        _as_tdtm(bundle)
    db = tmp_path / "r.sqlite"
    assert cli_run(["profile", str(bundle), "--runs", "1", "--warmup", "0", "--db", str(db), "-q"]) == 2
    assert "would mislabel" in one_line(capsys.readouterr().err)
    with ResultStore(db) as store:
        assert store.records() == []


def test_report_survives_malformed_rows_already_in_the_database(tmp_path, capsys):
    import sqlite3

    db = tmp_path / "r.sqlite"
    good = _record()
    with ResultStore(db) as store:
        store.add([good])
    bad = _record(breakdown={"by_layer": [1, 2]})
    with sqlite3.connect(db) as connection:  # as an older version could have stored it
        connection.execute(
            "INSERT INTO results VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            (bad["id"], bad["created"], "cpu", "m", "tome", "r=8", 8, "onnx", "t", 1, 5.0, json.dumps(bad)),
        )
    assert cli_run(["report", "--db", str(db), "--plots", str(tmp_path / "plots")]) == 0
    assert "left out 1 malformed stored result" in capsys.readouterr().err


@pytest.mark.parametrize("debug", [False, True])
def test_unexpected_errors_are_one_line_exit_70(monkeypatch, capsys, debug):
    import tome_export.devices as devices

    def broken():
        raise RuntimeError("a bug\nwith a second line")

    monkeypatch.setattr(devices, "profiles", broken)
    if debug:
        monkeypatch.setenv("TOME_EXPORT_DEBUG", "1")
    else:
        monkeypatch.delenv("TOME_EXPORT_DEBUG", raising=False)
    assert cli_run(["devices"]) == 70
    err = capsys.readouterr().err
    if debug:
        assert "Traceback" in err and "TOME_EXPORT_DEBUG=1" in err
    else:
        assert "please report it" in one_line(err) and "second line" not in err
