"""Small random-weight Hugging Face transformers models, for tests and examples.

Every factory builds its model from a config (no download), seeded, in eval mode, with
2 layers and hidden size 32–64; ``attn`` picks the attention implementation ("sdpa" or
"eager"). Text models declare ``default_input_shapes`` and ``tome_input_specs`` (token
ids; an attention mask with trailing padding) so ``tome-export samples.hf_small:bert``
runs as is. ``tome-export hf:FOLDER`` does the same for a saved model folder.
"""

from __future__ import annotations

import torch

IMAGE = 32  # pixels; patch 4 → 64 patches
TEXT_TOKENS = 24


def _seeded(build):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = build()
        for p in model.parameters():  # no zero biases or unit norms: every parameter matters
            p.data += 0.02 * torch.randn_like(p)
    return model.eval()


def _vision(config_cls, model_cls, attn: str, **extra):
    config = config_cls(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=IMAGE,
        patch_size=4,
        attn_implementation=attn,
        **extra,
    )
    return _seeded(lambda: model_cls(config))


def vit(attn: str = "sdpa"):
    from transformers import ViTConfig, ViTForImageClassification

    return _vision(ViTConfig, ViTForImageClassification, attn, num_labels=5)


def deit(attn: str = "sdpa"):
    from transformers import DeiTConfig, DeiTForImageClassification

    return _vision(DeiTConfig, DeiTForImageClassification, attn, num_labels=5)


def deit_distilled(attn: str = "sdpa"):
    from transformers import DeiTConfig, DeiTForImageClassificationWithTeacher

    return _vision(DeiTConfig, DeiTForImageClassificationWithTeacher, attn, num_labels=5)


def dinov2(attn: str = "sdpa"):
    from transformers import Dinov2Config, Dinov2Model

    return _vision(Dinov2Config, Dinov2Model, attn)


def dinov2_registers(attn: str = "sdpa"):
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    return _vision(Dinov2WithRegistersConfig, Dinov2WithRegistersModel, attn, num_register_tokens=4)


def clip_vision(attn: str = "sdpa"):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    return _vision(CLIPVisionConfig, CLIPVisionModel, attn)


def siglip_vision(attn: str = "sdpa"):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    return _vision(SiglipVisionConfig, SiglipVisionModel, attn)


def _text(config_cls, model_cls, attn: str, **extra):
    config = config_cls(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=100,
        max_position_embeddings=64,
        attn_implementation=attn,
        **extra,
    )
    model = _seeded(lambda: model_cls(config))
    model.default_input_shapes = [(2, TEXT_TOKENS), (2, TEXT_TOKENS)]
    model.tome_input_specs = [
        {"dtype": "int64", "low": 0, "high": config.vocab_size},
        {"dtype": "int64", "padding": True},
    ]
    return model


def bert(attn: str = "sdpa"):
    from transformers import BertConfig, BertModel

    return _text(BertConfig, BertModel, attn)


def minilm(attn: str = "sdpa"):
    """MiniLM is a BERT architecture (all-MiniLM-L6-v2: 6 layers, hidden 384); small here."""
    from transformers import BertConfig, BertModel

    return _text(BertConfig, BertModel, attn, hidden_act="gelu")


def clip_text(attn: str = "sdpa"):
    from transformers import CLIPTextConfig, CLIPTextModel

    return _text(CLIPTextConfig, CLIPTextModel, attn)


def bert_eager():
    return bert("eager")


def vit_eager():
    return vit("eager")


def deit_distilled_eager():
    return deit_distilled("eager")


def dinov2_registers_eager():
    return dinov2_registers("eager")


def siglip_vision_eager():
    return siglip_vision("eager")


def minilm_eager():
    return minilm("eager")
