"""Splitting a dense-lowered program into consecutive Core ML chunks under a weight limit.

As Apple's ml-stable-diffusion does for iOS: weights above the device profile's
per-chunk limit go into consecutive models, each piece carrying its own weights, and the
chained pieces are checked in torch against the whole program.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tome_export.targets.common import tensor_bytes, weight_bytes


@dataclass
class Chunk:
    module: nn.Module
    example_inputs: tuple[torch.Tensor, ...]
    weight_bytes: int


class ChunkModule(nn.Module):
    """One piece of a split program with its weights as its own parameters.

    ``split_module`` passes tensors read by ``get_attr`` as inputs; Core ML needs them as
    weights inside the piece, so they are bound here and only activations stay inputs."""

    def __init__(self, piece: nn.Module, weights: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.piece = piece
        self.slots: list[tuple[bool, str]] = []
        for node in piece.graph.nodes:
            if node.op != "placeholder":
                continue
            if node.name in weights:
                key = f"w{len(self.slots)}"
                value = weights[node.name]
                if value.is_floating_point():
                    self.register_parameter(key, nn.Parameter(value.detach(), requires_grad=False))
                else:
                    self.register_buffer(key, value.detach())
                self.slots.append((True, key))
            else:
                self.slots.append((False, node.name))

    def activation_names(self) -> list[str]:
        return [name for is_weight, name in self.slots if not is_weight]

    def forward(self, *activations):
        values = iter(activations)
        args = [getattr(self, name) if is_weight else next(values) for is_weight, name in self.slots]
        return self.piece(*args)


def split_into_chunks(
    program: torch.export.ExportedProgram,
    example_inputs: tuple[torch.Tensor, ...],
    limit_bytes: int,
    precision: str = "fp16",
) -> tuple[list[Chunk], float]:
    """Consecutive pieces of the program, each with ≤ ``limit_bytes`` of weights where possible.

    Nodes are cut in graph order where the running weight total would pass the limit (a
    single tensor larger than the limit gets a piece of its own). Returns the chunks and the
    max abs difference between the split program and the whole one on ``example_inputs``."""
    from torch.fx.passes.split_module import split_module

    graph_module = program.module()
    attrs = dict(graph_module.named_parameters()) | dict(graph_module.named_buffers())
    weight_of_node = {
        node.name: attrs[str(node.target)]
        for node in graph_module.graph.nodes
        if node.op == "get_attr" and str(node.target) in attrs
    }
    part_of: dict[str, int] = {}
    seen: set[str] = set()
    part, running = 0, 0
    for node in graph_module.graph.nodes:
        if node.op not in ("call_function", "call_method", "call_module"):
            continue
        new_bytes = 0
        for arg in node.all_input_nodes:
            if arg.name in weight_of_node and arg.name not in seen:
                seen.add(arg.name)
                new_bytes += tensor_bytes(weight_of_node[arg.name], precision)
        if running and running + new_bytes > limit_bytes:
            part, running = part + 1, 0
        running += new_bytes
        part_of[node.name] = part
    split = split_module(graph_module, graph_module, lambda node: part_of.get(node.name, 0), keep_original_order=True)
    names = sorted((n for n, _ in split.named_children() if n.startswith("submod_")), key=lambda n: int(n[7:]))
    captured: dict[str, tuple] = {}
    hooks = [
        getattr(split, name).register_forward_pre_hook(lambda mod, args, name=name: captured.setdefault(name, args))
        for name in names
    ]
    with torch.no_grad():
        split_out = split(*example_inputs)
        whole_out = graph_module(*example_inputs)
    for hook in hooks:
        hook.remove()

    def first(v):
        return v[0] if isinstance(v, (tuple, list)) else v

    split_err = float((first(split_out) - first(whole_out)).abs().max())
    chunks = []
    for name in names:
        piece = getattr(split, name)
        placeholders = [n.name for n in piece.graph.nodes if n.op == "placeholder"]
        args = dict(zip(placeholders, captured[name]))
        weights = {key: value for key, value in args.items() if key in weight_of_node}
        module = ChunkModule(piece, weights)
        activations = tuple(args[key] for key in module.activation_names())
        chunks.append(Chunk(module, activations, weight_bytes(module, precision)))
    return chunks, split_err
