"""Re-propagating shapes after merges were inserted into a static-shape graph.

A static-shape export bakes the token count into ``view``/``reshape``/``expand`` sizes, so
after insertion every node downstream of a merge is revisited in order: size arguments
that carried the old token count are rewritten (registry ``SIZE_FIXERS``) and the node is
re-run on fake tensors, which refreshes ``meta["val"]``. A node that cannot follow the
new token count (a constant of token length, a split along tokens) is refused by name.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence

import torch
from torch import fx
from torch.fx.node import map_arg

from tome_export.errors import UserError, first_line
from tome_export.exporter.graph_rewrite import INSERTED

aten = torch.ops.aten


def _view_groups(old_in: Sequence[int], old_out: Sequence[int]) -> list[tuple[list[int], list[int]]]:
    """Split a view into groups of input and output dims with equal products."""
    groups, i, j = [], 0, 0
    while i < len(old_in) or j < len(old_out):
        gi, gj = [], []
        pa = pb = 1
        if i < len(old_in):
            gi.append(i)
            pa = old_in[i]
            i += 1
        if j < len(old_out):
            gj.append(j)
            pb = old_out[j]
            j += 1
        while pa != pb:
            if (pa < pb and i < len(old_in)) or j >= len(old_out):
                if i >= len(old_in):
                    raise ValueError("view sizes do not match")
                gi.append(i)
                pa *= old_in[i]
                i += 1
            else:
                gj.append(j)
                pb *= old_out[j]
                j += 1
        groups.append((gi, gj))
    return groups


def _fix_view(node, new_in, old_in, old_out, base_tokens):
    new_out = list(old_out)
    for gi, gj in _view_groups(old_in, old_out):
        old_prod, new_prod = math.prod(old_in[d] for d in gi), math.prod(new_in[d] for d in gi)
        if old_prod == new_prod:
            continue
        if len(gj) == 1:
            new_out[gj[0]] = new_prod
            continue
        # A group like (B·N) → (B, N): the token-length output dim takes the change.
        fits = [j for j in gj if old_out[j] == base_tokens and (old_out[j] * new_prod) % old_prod == 0]
        if len(fits) != 1:
            raise UserError(
                f"graph-level merging cannot adapt {node.name} ({node.target}) from shape {tuple(old_out)} "
                "to the merged token count: it splits or mixes the token dimension"
            )
        new_out[fits[0]] = old_out[fits[0]] * new_prod // old_prod
    return (node.args[0], new_out, *node.args[2:])


def _fix_expand(node, new_in, old_in, old_out, base_tokens):
    sizes = list(node.args[1])
    offset = len(sizes) - len(old_in)
    for q, (old, new) in enumerate(zip(old_in, new_in)):
        if old != new and sizes[q + offset] == old:
            sizes[q + offset] = new
    return (node.args[0], sizes, *node.args[2:])


def _fix_slice(node, new_in, old_in, old_out, base_tokens):
    args = list(node.args) + [0, None, None, 1][len(node.args) - 1 :]
    dim = args[1] % len(old_in)
    old, new = old_in[dim], new_in[dim]
    if old == new:
        return node.args
    start, end = args[2] or 0, args[3]
    to_end = end is None or end >= old
    if end is not None and end >= old:
        end = new if end == old else end  # to the end, whatever the length
    if (start >= 0 and start >= new) or (not to_end and 0 <= end and end > new):
        raise UserError(f"graph-level merging: {node.name} slices tokens {start}:{end} past the merged length {new}")
    args[3] = end
    return tuple(args[: max(len(node.args), 4)])


def _fix_select(node, new_in, old_in, old_out, base_tokens):
    dim, index = node.args[1] % len(old_in), node.args[2]
    if index >= 0 and index >= new_in[dim]:
        raise UserError(f"graph-level merging: {node.name} selects token {index} of only {new_in[dim]} after merging")
    return node.args


def _refuse_along_tokens(dim_position: int, default_dim: int = 0):
    def fix(node, new_in, old_in, old_out, base_tokens):
        dim = node.args[dim_position] if len(node.args) > dim_position else node.kwargs.get("dim", default_dim)
        dim %= len(old_in)
        if old_in[dim] != new_in[dim]:
            raise UserError(
                f"graph-level merging cannot follow {node.name} ({node.target}): it splits the token "
                f"dimension into fixed pieces; merge only before this point (--schedule) or use an eager patcher"
            )
        return node.args

    return fix


FixFn = Callable[..., tuple]
# Ops whose arguments carry sizes; each fixer returns new args for the merged token count.
SIZE_FIXERS: dict[object, FixFn] = {
    aten.view.default: _fix_view,
    aten.reshape.default: _fix_view,
    aten._unsafe_view.default: _fix_view,
    aten.expand.default: _fix_expand,
    aten.slice.Tensor: _fix_slice,
    aten.select.int: _fix_select,
    aten.narrow.default: _refuse_along_tokens(1),
    aten.unflatten.int: _refuse_along_tokens(1),
    aten.split.Tensor: _refuse_along_tokens(2),
    aten.split_with_sizes.default: _refuse_along_tokens(2),
    aten.chunk.default: _refuse_along_tokens(2),
    aten.unbind.int: _refuse_along_tokens(1),
}


def _rerun(gm: fx.GraphModule, node: fx.Node, env: dict, old_shapes: dict, base_tokens: int):
    """Fix ``node``'s size arguments if its input changed shape, then run it on fakes."""
    first = node.args[0] if node.args else None
    if (
        node.op == "call_function"
        and not node.meta.get(INSERTED)
        and node.target in SIZE_FIXERS
        and isinstance(first, fx.Node)
        and first in old_shapes
        and tuple(env[first].shape) != old_shapes[first]
    ):
        fix = SIZE_FIXERS[node.target]
        node.args = fix(node, tuple(env[first].shape), old_shapes[first], old_shapes.get(node, ()), base_tokens)
    args = map_arg(node.args, env.__getitem__)
    kwargs = map_arg(node.kwargs, env.__getitem__)
    target = gm.get_submodule(node.target) if node.op == "call_module" else node.target
    return target(*args, **kwargs)


def repropagate(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor], old_shapes: dict, base_tokens: int) -> None:
    """Re-run every node on fake tensors in order, rewriting token-count size arguments.

    ``old_shapes`` maps nodes to their shape before insertion; a node whose first input
    changed shape has its size arguments rewritten by ``SIZE_FIXERS``. ``meta["val"]``
    ends up describing the merged graph."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    env: dict[fx.Node, object] = {}
    inputs = iter(example_inputs)
    # The fake-tensor dispatcher logs a traceback for every failing op; the refusal below
    # is the one line the user needs.
    fake_log = logging.getLogger("torch._subclasses.fake_tensor")
    level = fake_log.level
    fake_log.setLevel(logging.CRITICAL)
    try:
        _run_nodes(gm, env, inputs, mode, old_shapes, base_tokens)
    finally:
        fake_log.setLevel(level)
    gm.recompile()


def _run_nodes(gm, env, inputs, mode, old_shapes, base_tokens) -> None:
    with mode:
        for node in gm.graph.nodes:
            if node.op == "placeholder":
                env[node] = mode.from_tensor(next(inputs))
            elif node.op == "get_attr":
                attr = gm
                for part in str(node.target).split("."):
                    attr = getattr(attr, part)
                env[node] = mode.from_tensor(attr) if isinstance(attr, torch.Tensor) else attr
            elif node.op in ("call_function", "call_module"):
                try:
                    env[node] = _rerun(gm, node, env, old_shapes, base_tokens)
                except UserError:
                    raise
                except Exception as exc:
                    hint = (
                        " (a tensor sized for the unmerged tokens, e.g. rotary or relative position embeddings)"
                        if "broadcast" in str(exc)
                        else ""
                    )
                    raise UserError(
                        f"graph-level merging cannot adapt node {node.name} ({node.target}) to the merged "
                        f"token count{hint}: {first_line(exc, 200)}"
                    ) from None
                node.meta["val"] = env[node]
