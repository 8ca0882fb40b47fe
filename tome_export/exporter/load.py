"""Resolve a MODEL argument to an ``nn.Module``, safely by default.

- ``timm:NAME``: random init, or ``--weights FILE`` (a state dict, loaded weights-only);
- ``package.module:factory``: a callable returning an ``nn.Module`` (cwd is importable);
- ``FILE.pt``: a pickled ``nn.Module`` — refused unless ``trust_pickle``, since
  unpickling runs code from the file;
- ``FILE.pt2``: a ``torch.export.save`` archive → an ``ExportedProgram``. Its graph is JSON
  and its tensors raw bytes; the archive is checked first for the parts that
  ``torch.export.load`` would unpickle (tensor subclasses, script/opaque objects, legacy
  ``.pt`` members, sample inputs that need full unpickling), refused unless ``trust_pickle``.
"""

from __future__ import annotations

import importlib
import io
import json
import os
import pickle
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from tome_export.errors import UserError, first_line


class ExportedModule(nn.Module):
    """The runnable module of a loaded ``.pt2``; frozen in inference mode."""

    def __init__(self, program: torch.export.ExportedProgram) -> None:
        super().__init__()
        self.graph_module = program.module()

    def forward(self, *args, **kwargs):
        return self.graph_module(*args, **kwargs)

    def train(self, mode: bool = True) -> ExportedModule:
        # ExportedProgram.module() refuses train()/eval(); the graph is inference-only anyway.
        self.training = mode
        return self


@dataclass
class LoadedModel:
    module: nn.Module
    name: str  # short name for default output paths
    source: str  # the MODEL argument as given
    default_input_shape: tuple[int, ...] | None
    program: torch.export.ExportedProgram | None = None  # set for a .pt2 MODEL


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
    # Seeded: without --weights the same MODEL must give the same random weights every
    # time, or sweeps, tune and fidelity checks would compare different models.
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False)
    if weights:
        try:
            model.load_state_dict(_load_state_dict(weights))
        except Exception as exc:  # RuntimeError for missing/unexpected keys and size mismatches
            raise UserError(f"--weights {weights} does not fit timm:{name}: {_error_summary(exc)}") from None
    return model


def _from_factory(spec: str) -> nn.Module:
    module_name, _, attr = spec.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UserError(f"cannot import {module_name!r} for MODEL {spec!r}: {exc}") from None
    except (Exception, SystemExit) as exc:  # a syntax error or an exception raised while importing it
        raise UserError(f"importing {module_name!r} for MODEL {spec!r} failed: {_error_summary(exc)}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise UserError(f"{module_name} has no callable {attr!r} (MODEL is package.module:callable)")
    try:
        return factory()
    except (Exception, SystemExit) as exc:
        raise UserError(f"MODEL factory {spec!r} raised {_error_summary(exc)}; fix the factory") from None


def _error_summary(exc: BaseException) -> str:
    """``"ZeroDivisionError: division by zero"``: a user's code failed, so name the exception too."""
    text = first_line(exc, 300)
    return text if text == type(exc).__name__ else f"{type(exc).__name__}: {text}"


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


def _pt2_pickled_members(archive: zipfile.ZipFile) -> list[str]:
    """Members of a .pt2 archive that ``torch.export.load`` would unpickle."""
    unsafe = []
    for name in archive.namelist():
        if name.endswith(("_weights_config.json", "_constants_config.json")):
            for fqn, payload in json.loads(archive.read(name)).get("config", {}).items():
                kind = payload.get("path_name", "")
                if payload.get("use_pickle") or kind.startswith(("custom_obj_", "opaque_obj_")):
                    unsafe.append(fqn)
        elif name.endswith(".pt"):  # sample inputs or legacy weights: must load weights-only
            try:
                torch.load(io.BytesIO(archive.read(name)), map_location="cpu", weights_only=True)
            except Exception:
                unsafe.append(name.split("/", 1)[-1])
    return unsafe


def _from_pt2(path: str, trust_pickle: bool) -> torch.export.ExportedProgram:
    file = Path(path)
    if not file.is_file():
        raise UserError(f"model file {path} does not exist")
    try:
        with zipfile.ZipFile(file) as archive:
            # Every member's CRC first: torch's reader does not check them, and a flipped
            # byte in the weights would export (and "verify") a different model.
            corrupt = archive.testzip()
            if corrupt is not None:
                raise UserError(f"{path} is corrupt: member {corrupt} fails its CRC check; save the archive again")
            unsafe = _pt2_pickled_members(archive)
    except UserError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, KeyError, TypeError, AttributeError, OSError) as exc:
        # ValueError covers malformed JSON and non-UTF-8 metadata (UnicodeDecodeError)
        raise UserError(
            f"{path} is not a readable torch.export archive ({_error_summary(exc)}); save one with torch.export.save"
        ) from None
    if unsafe and not trust_pickle:
        raise UserError(
            f"{path} holds pickled objects ({', '.join(unsafe[:3])}); loading them runs code from the file. "
            "Pass --trust-pickle if you trust its source"
        )
    from tome_export.merging import ops  # noqa: F401  (graphs may hold tome_export ops)

    try:
        return torch.export.load(str(file))
    except Exception as exc:
        raise UserError(f"cannot load {path} with torch.export.load: {first_line(exc)}") from None


def program_input_shape(program: torch.export.ExportedProgram) -> tuple[int, ...] | None:
    """The static shape of a program's only tensor input, if it has exactly one."""
    specs = [s for s in program.graph_signature.input_specs if s.kind == s.kind.USER_INPUT]
    nodes = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    shapes = []
    for spec in specs:
        value = nodes[spec.arg.name].meta.get("val") if hasattr(spec.arg, "name") else None
        if not isinstance(value, torch.Tensor):
            return None
        try:
            shapes.append(tuple(int(d) for d in value.shape))
        except TypeError:  # a dynamic dimension
            return None
    return shapes[0] if len(shapes) == 1 else None


def load_model(spec: str, weights: str | None = None, trust_pickle: bool = False) -> LoadedModel:
    """Load MODEL as the CLI accepts it. Raises UserError with a one-line reason."""
    if spec.endswith(".pt2") and (Path(spec).exists() or ":" not in spec):
        if weights:
            raise UserError("--weights does not apply to a .pt2 archive: it carries its own weights")
        program = _from_pt2(spec, trust_pickle)
        return LoadedModel(ExportedModule(program), Path(spec).stem, spec, program_input_shape(program), program)
    if spec.startswith("timm:"):
        name = spec[len("timm:") :]
        module, short = _from_timm(name, weights), name
    elif ":" in spec and not Path(spec).exists():
        module, short = _from_factory(spec), spec.rsplit(":", 1)[1]
    else:
        module, short = _from_file(spec, trust_pickle), Path(spec).stem
    if not isinstance(module, nn.Module):
        raise UserError(f"MODEL {spec!r} gave a {type(module).__name__}, not a torch.nn.Module")
    if weights and not spec.startswith("timm:"):
        state = _load_state_dict(weights)
        try:
            module.load_state_dict(state)
        except Exception as exc:
            raise UserError(f"--weights {weights} does not fit MODEL {spec!r}: {_error_summary(exc)}") from None
    module.eval()
    return LoadedModel(module, short, spec, default_input_shape(module))
