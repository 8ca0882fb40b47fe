"""The runtime side from a deployed app's point of view: only onnxruntime + numpy installed.

Bundles of every kind (plain, plugin-lowered, dynamic-loading, TDTM variants sharing one
external weights file) are loaded and run in a subprocess where importing torch, onnx,
onnxscript or psutil raises ImportError; their outputs must equal the same bundles run
here. The plugin nodes' numpy semantics must equal the torch reference exactly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import tome_export.runtime as rt
from tests.conftest import REPO
from tome_export.bundle import BundleError
from tome_export.merging import bipartite, tomesd
from tome_export.runtimes.merge_numpy import bipartite_merge, partition, tomesd_merge

pytest_plugins = ["tests.adversarial_fixtures"]

BLOCKED = ("torch", "onnx", "onnxscript", "psutil", "onnx_ir", "transformers", "timm")

SITECUSTOMIZE = f"""
import sys

BLOCKED = {BLOCKED!r}


class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{{name}} is not installed in this deployment (blocked by the test)")
        return None


sys.meta_path.insert(0, Blocker())
"""

APP = """
import json, sys
import numpy as np
import tome_export.runtime as rt
from tome_export.bundle import BundleError

jobs = json.loads(sys.argv[1])
for job in jobs:
    feeds = dict(np.load(job["feeds"]))
    session = rt.load(job["bundle"])
    out = session.run(feeds, **job.get("kwargs", {}))
    np.savez(job["result"], **out)
leaked = [m for m in sys.modules if m.split(".")[0] in %r]
print(json.dumps({"leaked": leaked}))
"""


@pytest.fixture(scope="module")
def tdtm_bundle(tmp_path_factory) -> Path:
    from tome_export.pipeline import ExportOptions, export

    out = tmp_path_factory.mktemp("adv") / "tdtm"
    options = ExportOptions(
        model="samples.stdit:stdit_test",
        method="tdtm",
        merge_steps=5,
        num_steps=30,
        seeds=1,
        out=str(out),
    )
    export(options)
    return out


def _feeds(bundle: Path, seed: int = 0) -> dict[str, np.ndarray]:
    manifest = json.loads((bundle / "manifest.json").read_text())
    rng = np.random.default_rng(seed)
    return {
        spec["name"]: rng.standard_normal([d if isinstance(d, int) else 1 for d in spec["shape"]]).astype(spec["dtype"])
        for spec in manifest["inputs"]
    }


def test_bundles_run_with_only_onnxruntime_and_numpy(adv_tiny, adv_plugin, adv_dynamic, tdtm_bundle, tmp_path):
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(SITECUSTOMIZE)
    cases = [
        ("plain", adv_tiny, {}),
        ("plugin", adv_plugin, {}),
        ("dynamic", adv_dynamic, {}),
        ("tdtm-merged-step", tdtm_bundle, {"step": 0}),
        ("tdtm-full-step", tdtm_bundle, {"step": 29}),
    ]
    manifest = json.loads((adv_plugin / "manifest.json").read_text())
    assert "tome_export" in manifest["custom_domains"]  # really the plugin lowering
    jobs, expected = [], {}
    for name, bundle, kwargs in cases:
        feeds = _feeds(bundle)
        np.savez(tmp_path / f"{name}-feeds.npz", **feeds)
        expected[name] = rt.load(bundle).run(feeds, **kwargs)  # here, with torch and onnx around
        jobs.append(
            {
                "bundle": str(bundle),
                "feeds": str(tmp_path / f"{name}-feeds.npz"),
                "result": str(tmp_path / f"{name}-out.npz"),
                "kwargs": kwargs,
            }
        )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker), str(REPO)])}
    probe = subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True, text=True)
    assert probe.returncode != 0 and "blocked by the test" in probe.stderr  # the blocker works
    done = subprocess.run(
        [sys.executable, "-c", APP % (BLOCKED,), json.dumps(jobs)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"leaked": []}
    for name, _, _ in cases:
        got = dict(np.load(tmp_path / f"{name}-out.npz"))
        assert got.keys() == expected[name].keys()
        for key, value in expected[name].items():
            np.testing.assert_array_equal(got[key], value, err_msg=f"{name}: {key}")


def test_runtime_modules_import_nothing_heavy():
    code = "import sys, tome_export.runtime, tome_export.runtimes.dynamic, tome_export.runtimes.ort_custom_ops, "
    code += "tome_export.runtimes.ort_cuda, tome_export.runtimes.onnxruntime; "
    code += f"print([m for m in sys.modules if m.split('.')[0] in {BLOCKED!r}])"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr


def test_runtime_plugin_contract_is_the_exporters():
    """One copy of the plugin contract: the runtime and the exporter both take contract.py's."""
    from tome_export import contract
    from tome_export.exporter import plugin_lowering as exporter
    from tome_export.runtimes import ort_custom_ops as runtime

    runtime_names = {
        "PLUGIN_DOMAIN": "PLUGIN_DOMAIN",
        "PLUGIN_OP_TYPE": "BIPARTITE_OP_TYPE",
        "PLUGIN_MODES": "BIPARTITE_MODES",
        "TOMESD_OP_TYPE": "TOMESD_OP_TYPE",
        "TOMESD_ATTRIBUTES": "TOMESD_ATTRIBUTES",
    }
    for runtime_name, contract_name in runtime_names.items():
        assert getattr(runtime, runtime_name) is getattr(contract, contract_name), runtime_name
        assert getattr(exporter, contract_name) is getattr(contract, contract_name), contract_name


def test_a_broken_graph_inside_a_valid_bundle_is_one_line(adv_tiny, copy_of):
    import hashlib

    bundle = copy_of(adv_tiny)
    junk = os.urandom(2048)
    (bundle / "model.onnx").write_bytes(junk)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["artifacts"]["model.onnx"] = {"sha256": hashlib.sha256(junk).hexdigest(), "bytes": len(junk)}
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError) as info:
        rt.load(bundle).run(_feeds(bundle))
    assert "cannot load model.onnx" in str(info.value) and "\n" not in str(info.value)


# -- the plugin nodes' numpy semantics = the torch reference -----------------------------------


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 3),
    pairs=st.integers(1, 20),
    protected=st.integers(0, 2),
    dims=st.tuples(st.integers(1, 12), st.integers(1, 12)),
    data=st.data(),
)
def test_bipartite_numpy_equals_torch(batch, pairs, protected, dims, data):
    tokens = protected + 2 * pairs + data.draw(st.integers(0, 1))
    r = data.draw(st.integers(0, bipartite.max_r(tokens, protected)))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16)))
    metric = rng.standard_normal((batch, tokens, dims[0])).astype(np.float32)
    x = rng.standard_normal((batch, tokens, dims[1])).astype(np.float32)
    size = rng.uniform(1, 4, (batch, tokens, 1)).astype(np.float32)
    got = bipartite_merge(metric, x, size, r, protected)
    want = bipartite.merge_tokens(*(torch.from_numpy(v) for v in (metric, x, size)), r, protected)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w.numpy())


@settings(max_examples=25, deadline=None)
@given(
    h=st.integers(2, 8),
    w=st.integers(2, 8),
    sx=st.integers(1, 3),
    sy=st.integers(1, 3),
    seed=st.integers(-1, 5),
    data=st.data(),
)
def test_tomesd_numpy_equals_torch(h, w, sx, sy, seed, data):
    assume(sx <= w and sy <= h)  # at least one destination cell (tomesd checks this before merging)
    sources, _ = partition(h, w, sx, sy, seed)
    assert partition(h, w, sx, sy, seed) == tomesd.partition(h, w, sx, sy, seed)
    r = data.draw(st.integers(0, len(sources)))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16)))
    metric = rng.standard_normal((2, h * w, 5)).astype(np.float32)
    x = rng.standard_normal((2, h * w, 6)).astype(np.float32)
    got = tomesd_merge(metric, x, h, w, sx, sy, r, seed)
    want = tomesd.merge_tokens(torch.from_numpy(metric), torch.from_numpy(x), h, w, sx, sy, r, seed)
    for g, w_ in zip(got, want):
        np.testing.assert_array_equal(g, w_.numpy())


def test_tied_scores_break_like_topk():
    metric = np.ones((1, 9, 4), np.float32)  # every score ties
    x = np.arange(9 * 2, dtype=np.float32).reshape(1, 9, 2)
    size = np.ones((1, 9, 1), np.float32)
    got = bipartite_merge(metric, x, size, 3, 1)
    want = bipartite.merge_tokens(*(torch.from_numpy(v) for v in (metric, x, size)), 3, 1)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w.numpy())
