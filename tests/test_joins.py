"""Regression tests for the joins between the package's parts (issue 9, part 1).

One schedule parser, complete registries whatever is imported first, the same manifest
entries for every target, one memory unit, one error base, per-export logs, one
dependency-free contract, explicit tables, no import cycles.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from samples.reference_vit import vit_tiny_test
from tome_export import contract
from tome_export.devices import get_device
from tome_export.errors import BackendMissing, TomeExportError, UserError, VerificationError, first_line
from tome_export.merging import METHODS, apply, merge_state
from tome_export.merging import schedule as schedules
from tome_export.options import ExportOptions

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "tome_export"
TINY = "samples.reference_vit:vit_tiny_test"


def _python(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True, timeout=300)


# -- bug 1: one schedule parser, one meaning ------------------------------------------------


@pytest.mark.parametrize(
    "schedule, expected",
    [
        ((8, 4), [8, 4, 0, 0]),  # ints: r per layer, in apply() as in insert_merges()
        ([8, 4], [8, 4, 0, 0]),
        ((8, -0.5), schedules.Schedule("linear", r=8, inflection=-0.5).requested(4)),  # float: ToMe's linear
        ("6,6,2", [6, 6, 2, 0]),
    ],
)
def test_schedule_means_the_same_in_apply_and_graph_insertion(schedule, expected):
    from tome_export.exporter.insert import insert_merges

    vit = vit_tiny_test()
    x = torch.randn(1, 3, 64, 64)
    eager = apply(copy.deepcopy(vit), schedule=schedule)
    merged = insert_merges(vit, (x,), schedule=schedule)
    with torch.no_grad():
        eager(x)
        merged(x)
    assert merge_state(eager).r_per_layer == expected
    assert merged.info()["r_per_layer"] == expected


@pytest.mark.parametrize("bad", [(8, 4.0 * 2), (8, "4"), (True, 2), (-1, 2)])
def test_schedule_rejects_what_it_cannot_read(bad):
    with pytest.raises(UserError):
        schedules.coerce(None, bad)
    with pytest.raises(UserError):
        apply(vit_tiny_test(), schedule=bad)


# -- bug 2: the lowering table is complete whatever is imported first ------------------------


@pytest.mark.parametrize("first", ["tome_export.exporter.lowerings", "tome_export.exporter.dense_lowering"])
def test_lowering_table_is_complete_whatever_is_imported_first(first):
    code = (
        "import importlib, json, sys; importlib.import_module(sys.argv[1]);"
        "from tome_export.exporter.lowerings import LOWERINGS;"
        "print(json.dumps({k: sorted(v.translations) for k, v in LOWERINGS.items()}))"
    )
    done = _python(code, first)
    assert done.returncode == 0, done.stderr[-2000:]
    table = json.loads(done.stdout.strip().splitlines()[-1])
    both = ["tome_export::bipartite_merge", "tome_export::tomesd_merge"]
    assert table == {"scatter": both, "dense": both, "plugin": both}


# -- bug 3: --target trt writes what --target onnx writes -------------------------------------


def _export(tmp_path: Path, name: str, **options) -> dict:
    from tome_export.pipeline import export

    _, manifest = export(
        ExportOptions(model=TINY, r=8, input_shape="1,3,64,64", seeds=1, out=str(tmp_path / name), **options)
    )
    return manifest


def test_trt_manifest_has_every_entry_the_onnx_target_writes(tmp_path):
    onnx_manifest = _export(tmp_path, "onnx", target="onnx", lowering="dense")
    trt_manifest = _export(tmp_path, "trt", target="trt", lowering="dense")
    assert onnx_manifest["lowering_notes"], "the dense lowering notes its cost per merge"
    missing = set(onnx_manifest) - set(trt_manifest)
    assert not missing, f"--target trt drops {sorted(missing)}"
    assert trt_manifest["lowering_notes"] == onnx_manifest["lowering_notes"]
    assert trt_manifest["rewrites"] == onnx_manifest["rewrites"]
    assert trt_manifest["verification"]["passed"] and trt_manifest["tensorrt"]["readiness"]["ready"]


def test_trt_plugin_manifest_names_its_custom_domain(tmp_path):
    manifest = _export(tmp_path, "plugin", target="trt", lowering="plugin")
    assert manifest["custom_domains"] == [contract.PLUGIN_DOMAIN]
    assert manifest["tensorrt"]["plugins"] == [contract.qualified_op(contract.BIPARTITE_OP_TYPE)]


# -- bug 4: one memory unit, named in the field -----------------------------------------------


def test_memory_budget_is_mib_for_the_weight_check_and_dynamic_loading():
    from tome_export.targets.common import check_memory_budget
    from tome_export.targets.video import resolve_budget

    device = dataclasses.replace(get_device("jetson-orin-nano"), memory_budget_mib=3)  # fp16
    assert device.memory_budget_bytes == 3 * 2**20
    assert resolve_budget(True, None, device.memory_budget_bytes) == 3 * 2**20

    class Weights(nn.Module):
        def __init__(self, floats: int) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.zeros(floats))

    exactly = Weights(3 * 2**20 // 2)  # 3 MiB at fp16
    context = dataclasses.make_dataclass("Ctx", ["device", "model"])
    assert check_memory_budget(context(device, exactly)) == 3 * 2**20
    with pytest.raises(UserError, match="3 MiB"):
        check_memory_budget(context(device, Weights(3 * 2**20 // 2 + 1)))


def test_profiles_with_the_old_field_name_are_read_as_mib(tmp_path, monkeypatch):
    from tome_export import devices

    profile = json.loads((devices.PROFILE_DIR / "cpu.json").read_text())
    profile.pop("memory_budget_mib")
    (tmp_path / "old.json").write_text(json.dumps({**profile, "name": "old", "memory_budget_mb": 512}))
    monkeypatch.setattr(devices, "PROFILE_DIR", tmp_path)
    devices.profiles.cache_clear()
    try:
        old = devices.get_device("old")
        assert old.memory_budget_mib == 512 and old.memory_budget_bytes == 512 * 2**20
        assert "memory_budget_mb" not in old.to_dict()
    finally:
        monkeypatch.undo()
        devices.profiles.cache_clear()
    shipped = [json.loads(p.read_text()) for p in devices.PROFILE_DIR.glob("*.json")]
    assert shipped and all("memory_budget_mib" in p and "memory_budget_mb" not in p for p in shipped)


# -- bug 5: one error base, exit codes, one first-line helper ----------------------------------


def test_every_error_has_the_common_base_and_its_exit_code(monkeypatch, capsys):
    from tome_export import cli, pipeline

    assert [c.exit_code for c in (UserError, VerificationError, BackendMissing)] == [2, 1, 3]
    assert all(issubclass(c, TomeExportError) for c in (UserError, VerificationError, BackendMissing))

    class Custom(TomeExportError):
        exit_code = 4

    for error in (UserError("bad"), VerificationError("off"), BackendMissing("absent"), Custom("other")):

        def fail(*args, error=error, **kwargs):
            raise error

        monkeypatch.setattr(pipeline, "export", fail)
        assert cli.run([TINY, "-q"]) == error.exit_code
        assert capsys.readouterr().err.strip() == f"error: {error}"


def test_first_line():
    assert first_line(ValueError("\n  \n  boom  \nmore")) == "boom"
    assert first_line(RuntimeError()) == "RuntimeError"
    assert first_line(KeyError("abcdef"), 3) == "'ab"


def test_first_line_is_not_reimplemented():
    offenders = [
        str(path.relative_to(REPO))
        for folder in ("tome_export", "bench")
        for path in (REPO / folder).rglob("*.py")
        if "splitlines() or [" in path.read_text()
    ]
    assert offenders == []


# -- per-export logs ----------------------------------------------------------------------------


def test_export_logs_belong_to_one_export():
    from tome_export.exporter import aten_fixes, lowerings
    from tome_export.exporter.export_log import ExportLog, recording
    from tome_export.exporter.onnx_export import export_onnx

    assert not hasattr(aten_fixes, "REWRITES") and not hasattr(lowerings, "LOWERING_NOTES")
    x = (torch.randn(1, 3, 64, 64),)
    dense = export_onnx(apply(vit_tiny_test(), r=8), x, "dense")
    assert [n["r"] for n in dense.lowering_notes] == [8, 8, 8, 8]
    scatter = export_onnx(apply(vit_tiny_test(), r=4), x, "scatter")
    assert scatter.lowering_notes == []
    outer = ExportLog()
    with recording(outer):  # an export started while another one is recording
        inner = export_onnx(apply(vit_tiny_test(), r=4), x, "dense")
    assert outer.notes == [] and [n["r"] for n in inner.lowering_notes] == [4, 4, 4, 4]
    assert [n["r"] for n in dense.lowering_notes] == [8, 8, 8, 8]


def test_export_logs_of_concurrent_exports_stay_apart():
    """Two exports in two threads append in lockstep; each log holds only its own entries."""
    import threading

    from tome_export.exporter.export_log import ExportLog, current, recording

    barrier = threading.Barrier(2)
    logs = {name: ExportLog() for name in ("a", "b")}

    def export(name: str) -> None:
        with recording(logs[name]):
            for step in range(50):
                barrier.wait()  # both exports are inside their translations at once
                current().notes.append({"export": name, "step": step})

    threads = [threading.Thread(target=export, args=(name,)) for name in logs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for name, log in logs.items():
        assert [n["export"] for n in log.notes] == [name] * 50
    assert current().notes == []  # outside any export: a fresh, throwaway log


# -- the contract -------------------------------------------------------------------------------


def test_contract_imports_nothing():
    code = (
        "import sys; sys.modules.update({m: None for m in ('torch', 'onnx', 'onnxscript', 'numpy', 'onnxruntime')});"
        "import tome_export.contract as c; print(c.qualified_op(c.BIPARTITE_OP_TYPE), c.decision_names(2))"
    )
    done = _python(code)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "tome_export::BipartiteMerge ['tome_slots_0', 'tome_slots_1']"


def test_contract_names_are_defined_once():
    """No module but the contract spells the plugin op names, decision prefix or TopK limit.

    ``targets/trt_plugin.py`` is copied alone into bundles (it cannot import the package)."""
    values = {contract.BIPARTITE_OP_TYPE, contract.TOMESD_OP_TYPE, contract.DECISION_PREFIX, contract.TRT_TOPK_MAX_K}
    found = []
    for path in PACKAGE.rglob("*.py"):
        if path.name in ("contract.py", "trt_plugin.py"):
            continue
        tree = ast.parse(path.read_text())
        docstrings = {
            id(node.body[0].value)
            for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef)) and ast.get_docstring(node) is not None
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and node.value in values and id(node) not in docstrings:
                if not isinstance(node.value, bool):
                    found.append(f"{path.relative_to(REPO)}:{node.lineno} {node.value!r}")
    assert found == []


# -- explicit tables ----------------------------------------------------------------------------


def test_method_records_carry_what_is_method_specific(tmp_path):
    from tome_export.merging.methods import method_options
    from tome_export.pipeline import export
    from tome_export.targets import TARGETS

    assert set(METHODS) == {"tome", "tomesd", "tdtm", "none"}
    assert [m.name for m in METHODS.values() if m.variants] == ["tdtm"]
    assert [m.name for m in METHODS.values() if m.graph_insertion] == ["tome"]
    cases = [
        (ExportOptions(model="m"), ("tome", "tome-r16")),
        (ExportOptions(model="m", r=0), ("none", "none")),
        (ExportOptions(model="m", schedule="8,4"), ("tome", "tome-schedule")),
        (ExportOptions(model="m", method="tomesd", ratio=0.25), ("tomesd", "tomesd-0.25")),
        (ExportOptions(model="m", method="tdtm", merge_steps=2), ("tdtm", "tdtm")),
    ]
    for options, (name, tag) in cases:
        method, opts = method_options(options)
        assert (method.name, method.output_tag(opts)) == (name, tag)
    with pytest.raises(UserError, match="--ratio applies to method 'tomesd', not 'tome'"):
        method_options(ExportOptions(model="m", ratio=0.5))
    with pytest.raises(UserError, match="does not support that yet"):  # refused before loading the model
        export(ExportOptions(model="no.such:model", method="tdtm", merge_steps=1, target="coreml"))
    assert {name for name, target in TARGETS.items() if target.variants} == {"onnx", "trt"}  # trt: engine per variant


def test_export_options_come_from_the_cli_parameters():
    from tome_export import cli

    params = cli.export_command.make_context("export", ["m"]).params  # click's defaults, as parsed
    params = {k: v for k, v in params.items() if k not in ("as_json", "quiet")}
    assert ExportOptions.from_cli(params) == ExportOptions(model="m")
    params = cli.export_command.make_context("export", ["m", "--no-verify", "--sx", "3"]).params
    options = ExportOptions.from_cli({k: v for k, v in params.items() if k not in ("as_json", "quiet")})
    assert (options.verify, options.sx, options.prop_attn) == (False, 3, True)
    with pytest.raises(TypeError):
        ExportOptions.from_cli({"model": "m", "no_such_option": 1})


def test_tables_are_not_filled_by_decorators():
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        for name in ("register_lowering", "register_translation", "register_target", "register_method"):
            assert f"def {name}" not in text and f"{name}(" not in text, f"{path}: {name}"


# -- no import cycles -----------------------------------------------------------------------------


def _import_graph() -> dict[str, set[str]]:
    """Module → modules it imports (any depth of the file, TYPE_CHECKING blocks excluded)."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for module, path in modules.items():
        tree = ast.parse(path.read_text())
        skipped = {
            id(sub)
            for node in ast.walk(tree)
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for sub in ast.walk(node)
        }
        edges = set()
        for node in ast.walk(tree):
            if id(node) in skipped:
                continue
            if isinstance(node, ast.Import):
                edges |= {resolve(alias.name) for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                edges |= {resolve(f"{node.module}.{alias.name}") for alias in node.names}
        graph[module] = {e for e in edges if e and e != module and not module.startswith(e + ".")}
    return graph


def test_no_import_cycles():
    graph = _import_graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                cycles.append(path[path.index(target) :] + [target])
            elif target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []
