"""Example inputs for export and verification, per model.

Most models take float tensors and random normal values are right. Some inputs are not
like that — a diffusion timestep is an integer in [0, 1000), token ids are integers, a
flag may need a fixed value, a timestep may be 0-dim. A model (or the factory that
builds it) declares such inputs with two optional attributes:

- ``default_input_shapes``: one shape per input, used when ``--input-shape`` is not given
  (``()`` is a 0-dim input; on the command line write ``scalar``);
- ``tome_input_specs``: one entry per input, ``None`` for random normal floats, or a dict
  ``{"dtype": "int64", "low": 0, "high": 1000}`` (uniform integers in [low, high)),
  ``{"dtype": "float32", "value": 1.0}`` (a constant), ``{"dtype": "float16"}``, or
  ``{"dtype": "int64", "padding": true}`` (an attention mask (B, N): 1 for the first
  ``length`` tokens of each row, 0 after; row 0 full, the others of random length —
  so verification covers padded batches).

An undeclared 0-dim input (``scalar``) is a diffusion timestep: an int64 in [0, 1000),
which models indexing an embedding with it need and float-timestep models accept. Declare
``{"dtype": "float32"}`` for a 0-dim input that must be a float.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from tome_export.errors import UserError


def default_input_shapes(model: nn.Module) -> list[tuple[int, ...]] | None:
    shapes = getattr(model, "default_input_shapes", None)
    return [tuple(int(d) for d in s) for s in shapes] if shapes else None


def input_specs(model: nn.Module | None) -> list[dict | None]:
    return list(getattr(model, "tome_input_specs", None) or []) if model is not None else []


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise UserError(f"tome_input_specs names an unknown dtype {name!r} (use e.g. float32, int64)")
    return dtype


def padding_mask(shape: Sequence[int], generator: torch.Generator, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """(B, N) key-padding mask: row 0 full length, other rows 1 for a random prefix of ≥ N/4 tokens."""
    if len(shape) != 2:
        raise UserError(f"a padding mask input must be (batch, tokens), got shape {tuple(shape)}")
    batch, tokens = shape
    lengths = torch.randint(max(1, tokens // 4), tokens + 1, (batch,), generator=generator)
    lengths[0] = tokens
    return (torch.arange(tokens)[None, :] < lengths[:, None]).to(dtype)


SCALAR_TIMESTEP = {"dtype": "int64", "low": 0, "high": 1000}


def make_input(shape: Sequence[int], spec: dict | None, generator: torch.Generator) -> torch.Tensor:
    if not spec and tuple(shape) == ():
        spec = SCALAR_TIMESTEP
    if not spec:
        return torch.randn(tuple(shape), generator=generator)  # a tuple: () is a 0-dim input
    dtype = _dtype(spec.get("dtype", "float32"))
    if "value" in spec:
        return torch.full(tuple(shape), spec["value"], dtype=dtype)
    if spec.get("padding"):
        return padding_mask(shape, generator, dtype)
    if not dtype.is_floating_point:
        return torch.randint(int(spec.get("low", 0)), int(spec["high"]), tuple(shape), generator=generator, dtype=dtype)
    return torch.randn(tuple(shape), generator=generator).to(dtype)


def make_inputs(model: nn.Module | None, shapes: Sequence[Sequence[int]], seed: int) -> tuple[torch.Tensor, ...]:
    """Inputs for ``model`` of these shapes; random normal floats unless the model says otherwise."""
    generator = torch.Generator().manual_seed(seed)
    specs = input_specs(model)
    return tuple(make_input(shape, specs[i] if i < len(specs) else None, generator) for i, shape in enumerate(shapes))
