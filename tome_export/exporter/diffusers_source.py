"""diffusers UNets as users hold them: a raw ``UNet2DConditionModel``, or a pipeline folder.

- ``adapt(module)``: a raw ``UNet2DConditionModel`` (from a factory or a file) becomes a
  :class:`DiffusersUNet` — the same module, called as ``(sample, timestep,
  encoder_hidden_states[, text_embeds, time_ids])`` → noise tensor (its
  ``UNet2DConditionOutput`` flattened; SDXL's ``added_cond_kwargs`` as two inputs), with
  default input shapes from its config (timestep a 0-d int64 in [0, 1000)). No user wrapper.
- ``load_folder(path, component)``: a diffusers pipeline folder (``model_index.json`` +
  ``unet/``) or a UNet folder (``config.json`` naming ``UNet2DConditionModel``), loaded with
  ``from_pretrained`` (safetensors, or ``.bin`` read weights-only by diffusers).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from tome_export.errors import UserError, first_line

UNET_CLASS = "UNet2DConditionModel"
TEXT_TOKENS = 77  # CLIP's context length: what SD pipelines pass
SDXL_TIME_IDS = 6  # original size, crop top-left, target size


def is_unet(module: object) -> bool:
    return any(cls.__name__ == UNET_CLASS for cls in type(module).__mro__)


class DiffusersUNet(nn.Module):
    """A diffusers ``UNet2DConditionModel`` with tensor inputs and one tensor output."""

    def __init__(self, unet: nn.Module, batch: int = 1) -> None:
        super().__init__()
        self.unet = unet
        config = unet.config
        if config.get("class_embed_type") is not None or config.get("addition_embed_type") not in (None, "text_time"):
            raise UserError(
                f"this {UNET_CLASS} needs class labels or {config.get('addition_embed_type')!r} conditioning; "
                "tome-export handles SD-1.x/2.x and SDXL (text_time) UNets"
            )
        self.sdxl = config.get("addition_embed_type") == "text_time"
        size = config.sample_size if isinstance(config.sample_size, int) else config.sample_size[0]
        cross = config.cross_attention_dim
        cross = cross if isinstance(cross, int) else cross[0]
        self.default_input_shapes = [(batch, config.in_channels, size, size), (), (batch, TEXT_TOKENS, cross)]
        self.tome_input_specs = [None, {"dtype": "int64", "low": 0, "high": 1000}, None]
        if self.sdxl:
            text_dim = config.projection_class_embeddings_input_dim - SDXL_TIME_IDS * config.addition_time_embed_dim
            self.default_input_shapes += [(batch, text_dim), (batch, SDXL_TIME_IDS)]
            self.tome_input_specs += [None, None]

    @property
    def config(self):
        return self.unet.config

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        text_embeds: torch.Tensor | None = None,
        time_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        added = None
        if self.sdxl:
            if text_embeds is None or time_ids is None:
                raise UserError(
                    "an SDXL UNet needs 5 inputs: sample; timestep; encoder_hidden_states; text_embeds; time_ids"
                )
            added = {"text_embeds": text_embeds, "time_ids": time_ids}
        return self.unet(sample, timestep, encoder_hidden_states, added_cond_kwargs=added, return_dict=False)[0]


def adapt(module: object) -> object:
    """Wrap a raw ``UNet2DConditionModel``; anything else comes back unchanged."""
    return DiffusersUNet(module).eval() if is_unet(module) else module


def is_diffusers_folder(spec: str) -> bool:
    path = Path(spec)
    return path.is_dir() and ((path / "model_index.json").is_file() or (path / "config.json").is_file())


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path} is not readable JSON ({type(exc).__name__}); is this a diffusers folder?") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} is not a diffusers config (a JSON object)")
    return data


def _component_folder(root: Path, component: str | None) -> tuple[Path, str]:
    """(folder holding the UNet's config and weights, component name)."""
    if not (root / "model_index.json").is_file():
        if component is not None:
            raise UserError(
                f"--component applies to a diffusers pipeline folder (with model_index.json); {root} has none"
            )
        return root, root.name
    index = _read_json(root / "model_index.json")
    name = component or "unet"
    entry = index.get(name)
    if not (isinstance(entry, list) and len(entry) == 2) or not (root / name).is_dir():
        unets = [k for k, v in index.items() if isinstance(v, list) and len(v) == 2 and "UNet" in str(v[1])]
        hint = f"its UNet components: {', '.join(unets)}" if unets else "it has no UNet component"
        raise UserError(f"pipeline folder {root} has no component {name!r} ({hint}); pass --component NAME")
    if entry[1] != UNET_CLASS:
        raise UserError(
            f"component {name!r} of {root} is a {entry[1]}, not a {UNET_CLASS}; tome-export merges tokens in the "
            "UNet: use --component unet"
        )
    return root / name, name


def load_folder(spec: str, component: str | None = None) -> nn.Module:
    """The UNet of a diffusers folder, adapted (see module doc). UserError on anything else."""
    folder, name = _component_folder(Path(spec), component)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise UserError(f"{folder} has no config.json: not a diffusers model folder")
    class_name = _read_json(config_path).get("_class_name")
    if class_name != UNET_CLASS:
        raise UserError(f"{folder} holds a {class_name}, not a {UNET_CLASS}; give a UNet folder or a pipeline folder")
    try:
        from diffusers import UNet2DConditionModel
    except ImportError:
        raise UserError("diffusers folders need diffusers: pip install 'tome-export[diffusers]'") from None
    try:
        unet = UNet2DConditionModel.from_pretrained(str(folder), torch_dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load the {name} of {spec}: {first_line(exc)}") from None
    return adapt(unet.eval())
