"""Resolve a MODEL argument to an ``nn.Module``, safely by default.

- ``timm:NAME``: random init, or ``--weights FILE`` (a state dict, loaded weights-only);
- ``package.module:factory``: a callable returning an ``nn.Module`` (cwd is importable);
- ``FILE.pt``: a pickled ``nn.Module`` — refused unless ``trust_pickle``, since
  unpickling runs code from the file.
"""

from __future__ import annotations

import importlib
import os
import pickle
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from tome_export.errors import UserError


@dataclass
class LoadedModel:
    module: nn.Module
    name: str  # short name for default output paths
    source: str  # the MODEL argument as given
    default_input_shape: tuple[int, ...] | None


def default_input_shape(model: nn.Module) -> tuple[int, ...] | None:
    shape = getattr(model, "default_input_shape", None)
    if shape is not None:
        return tuple(shape)
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    if "input_size" in cfg:
        return (1, *cfg["input_size"])
    return None


def _load_state_dict(path: str) -> dict:
    file = Path(path)
    if not file.is_file():
        raise UserError(f"weights file {path} does not exist")
    if file.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise UserError("reading .safetensors needs the safetensors package: pip install safetensors") from None
        return load_file(str(file))
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(
            f"{path} is not a weights-only state dict ({type(exc).__name__}); save model.state_dict()"
        ) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise UserError(f"{path} holds a {type(state).__name__}, not a state dict")
    return state


def _from_timm(name: str, weights: str | None) -> nn.Module:
    try:
        import timm
    except ImportError:
        raise UserError("timm models need timm: pip install 'tome-export[timm]'") from None
    if name not in timm.list_models():
        raise UserError(f"timm has no model {name!r}; see timm.list_models()")
    model = timm.create_model(name, pretrained=False)
    if weights:
        try:
            model.load_state_dict(_load_state_dict(weights))
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0]
            raise UserError(f"--weights {weights} does not fit timm:{name}: {first}") from None
    return model


def _from_factory(spec: str) -> nn.Module:
    module_name, _, attr = spec.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UserError(f"cannot import {module_name!r} for MODEL {spec!r}: {exc}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise UserError(f"{module_name} has no callable {attr!r} (MODEL is package.module:callable)")
    return factory()


def _from_file(path: str, trust_pickle: bool) -> nn.Module:
    file = Path(path)
    if not file.exists():
        raise UserError(f"model file {path} does not exist")
    if not file.is_file():
        raise UserError(f"{path} is not a file")
    if not zipfile.is_zipfile(file):
        raise UserError(f"{path} is not a PyTorch file (torch.save of an nn.Module)")
    try:
        obj = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        if not trust_pickle:
            raise UserError(
                f"{path} is a pickled object; loading it runs code from the file. "
                "Pass --trust-pickle if you trust its source"
            ) from None
        try:
            obj = torch.load(file, map_location="cpu", weights_only=False)
        except Exception as exc:
            raise UserError(f"cannot unpickle {path}: {type(exc).__name__}: {exc}") from None
    except Exception:
        raise UserError(f"{path} is not a PyTorch file (torch.save of an nn.Module)") from None
    if isinstance(obj, dict):
        raise UserError(f"{path} holds a state dict, not a model: use timm:NAME --weights {path} or a factory")
    return obj


def load_model(spec: str, weights: str | None = None, trust_pickle: bool = False) -> LoadedModel:
    """Load MODEL as the CLI accepts it. Raises UserError with a one-line reason."""
    if spec.startswith("timm:"):
        name = spec[len("timm:") :]
        module, short = _from_timm(name, weights), name
    elif ":" in spec and not Path(spec).exists():
        module, short = _from_factory(spec), spec.rsplit(":", 1)[1]
    else:
        module, short = _from_file(spec, trust_pickle), Path(spec).stem
    if weights and not spec.startswith("timm:"):
        module.load_state_dict(_load_state_dict(weights))
    if not isinstance(module, nn.Module):
        raise UserError(f"MODEL {spec!r} gave a {type(module).__name__}, not a torch.nn.Module")
    module.eval()
    return LoadedModel(module, short, spec, default_input_shape(module))
