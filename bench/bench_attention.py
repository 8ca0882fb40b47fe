"""Fused attention on ONNX Runtime CPU for ToMe ViT exports: does it pay, and do we beat the peers?

Exports ViT-S/16 (samples/reference_vit.py; timm's vit_small_patch16_224 with random
weights unless ``--models reference``) at r=0 and r=16 and times, interleaved in one
process (``bench/harness.py``: warm-up, medians, ORT sessions without thread spinning):

- ``stock`` (r=0): ``torch.onnx.export(dynamo=True)`` of the unpatched model — plain ORT on
  the same model; ``stock+ort_optimizer``: the same after onnxruntime's transformer
  optimizer (``model_type="vit"``). These are the peers the r=0 export must match.
- ``plain``: the graph tome-export ships for ``--target onnx`` (ORT's session-level
  fusions only: MatMul+Add → Gemm, q·scale @ kᵀ → FusedMatMul);
- ``ort_optimizer``: ``plain`` after onnxruntime's transformer optimizer;
- ``onnxscript_ort``: ``plain`` after onnxscript's ``optimize_for_ort`` (SkipLayerNorm,
  BiasGelu, and the attention as ``com.microsoft`` MultiHeadAttention with log(size) as
  its ``attention_bias``);
- ``mha``: only onnxscript's attention fusion (SDPA → MultiHeadAttention);
- ``attention``: ``com.microsoft`` Attention with the QKV projection inside, log(size) as
  ``attention_bias`` and the keys for the merge metric from its ``present`` output — the
  candidate a tome-export pass would write (:func:`fuse_qkv_attention` below).

Then the attention alone (``--tokens``: N of merged layers; with and without the log(size)
bias; :func:`attention_subgraph`), process-CPU medians per fused op over the plain subgraph.
Reports wall and process-CPU medians (CPU time moves less with other load on a shared
machine), ratios to ``plain``, max abs error vs ``plain``, the fused nodes, and
``r0_goal``: our r=0 export's time over the best of (stock, stock+ort_optimizer) — ≤ 1.0
meets the goal. Usage:
``python bench/bench_attention.py [--runs 30] [--batch 1] [--models reference,timm] [--tokens 197,181,101,37] [--quick]``
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import tome_export  # noqa: E402
from bench.harness import emit, interleaved, log, machine, medians, ort_runner  # noqa: E402
from tome_export.exporter.onnx_export import export_onnx  # noqa: E402

FUSED_OPS = ("MultiHeadAttention", "Attention", "SkipLayerNormalization", "BiasGelu", "Gelu", "FastGelu")


def build(name: str) -> torch.nn.Module:
    if name == "reference":
        from samples.reference_vit import vit_small_patch16_224

        return vit_small_patch16_224()
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_small_patch16_224", pretrained=False).eval()


def stock_export(model: torch.nn.Module, x: torch.Tensor) -> onnx.ModelProto:
    with contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
        return torch.onnx.export(model, (x,), dynamo=True, opset_version=18, verbose=False).model_proto


def ort_optimizer(model: onnx.ModelProto, heads: int, hidden: int) -> onnx.ModelProto:
    from onnxruntime.transformers.optimizer import optimize_model

    # From a file, as its CLI runs it (given a proto it hands ORT a graph whose weights it
    # moved to external data, and the session refuses it).
    with tempfile.TemporaryDirectory() as folder, contextlib.redirect_stdout(io.StringIO()):
        path = Path(folder) / "model.onnx"
        onnx.save(model, str(path))
        return optimize_model(str(path), model_type="vit", num_heads=heads, hidden_size=hidden).model


def onnxscript_ort(model: onnx.ModelProto, mha_only: bool = False) -> onnx.ModelProto:
    import onnx_ir as ir
    from onnx_ir.passes.common import ShapeInferencePass
    from onnxscript.optimizer import optimize
    from onnxscript.rewriter.ort_fusions import optimize_for_ort
    from onnxscript.rewriter.ort_fusions.sdpa import fuse_sdpa
    from onnxscript.rewriter.ort_fusions.sdpa_via_mha import replace_sdpa_by_mha

    graph = ir.from_proto(model)
    if mha_only:
        ShapeInferencePass()(graph)
        fuse_sdpa(graph, apply_shape_inference=True)
        replace_sdpa_by_mha(graph)
        optimize(graph)
    else:
        graph, _ = optimize_for_ort(graph)
    return ir.to_proto(graph)


def fuse_qkv_attention(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Every ``softmax((q·s) @ kᵀ [+ bias]) @ v`` whose q, k, v are the packed projection
    ``Reshape(x @ W + b, (B, N, 3, H, D))`` permuted to (3, B, H, N, D) → one
    ``com.microsoft`` Attention on ``x``; a bias (log size) expanded to (B, 1, N, N); keys
    still read elsewhere (the merge metric) come from ``present[0]``. Returns (graph, count)."""
    model = onnx.shape_inference.infer_shapes(model)
    graph = model.graph
    consts = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in graph.value_info}
    producer = {out: node for node in graph.node for out in node.output}
    users: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)

    def made_by(name: str, op: str):
        node = producer.get(name)
        return node if node is not None and node.op_type == op else None

    def unpacked(name: str, index: int):  # Squeeze(Slice[index](Transpose[2,0,3,1,4](Reshape(x @ W + b))))
        squeeze = made_by(name, "Squeeze")
        piece = squeeze and made_by(squeeze.input[0], "Slice")
        perm = piece and made_by(piece.input[0], "Transpose")
        if perm is None or list(perm.attribute[0].ints) != [2, 0, 3, 1, 4]:
            return None
        slicing = [consts.get(i) for i in piece.input[1:4]]
        if any(c is None for c in slicing) or [int(c.reshape(-1)[0]) for c in slicing] != [index, index + 1, 0]:
            return None  # q, k, v must be the projection's slots 0, 1, 2 along axis 0
        reshape = made_by(perm.input[0], "Reshape")
        add = reshape and made_by(reshape.input[0], "Add")
        matmul = add and made_by(add.input[0], "MatMul")
        if matmul is None or matmul.input[1] not in consts or add.input[1] not in consts:
            return None
        return matmul, [squeeze, piece, perm, reshape, add, matmul]

    replace, dead, count = {}, set(), 0
    for softmax in [n for n in graph.node if n.op_type == "Softmax"]:
        scores, bias = made_by(softmax.input[0], "Add"), None
        if scores is not None:
            scores, bias = made_by(scores.input[0], "MatMul"), scores
        else:
            scores = made_by(softmax.input[0], "MatMul")
        mul = scores and made_by(scores.input[0], "Mul")
        key_t = scores and made_by(scores.input[1], "Transpose")
        out = users.get(softmax.output[0], [])
        if mul is None or key_t is None or len(out) != 1 or out[0].op_type != "MatMul" or mul.input[1] not in consts:
            continue
        axis = next((a.i for a in softmax.attribute if a.name == "axis"), -1)
        if consts[mul.input[1]].size != 1 or list(key_t.attribute[0].ints) != [0, 1, 3, 2] or axis not in (-1, 3):
            continue  # per-channel scale, another transpose, softmax over another axis
        back = users.get(out[0].output[0], [None])[0]
        flat = back and users.get(back.output[0], [None])[0]
        if back is None or back.op_type != "Transpose" or flat is None or flat.op_type != "Reshape":
            continue
        q, k, v = mul.input[0], key_t.input[0], out[0].input[1]
        parts = [unpacked(name, i) for i, name in enumerate((q, k, v))]
        if any(p is None for p in parts) or len({p[0].name for p in parts}) != 1:
            continue
        projection, add = parts[0][0], parts[0][1][4]
        removed = {id(n) for n in (softmax, scores, bias, mul, key_t, out[0], back, flat, *parts[0][1]) if n}
        removed |= {id(n) for p in parts for n in p[1]}
        outside = {o for n in graph.node if id(n) in removed for o in n.output if o not in (k, flat.output[0])} & (
            {o.name for o in graph.output} | {i for n in graph.node if id(n) not in removed for i in n.input}
        )
        score_shape = shapes.get(scores.output[0], [])
        if outside or len(score_shape) != 4 or min(score_shape) <= 0 or len(shapes.get(flat.output[0], [])) != 3:
            continue  # an intermediate read elsewhere, or shapes not static
        name = f"fused_attention_{count}"
        inputs = [projection.input[0], projection.input[1], add.input[1]]
        nodes = []
        if bias is not None:
            other = bias.input[1] if bias.input[0] == scores.output[0] else bias.input[0]
            target = f"{name}_bias_shape"
            shape = [score_shape[0], 1, *score_shape[2:]]
            graph.initializer.append(numpy_helper.from_array(np.array(shape, np.int64), target))
            nodes.append(helper.make_node("Expand", [other, target], [f"{name}_bias"]))
            inputs += ["", "", f"{name}_bias"]
        keep_k = [u for u in users[k] if u is not key_t]
        outputs = [flat.output[0]] + ([f"{name}_present"] if keep_k else [])
        heads = shapes[q][1]
        scale = float(consts[mul.input[1]])
        nodes.append(
            helper.make_node("Attention", inputs, outputs, name, domain="com.microsoft", num_heads=heads, scale=scale)
        )
        if keep_k:
            graph.initializer.append(numpy_helper.from_array(np.array(0, np.int64), f"{name}_key"))
            nodes.append(helper.make_node("Gather", [f"{name}_present", f"{name}_key"], [k], axis=0))
        replace[id(softmax)] = nodes
        dead |= removed
        count += 1
    kept = []
    for node in graph.node:
        kept += replace.get(id(node), [])
        if id(node) not in dead:
            kept.append(node)
    del graph.value_info[:]
    del graph.node[:]
    graph.node.extend(_topological(kept, {i.name for i in graph.input} | {i.name for i in graph.initializer}))
    if count:
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return model, count


def _topological(nodes: list, available: set[str]) -> list:
    """``nodes`` ordered so each comes after its inputs' producers (the fused node sits where
    the softmax was, after the metric's key reads)."""
    ordered, pending = [], nodes
    while pending:
        rest = [n for n in pending if not all(not i or i in available for i in n.input)]
        for node in pending:
            if node not in rest:
                ordered.append(node)
                available.update(node.output)
        if len(rest) == len(pending):
            raise RuntimeError("graph has a cycle or an input nobody makes")
        pending = rest
    return ordered


def attention_subgraph(kind: str, batch: int, tokens: int, bias: bool, heads: int = 6, head_dim: int = 64):
    """One ViT-S attention alone — x (B, N, C) → QKV projection → attention → (B, N, C), the
    keys' mean over heads (the merge metric) as a second output — written as ``kind``:
    ``plain`` (what we export), ``mha`` (MultiHeadAttention on the split projection),
    ``attention`` (com.microsoft Attention, keys from ``present``), ``attention23`` (ONNX
    Attention, opset 23). ``bias``: a (B, 1, 1, N) log-size input added to the scores."""
    dim, make = heads * head_dim, helper.make_node
    rng = np.random.default_rng(1)
    consts = {
        "W": (rng.standard_normal((dim, 3 * dim)) * 0.05).astype(np.float32),
        "b": (rng.standard_normal(3 * dim) * 0.1).astype(np.float32),
        "qkv_shape": np.array([batch, tokens, 3, heads, head_dim], np.int64),
        "out_shape": np.array([batch, tokens, dim], np.int64),
        "bias_shape": np.array([batch, 1, tokens, tokens], np.int64),
        "scale": np.array(head_dim**-0.5, np.float32),
        "zero": np.array([0], np.int64),
        "one": np.array([1], np.int64),
        "first": np.array(0, np.int64),
    }
    nodes = [make("Expand", ["log_size", "bias_shape"], ["bias"])] if bias else []
    if kind == "attention":
        inputs = ["x", "W", "b"] + (["", "", "bias"] if bias else [])
        nodes += [
            make("Attention", inputs, ["out", "present"], domain="com.microsoft", num_heads=heads),
            make("Gather", ["present", "first"], ["k"], axis=0),
        ]
    else:
        nodes += [
            make("MatMul", ["x", "W"], ["xw"]),
            make("Add", ["xw", "b"], ["qkv"]),
            make("Reshape", ["qkv", "qkv_shape"], ["qkv5"]),
            make("Transpose", ["qkv5"], ["qkv_heads"], perm=[2, 0, 3, 1, 4]),
            make("Split", ["qkv_heads"], ["q1", "k1", "v1"], axis=0, num_outputs=3),
        ]
        nodes += [make("Squeeze", [f"{t}1", "zero"], [t]) for t in "qkv"]
    if kind == "mha":
        nodes += [
            make("Split", ["qkv"], ["q3", "k3", "v3"], axis=2, num_outputs=3),
            make(
                "MultiHeadAttention",
                ["q3", "k3", "v3"] + (["", "", "bias"] if bias else []),
                ["out"],
                domain="com.microsoft",
                num_heads=heads,
            ),
        ]
    elif kind in ("plain", "attention23"):
        if kind == "plain":
            nodes += [
                make("Mul", ["q", "scale"], ["qs"]),
                make("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
                make("MatMul", ["qs", "kt"], ["scores"]),
            ]
            if bias:
                nodes.append(make("Add", ["scores", "log_size"], ["biased"]))
            nodes += [
                make("Softmax", ["biased" if bias else "scores"], ["weights"], axis=-1),
                make("MatMul", ["weights", "v"], ["heads_out"]),
            ]
        else:
            nodes.append(make("Attention", ["q", "k", "v"] + (["bias"] if bias else []), ["heads_out"]))
        nodes += [
            make("Transpose", ["heads_out"], ["tokens_out"], perm=[0, 2, 1, 3]),
            make("Reshape", ["tokens_out", "out_shape"], ["out"]),
        ]
    nodes.append(make("ReduceMean", ["k", "one"], ["metric"], keepdims=0))
    inputs = [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [batch, tokens, dim])]
    if bias:
        inputs.append(helper.make_tensor_value_info("log_size", onnx.TensorProto.FLOAT, [batch, 1, 1, tokens]))
    outputs = [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in ("out", "metric")]
    inits = [numpy_helper.from_array(v, k) for k, v in consts.items()]
    graph = helper.make_graph(nodes, kind, inputs, outputs, inits)
    opsets = [helper.make_opsetid("", 23 if kind == "attention23" else 18), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets)


def time_subgraphs(batch: int, tokens: list[int], runs: int, warmup: int) -> dict:
    """CPU-time medians of every subgraph ``kind`` per (N, bias), ratio to ``plain``, and the
    largest output difference to ``plain`` (both outputs)."""
    rng, results = np.random.default_rng(0), {}
    for n in tokens:
        for bias in (False, True):
            feeds = {"x": rng.standard_normal((batch, n, 384), np.float32)}
            if bias:
                feeds["log_size"] = np.log(rng.integers(1, 5, (batch, 1, 1, n))).astype(np.float32)
            kinds = ("plain", "mha", "attention", "attention23")
            sessions = {k: ort_runner(attention_subgraph(k, batch, n, bias)).session for k in kinds}
            got = {k: s.run(None, feeds) for k, s in sessions.items()}
            cpu = medians(
                interleaved(
                    {k: _cpu_clock(s, feeds) for k, s in sessions.items()},
                    runs,
                    warmup,
                    elapsed_s=lambda name, seconds: seconds,
                )
            )
            results[f"N{n}/{'bias' if bias else 'no_bias'}"] = {
                "plain_cpu_ms": cpu["plain"],
                "cpu_vs_plain": {k: round(cpu[k] / cpu["plain"], 3) for k in kinds[1:]},
                "max_abs_err_vs_plain": {
                    k: max(float(np.abs(a - b).max()) for a, b in zip(got[k], got["plain"])) for k in kinds[1:]
                },
            }
            log(f"subgraph N={n} bias={bias}: {results[f'N{n}/' + ('bias' if bias else 'no_bias')]['cpu_vs_plain']}")
    return results


def _cpu_clock(session, feeds):
    def run():
        start = time.process_time()
        session.run(None, feeds)
        return time.process_time() - start

    return run


def fused(model: onnx.ModelProto) -> dict[str, int]:
    ops = Counter(n.op_type for n in model.graph.node)
    return {op: ops[op] for op in FUSED_OPS if ops[op]}


def time_models(models: list[str], batch: int, runs: int, warmup: int) -> dict:
    """Every whole-model variant, interleaved: wall and CPU medians, ratios, errors, fused nodes."""
    if not models:
        return {}
    x = torch.randn(batch, 3, 224, 224)
    graphs: dict[str, onnx.ModelProto] = {}
    for model_name in models:
        for r in (0, 16):
            model = build(model_name)
            heads, hidden = model.blocks[0].attn.num_heads, model.blocks[0].norm1.normalized_shape[0]
            if r == 0:
                graphs[f"{model_name}/r0/stock"] = stock = stock_export(model, x)
                graphs[f"{model_name}/r0/stock+ort_optimizer"] = ort_optimizer(stock, heads, hidden)
            tome_export.apply(model, method="tome", r=r)
            plain = export_onnx(model, (x,)).model
            prefix = f"{model_name}/r{r}"
            graphs[f"{prefix}/plain"] = plain
            graphs[f"{prefix}/ort_optimizer"] = ort_optimizer(plain, heads, hidden)
            graphs[f"{prefix}/onnxscript_ort"] = onnxscript_ort(plain)
            graphs[f"{prefix}/mha"] = onnxscript_ort(plain, mha_only=True)
            graphs[f"{prefix}/attention"] = fuse_qkv_attention(plain)[0]
            log(f"built {prefix} graphs")
    sessions = {name: ort_runner(graph).session for name, graph in graphs.items()}
    feeds = {name: {s.get_inputs()[0].name: x.numpy()} for name, s in sessions.items()}
    outputs = {name: s.run(None, feeds[name])[0] for name, s in sessions.items()}
    cpu_ms: dict[str, list[float]] = {name: [] for name in sessions}

    def timed(name):
        def run():
            wall, cpu = time.perf_counter(), time.process_time()
            sessions[name].run(None, feeds[name])
            return time.perf_counter() - wall, time.process_time() - cpu

        return run

    def wall_keeping_cpu(name, measured):
        cpu_ms[name].append(1e3 * measured[1])
        return measured[0]

    timings = interleaved({n: timed(n) for n in sessions}, runs, warmup, elapsed_s=wall_keeping_cpu)
    results: dict = {}
    for name, graph in graphs.items():
        model_name, r, variant = name.split("/")
        plain = f"{model_name}/{r}/plain"
        wall, cpu = timings[name].median_ms, float(np.median(cpu_ms[name]))
        results.setdefault(model_name, {}).setdefault(r, {})[variant] = {
            "wall_ms": round(wall, 2),
            "cpu_ms": round(cpu, 2),
            "wall_vs_plain": round(wall / timings[plain].median_ms, 3),
            "cpu_vs_plain": round(cpu / float(np.median(cpu_ms[plain])), 3),
            "max_abs_err_vs_plain": float(np.abs(outputs[name] - outputs[plain]).max()),
            "fused_nodes": fused(graph),
        }
    for per_r in results.values():
        r0 = per_r["r0"]
        per_r["r0_goal"] = {
            f"plain_over_best_peer_{clock[:-3]}": round(
                r0["plain"][clock] / min(r0["stock"][clock], r0["stock+ort_optimizer"][clock]), 3
            )
            for clock in ("wall_ms", "cpu_ms")
        }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--models", default="reference,timm", help="'' for none (subgraphs only)")
    parser.add_argument("--tokens", default="197,181,101,37", help="N of the attention-subgraph runs; '' for none")
    parser.add_argument("--quick", action="store_true", help="reference model, N=197, 5 runs: a smoke run")
    args = parser.parse_args()
    models = ["reference"] if args.quick else [m for m in args.models.split(",") if m]
    tokens = [197] if args.quick else [int(n) for n in args.tokens.split(",") if n]
    runs, warmup = (5, 1) if args.quick else (args.runs, args.warmup)
    import onnxruntime as ort

    ort.set_default_logger_severity(3)
    emit(
        {
            "bench": "attention_onnx_cpu",
            "machine": machine(),
            "onnxruntime": ort.__version__,
            "torch": torch.__version__,
            "batch": args.batch,
            "runs": runs,
            "quick": args.quick,
            "subgraph": time_subgraphs(args.batch, tokens, runs, warmup),
            "results": time_models(models, args.batch, runs, warmup),
        }
    )


if __name__ == "__main__":
    main()
