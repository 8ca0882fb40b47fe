"""A tiny random-weight diffusers ``UNet2DConditionModel`` for fast diffusion tests.

``tiny_unet`` returns the UNet wrapped so it takes ``(sample, timestep,
encoder_hidden_states)`` positionally and returns the predicted noise tensor (not a
``UNet2DConditionOutput``). The wrapper declares its inputs with ``tome_input_specs``:
the timestep is an int64 in [0, 1000), as a scheduler would pass it.

    tome-export samples.tiny_unet:tiny_unet --method tomesd --ratio 0.5
    tome-export samples.tiny_unet:tiny_unet_pypi_tomesd --method none

``sd15_tiny``, ``sd21_tiny``, ``sdxl_tiny`` return raw ``UNet2DConditionModel``s (no
wrapper) with small configs of the SD-1.5, SD-2.1 and SDXL layouts:

    tome-export samples.tiny_unet:sd15_tiny --method todo --downsample 2
    tome-export samples.tiny_unet:sdxl_tiny --method tomesd --ratio 0.5 --max-downsample 2
"""

from __future__ import annotations

import torch
from torch import nn

SAMPLE_SIZE = 16
CROSS_DIM = 32
TEXT_TOKENS = 8


def tiny_unet_config(sample_size: int = SAMPLE_SIZE) -> dict:
    return dict(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=CROSS_DIM,
        attention_head_dim=8,
        norm_num_groups=8,
    )


def raw_tiny_unet(sample_size: int = SAMPLE_SIZE, seed: int = 0) -> nn.Module:
    """The bare diffusers model (what tomesd from PyPI patches)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**tiny_unet_config(sample_size)).eval()


class UNetNoise(nn.Module):
    """``unet(sample, timestep, encoder_hidden_states)`` → noise prediction tensor."""

    def __init__(self, unet: nn.Module, batch: int = 1) -> None:
        super().__init__()
        self.unet = unet
        size = unet.config.sample_size
        self.default_input_shapes = [(batch, 4, size, size), (batch,), (batch, TEXT_TOKENS, CROSS_DIM)]
        self.tome_input_specs = [None, {"dtype": "int64", "low": 0, "high": 1000}, None]

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor):
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]


def tiny_unet() -> nn.Module:
    return UNetNoise(raw_tiny_unet()).eval()


def tiny_unet_pypi_tomesd() -> nn.Module:
    """The tiny UNet patched by tomesd from PyPI (someone else's merge code).

    ``use_rand=False``: tomesd's random destinations change on every call, so no fixed
    graph reproduces them. Export with ``--method none`` (the merging is already there);
    the tracer rewrites tomesd's ``scatter_reduce(mean)`` and unstable argsorts."""
    import tomesd

    unet = raw_tiny_unet()
    tomesd.apply_patch(unet, ratio=0.5, use_rand=False)
    return UNetNoise(unet).eval()


# -- small configs of the three Stable Diffusion UNet layouts, as users hold them (raw) --
# Same block structure as the published configs, narrow and shallow so tests take seconds.
# tome-export adapts a raw UNet2DConditionModel itself (exporter/diffusers_source.py).


def sd15_config(sample_size: int = SAMPLE_SIZE) -> dict:
    """SD-1.5's layout: 3 cross-attention levels + 1 plain, one head size, 768→32 text dim."""
    return dict(
        sample_size=sample_size,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64, 64, 64),
        layers_per_block=1,
        cross_attention_dim=CROSS_DIM,
        attention_head_dim=8,
        norm_num_groups=8,
    )


def sd21_config(sample_size: int = SAMPLE_SIZE) -> dict:
    """SD-2.1's layout: attention_head_dim per block, linear projections, wider text (1024→48)."""
    return dict(
        sd15_config(sample_size),
        attention_head_dim=(2, 4, 4, 4),
        use_linear_projection=True,
        cross_attention_dim=48,
    )


def sdxl_config(sample_size: int = SAMPLE_SIZE) -> dict:
    """SDXL's layout: no attention at the top level, transformer depths 1/2 (SDXL: 1/2/10 over
    3 levels), text_time added conditioning (pooled text + 6 time ids), 2048→64 text dim."""
    return dict(
        sample_size=sample_size,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        transformer_layers_per_block=(1, 1, 2),
        cross_attention_dim=64,
        attention_head_dim=(2, 4, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 40,  # 6 time ids × 8 + pooled text 40
        norm_num_groups=8,
    )


def _unet(config: dict, seed: int) -> nn.Module:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**config).eval()


def sd15_tiny(seed: int = 0) -> nn.Module:
    return _unet(sd15_config(), seed)


def sd21_tiny(seed: int = 0) -> nn.Module:
    return _unet(sd21_config(), seed)


def sdxl_tiny(seed: int = 0) -> nn.Module:
    return _unet(sdxl_config(), seed)


# -- the published UNet configs (random weights; GBs of memory: benchmarks, not tests) ---

SD15_CONFIG = dict(
    sample_size=64,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    cross_attention_dim=768,
    attention_head_dim=8,
)
SD21_CONFIG = dict(
    SD15_CONFIG,
    sample_size=96,
    attention_head_dim=(5, 10, 20, 20),
    cross_attention_dim=1024,
    use_linear_projection=True,
)
SDXL_CONFIG = dict(
    sample_size=128,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)


def published(config: dict, width: float = 1.0, sample_size: int | None = None, seed: int = 0) -> nn.Module:
    """A random-weight UNet of a published config; ``width`` scales every block's channels
    (multiples of 32 groups × heads) for memory extrapolation, ``sample_size`` the latent."""
    config = dict(config)
    if width != 1.0:
        config["block_out_channels"] = tuple(max(64, int(c * width) // 64 * 64) for c in config["block_out_channels"])
    if sample_size:
        config["sample_size"] = sample_size
    return _unet(config, seed)


def sd15_full() -> nn.Module:
    """SD-1.5's UNet (860M parameters, 3.4 GB fp32), random weights, 64×64 latents."""
    return published(SD15_CONFIG)


def sd21_full() -> nn.Module:
    """SD-2.1's UNet (865M parameters), random weights, 96×96 latents (768 px)."""
    return published(SD21_CONFIG)


def sdxl_full() -> nn.Module:
    """SDXL's UNet (2.6B parameters, 10.3 GB fp32), random weights, 128×128 latents."""
    return published(SDXL_CONFIG)
