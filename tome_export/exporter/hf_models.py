"""``hf:PATH_OR_ID``: Hugging Face transformers models as a MODEL source.

A local folder with ``config.json`` and weights (``model.safetensors`` or a weights-only
``pytorch_model.bin``), or a hub id (downloads only when online; never with
``HF_HUB_OFFLINE=1``). No code from the folder runs (``trust_remote_code`` stays off).

The class comes from the config: its ``architectures`` entry when transformers has that
class (``ViTForImageClassification``, ``BertModel``…), else ``AutoModel``. A
sentence-transformers folder (``modules.json``) loads its transformer as ``AutoModel``.
Input declarations follow the model's ``main_input_name``: images get
``default_input_shape`` (1, channels, size, size) from the config; text models get
``default_input_shapes`` [(1, 128), (1, 128)] and ``tome_input_specs`` (token ids in the
vocabulary, a key-padding attention mask) and, with a pooler, ``tome_protected_tokens = 1``
(``[CLS]`` never merges).
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from tome_export.errors import UserError, first_line

TEXT_TOKENS = 128


class TextEncoder(nn.Module):
    """An HF text model called positionally as (input_ids, attention_mask)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask)


def _model_class(config, transformers):
    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    return transformers.AutoModel


def declare_inputs(model: nn.Module, config) -> nn.Module:
    """Set the input declarations tome-export reads (see ``inputs.py``) from an HF config."""
    main = getattr(model, "main_input_name", "pixel_values")
    if main == "input_ids":
        vocab = int(getattr(config, "vocab_size", 2))
        tokens = min(TEXT_TOKENS, int(getattr(config, "max_position_embeddings", TEXT_TOKENS)))
        wrapped = TextEncoder(model)
        wrapped.default_input_shapes = [(1, tokens), (1, tokens)]
        wrapped.tome_input_specs = [
            {"dtype": "int64", "low": 0, "high": vocab},
            {"dtype": "int64", "padding": True},
        ]
        wrapped.config = config
        # [CLS] feeds the pooler (pooler_output): keep it out of merging, as ToMe keeps a class token.
        wrapped.tome_protected_tokens = 1 if getattr(model, "pooler", None) is not None else 0
        return wrapped
    vision = getattr(config, "vision_config", config)
    size = getattr(vision, "image_size", None)
    if isinstance(size, (list, tuple)):
        size = size[0]
    if size:
        model.default_input_shape = (1, int(getattr(vision, "num_channels", 3)), int(size), int(size))
    return model


def load_hf(spec: str) -> tuple[nn.Module, str]:
    """Load ``hf:`` MODEL; returns (module, short name)."""
    try:
        import transformers
    except ImportError:
        raise UserError("hf:MODEL needs transformers: pip install 'tome-export[hf]'") from None
    folder = Path(spec)
    local = folder.is_dir()
    if local and not (folder / "config.json").is_file():
        raise UserError(f"{spec} has no config.json: give a Hugging Face model folder (save_pretrained) or a hub id")
    if not local and (spec.startswith((".", "/")) or os.sep in spec.strip("/").replace("/", "", 1)):
        raise UserError(f"hf:{spec}: no such folder (a hub id is ORG/NAME)")
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    transformers.utils.logging.disable_progress_bar()  # progress is ours, on stderr, and -q silences it
    transformers.utils.logging.set_verbosity_error()
    try:
        config = transformers.AutoConfig.from_pretrained(spec, local_files_only=local or offline)
        cls = _model_class(config, transformers)
        model = cls.from_pretrained(spec, local_files_only=local or offline)
    except (OSError, ValueError, KeyError) as exc:
        first = first_line(exc, 300)
        raise UserError(f"cannot load hf:{spec}: {first}") from None
    short = folder.name if local else spec.rsplit("/", 1)[-1]
    return declare_inputs(model.eval(), config), short
