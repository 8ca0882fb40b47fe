"""Tracer pass: rewrite foreign token-merging code in a torch.export graph before ONNX.

Models patched by other people's code (tomesd from PyPI, the official ToMe patch, a
hand-written merge) reach the exporter as plain ATen graphs. Some of their ops export
wrongly — ``scatter_reduce(reduce="mean")`` becomes an overwrite in onnxscript's table,
``include_self=False`` is mishandled — so this pass rewrites them, in the
``ExportedProgram`` graph and every nested graph (``torch.no_grad()`` regions become
``wrap_with_set_grad_enabled`` subgraphs), into exact ATen equivalents that every
exporter translates correctly:

- ``scatter_reduce`` sum/mean → ``scatter_add`` of the values and of a count of writes
  per position, ``where`` for positions nothing was written to, a divide for mean;
- ``scatter_reduce`` prod/amax/amin with ``include_self=False`` → the same op with
  ``include_self=True`` from a start tensor holding the reduction's identity where
  something is written (ONNX ScatterElements mul/max/min);
- ``sort``/``argsort`` with ``stable=False`` (ToMe's and tomesd's edge ordering) → the
  stable variant: ties in an unstable sort may come in any order, and the stable order is
  the one ONNX TopK produces (lower index first), so the rewritten graph says what the
  exported graph does.

Eager side of the same decision: :func:`stable_sorts` runs eager code with every
unstable sort/argsort/topk made stable, so the eager reference breaks exact ties the way
the exported graph does (verification uses it; see docs/diffusion.md, "Exact ties").

Each rewrite is reported (node, op, what it became). What cannot be rewritten exactly —
``mean`` over an integer tensor (PyTorch floors), an unknown reduction — is refused with
a :class:`UserError` naming the node.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import fx
from torch.overrides import TorchFunctionMode

from tome_export.errors import UserError

aten = torch.ops.aten

Rewriter = Callable[[fx.Graph, fx.Node], "dict | None"]


def _fake(value):
    return value.meta["val"] if isinstance(value, fx.Node) else value


def _emit(graph: fx.Graph, origin: fx.Node, target, *args, **kwargs) -> fx.Node:
    """Insert ``target(*args)`` before ``origin`` with its fake value computed, as export does."""
    node = graph.call_function(target, args, kwargs)
    fake_mode = origin.meta["val"].fake_mode
    with fake_mode:
        node.meta["val"] = target(*[_fake(a) for a in args], **{k: _fake(v) for k, v in kwargs.items()})
    for key in ("nn_module_stack", "stack_trace", "source_fn_stack", "torch_fn"):
        if key in origin.meta:
            node.meta[key] = origin.meta[key]
    return node


def _where_it(node: fx.Node) -> str:
    trace = (node.meta.get("stack_trace") or "").strip().splitlines()
    return f" ({trace[-1].strip()})" if trace else ""


_IDENTITY = {"prod": 1, "amax": -math.inf, "amin": math.inf}


def _identity(reduce: str, dtype: torch.dtype):
    value = _IDENTITY[reduce]
    if dtype.is_floating_point or value == 1:
        return value
    info = torch.iinfo(dtype)  # integer max/min: their exact identities
    return info.min if reduce == "amax" else info.max


def _scatter_reduce(graph: fx.Graph, node: fx.Node) -> dict | None:
    start, dim, index, src, reduce = node.args[:5]
    include_self = bool(node.kwargs.get("include_self", node.args[5] if len(node.args) > 5 else True))
    dtype = node.meta["val"].dtype
    if reduce not in ("sum", "mean", "prod", "amax", "amin"):
        raise UserError(f"node {node.name}: scatter_reduce reduce={reduce!r} has no exact rewrite{_where_it(node)}")
    if reduce == "mean" and not dtype.is_floating_point:
        raise UserError(
            f"node {node.name}: scatter_reduce mean over {dtype} rounds down in PyTorch and has no exact ONNX "
            f"form; cast the tensor to float before merging{_where_it(node)}"
        )
    if dtype == torch.bool:
        raise UserError(f"node {node.name}: scatter_reduce over bool tensors is not rewritten{_where_it(node)}")
    if reduce in ("prod", "amax", "amin") and include_self:
        return None  # ScatterElements(mul/max/min) is exact: aten_fixes translates it
    with graph.inserting_before(node):
        zeros = _emit(graph, node, aten.zeros_like.default, start)
        ones = _emit(graph, node, aten.ones_like.default, src)
        counts = _emit(graph, node, aten.scatter_add.default, zeros, dim, index, ones)
        written = _emit(graph, node, aten.gt.Scalar, counts, 0)
        if reduce in ("sum", "mean"):
            begin = start if include_self else _emit(graph, node, aten.where.self, written, zeros, start)
            sums = _emit(graph, node, aten.scatter_add.default, begin, dim, index, src)
            if reduce == "sum":
                out, became = sums, "scatter_add"
            else:
                denominator = _emit(graph, node, aten.add.Tensor, counts, 1) if include_self else counts
                divided = _emit(graph, node, aten.div.Tensor, sums, denominator)
                out = _emit(graph, node, aten.where.self, written, divided, start)
                became = "scatter_add of values and of write counts, div, where"
            if not include_self and reduce == "sum":
                became += " from a where-masked start"
        else:
            identity = _emit(graph, node, aten.full_like.default, start, _identity(reduce, dtype))
            begin = _emit(graph, node, aten.where.self, written, identity, start)
            out = _emit(graph, node, aten.scatter_reduce.two, begin, dim, index, src, reduce, include_self=True)
            became = (
                f"scatter_reduce({reduce}, include_self=True) from a where-masked start (identity {identity.args[1]})"
            )
    node.replace_all_uses_with(out)
    graph.erase_node(node)
    return {"op": "aten.scatter_reduce.two", "reduce": reduce, "include_self": include_self, "became": became}


def _unstable_sort(graph: fx.Graph, node: fx.Node) -> dict | None:
    if node.target in (aten.sort.stable, aten.argsort.stable) and node.kwargs.get("stable"):
        return None
    x = node.args[0]
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", -1)
    descending = node.args[2] if len(node.args) > 2 else node.kwargs.get("descending", False)
    name = "sort" if node.target in (aten.sort.default, aten.sort.stable) else "argsort"
    stable_op = aten.sort.stable if name == "sort" else aten.argsort.stable
    node.target, node.args, node.kwargs = stable_op, (x,), {"stable": True, "dim": dim, "descending": descending}
    return {
        "op": f"aten.{name}",
        "became": f"{name}(stable=True): ties in ONNX TopK order (lower index first); "
        "eager PyTorch's unstable order may differ on exact ties",
    }


def _masked_sdpa(graph: fx.Graph, node: fx.Node) -> dict | None:
    """An SDPA with an explicit mask (relative position bias, padding) → its math.

    torch.onnx decomposes a masked SDPA with strides that the following reshape cannot
    view (BEiT, HF models with padding masks fail to export); softmax(q·kᵀ·scale + mask)·v
    is what SDPA computes."""
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    call = {**dict(zip(names, node.args)), **node.kwargs}
    mask = call.get("attn_mask")
    if not isinstance(mask, fx.Node) or call.get("dropout_p") or call.get("is_causal") or call.get("enable_gqa"):
        return None
    q, k, v = call["query"], call["key"], call["value"]
    scale = call.get("scale") or q.meta["val"].shape[-1] ** -0.5
    with graph.inserting_before(node):
        logits = _emit(graph, node, aten.matmul.default, q, _emit(graph, node, aten.transpose.int, k, -2, -1))
        logits = _emit(graph, node, aten.mul.Tensor, logits, scale)
        if mask.meta["val"].dtype == torch.bool:  # True = may attend
            zero = _emit(graph, node, aten.scalar_tensor.default, 0.0)
            blocked = _emit(graph, node, aten.scalar_tensor.default, -math.inf)
            mask = _emit(graph, node, aten.where.self, mask, zero, blocked)
        logits = _emit(graph, node, aten.add.Tensor, logits, mask)
        out = _emit(graph, node, aten.matmul.default, _emit(graph, node, aten.softmax.int, logits, -1), v)
    node.replace_all_uses_with(out)
    graph.erase_node(node)
    return {"op": "aten.scaled_dot_product_attention", "became": "softmax(q·kᵀ·scale + mask)·v"}


# ATen overload → its rewriter, in the order the rewriters run (merge arithmetic, sorts, masked SDPA).
REWRITERS: dict[object, Rewriter] = {
    aten.scatter_reduce.two: _scatter_reduce,
    **{t: _unstable_sort for t in (aten.sort.default, aten.argsort.default, aten.sort.stable, aten.argsort.stable)},
    aten.scaled_dot_product_attention.default: _masked_sdpa,
}


def _graphs(program: torch.export.ExportedProgram) -> list[fx.GraphModule]:
    return [m for m in program.graph_module.modules() if isinstance(m, fx.GraphModule)]


def rewrite_program(program: torch.export.ExportedProgram) -> list[dict]:
    """Rewrite ``program`` in place; returns one record per rewritten node.

    One rewriter after another (the table's order: merge arithmetic first, then sorts),
    each over every graph, so the records come grouped by kind."""
    rewrites, changed = [], set()
    modules = _graphs(program)
    for rewriter in dict.fromkeys(REWRITERS.values()):
        for module in modules:
            for node in list(module.graph.nodes):
                if node.op != "call_function" or REWRITERS.get(node.target) is not rewriter:
                    continue
                name = node.name
                record = rewriter(module.graph, node)
                if record is not None:
                    rewrites.append({"pass": "tracer", "node": name, **record})
                    changed.add(module)
    for module in changed:
        module.graph.lint()
        module.recompile()
    return rewrites


# -- the eager side: unstable sorts made stable while verifying -------------------------

_SORTS = {torch.sort, torch.Tensor.sort, torch.argsort, torch.Tensor.argsort}
_TOPKS = {torch.topk, torch.Tensor.topk}


def _sort_args(args: tuple, kwargs: dict) -> tuple[torch.Tensor, int, bool]:
    x, rest = args[0], list(args[1:])
    dim = rest.pop(0) if rest else kwargs.get("dim", -1)
    descending = rest.pop(0) if rest else kwargs.get("descending", False)
    return x, int(dim), bool(descending)


@dataclass
class StableSortCounts:
    """What :func:`stable_sorts` saw: sorts it made stable, and how many of them the
    unstable kernel would have ordered differently (exact ties in different order)."""

    made_stable: int = 0
    tie_order_changed: int = 0


class _StableSorts(TorchFunctionMode):
    def __init__(self, counts: StableSortCounts) -> None:
        super().__init__()
        self.counts = counts

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in _SORTS and not kwargs.get("stable") and isinstance(args[0], torch.Tensor):
            x, dim, descending = _sort_args(args, kwargs)
            unstable = func(x, dim=dim, descending=descending)
            stable = func(x, dim=dim, descending=descending, stable=True)
            self._count(unstable, stable)
            return stable
        if func in _TOPKS and isinstance(args[0], torch.Tensor):
            # ONNX TopK puts equal values lower index first: the stable sort's prefix.
            x, rest = args[0], list(args[1:])
            k = rest.pop(0) if rest else kwargs["k"]
            dim = rest.pop(0) if rest else kwargs.get("dim", -1)
            largest = rest.pop(0) if rest else kwargs.get("largest", True)
            values, indices = torch.sort(x, dim=dim, descending=bool(largest), stable=True)
            picked = values.narrow(dim, 0, int(k)), indices.narrow(dim, 0, int(k))
            unstable = func(*args, **kwargs)
            self._count(unstable.indices, picked[1])
            return torch.return_types.topk(picked)
        return func(*args, **kwargs)

    def _count(self, unstable, stable) -> None:
        unstable = unstable if isinstance(unstable, torch.Tensor) else unstable[1]  # (values, indices)
        stable = stable if isinstance(stable, torch.Tensor) else stable[1]
        self.counts.made_stable += 1
        self.counts.tie_order_changed += int(not torch.equal(unstable, stable))


@contextlib.contextmanager
def stable_sorts() -> Iterator[StableSortCounts]:
    """Within the block, ``sort``/``argsort`` with ``stable=False`` and ``topk`` return the
    stable order (equal values lower index first) — what the exported graph computes
    after :func:`_unstable_sort`. An unstable sort may order exact ties any way, so this
    is one of the results eager could give; it makes the eager reference deterministic."""
    counts = StableSortCounts()
    with _StableSorts(counts):
        yield counts


def rewritten_targets() -> list[str]:
    return sorted(str(t) for t in REWRITERS)


# -- ONNX translation of what the rewrites emit ----------------------------------------


def _sort_stable_onnx(x, stable: bool = False, dim: int = -1, descending: bool = False):
    """aten.sort.stable → TopK over the whole axis: ONNX TopK orders ties lower index first."""
    from onnxscript import opset18 as op

    length = int(x.shape[dim])
    values, indices = op.TopK(x, op.Constant(value_ints=[length]), axis=dim, largest=int(descending), sorted=1)
    return values, indices


def translation_table() -> dict:
    """ATen overloads the rewritten graphs contain that onnxscript does not translate."""
    return {aten.sort.stable: _sort_stable_onnx}
