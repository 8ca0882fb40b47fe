"""A model's outputs as named tensors: tensors, tuples, dicts, ``ModelOutput`` and dataclasses.

Dependency-free (torch only) so the patcher, the ONNX export and verification all flatten
outputs the same way without importing each other.
"""

from __future__ import annotations

import dataclasses

import torch


def flatten_outputs(value, prefix: str = "") -> list[tuple[str, torch.Tensor]]:
    """A model's outputs as (name, tensor) pairs, in order.

    A tensor alone is ``output``; tuples/lists name items ``output_0``…; dicts and
    ``ModelOutput``/dataclasses keep their field names (``logits``, ``last_hidden_state``),
    nested names joined by ``.``; ``None`` fields are skipped (as ``ModelOutput`` does)."""
    if isinstance(value, torch.Tensor):
        return [(prefix or "output", value)]
    if isinstance(value, dict):  # ModelOutput is an OrderedDict of its non-None fields
        items = [(str(k), v) for k, v in value.items()]
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        items = [(f.name, getattr(value, f.name)) for f in dataclasses.fields(value)]
    elif isinstance(value, (tuple, list)):
        if len(value) == 1 and not prefix:
            return flatten_outputs(value[0], prefix)
        items = [(f"{prefix or 'output'}_{i}" if not prefix else str(i), v) for i, v in enumerate(value)]
        if not prefix:
            return [pair for name, v in items for pair in flatten_outputs(v, name)]
    elif value is None:
        return []
    else:
        raise TypeError(f"model output of type {type(value).__name__} is not a tensor, tuple, dict or dataclass")
    return [pair for name, v in items for pair in flatten_outputs(v, f"{prefix}.{name}" if prefix else name)]


def output_names(value) -> list[str]:
    """Names of a model's flattened outputs (see :func:`flatten_outputs`)."""
    return [name for name, _ in flatten_outputs(value)]


__all__ = ["flatten_outputs", "output_names"]
