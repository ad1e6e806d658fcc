"""Named model sizes in one registry, chosen by a string: ``tiny`` for tests, ``demo`` for the bundled model,
``base`` for GPUs. Each entry holds constructor arguments for a diffusers model."""
from __future__ import annotations

import copy

from histosynth.errors import HistosynthError

AUTOENCODER_PRESETS: dict[str, dict] = {
    # 4× downsampling: three encoder levels, two of them downsample.
    "tiny": dict(
        block_out_channels=(8, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        mid_block_add_attention=False,
    ),
    # 8 latent channels at 4×: the latent keeps 1/6 of the pixel values (4 channels kept 1/12, and blurred
    # chromatin and fibres); trained with a PatchGAN adversary for sharp texture (configs/demo/autoencoder.yaml).
    "demo": dict(
        block_out_channels=(48, 96, 96),
        layers_per_block=1,
        latent_channels=8,
        norm_num_groups=16,
        mid_block_add_attention=False,
    ),
    # 8× downsampling, the Stable-Diffusion layout with fewer channels.
    "base": dict(
        block_out_channels=(64, 128, 256, 256),
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
        mid_block_add_attention=True,
    ),
}

UNET_PRESETS: dict[str, dict] = {
    "tiny": dict(
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=8,
        attention_head_dim=8,
    ),
    # 11.9 M parameters, attention at the two lowest levels (8² and 4² of a 32² latent): the most a 2-core CPU
    # trains in a few hours and samples a 2048² px slide with in minutes.
    "demo": dict(
        block_out_channels=(64, 128, 160, 224),
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=32,
        attention_head_dim=32,
    ),
    "base": dict(
        block_out_channels=(128, 256, 384, 512),
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        layers_per_block=2,
        norm_num_groups=32,
        attention_head_dim=64,
    ),
}

# The mask model is a pixel-space UNet over one-hot class channels at reduced resolution.
MASK_UNET_PRESETS: dict[str, dict] = {
    "tiny": UNET_PRESETS["tiny"],
    # Four levels over a 64² crop of 8 µm/px label maps (512 µm of tissue), attention at 16² and 8².
    "demo": dict(
        block_out_channels=(32, 64, 96, 128),
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=16,
        attention_head_dim=16,
    ),
    "base": UNET_PRESETS["base"],
}

_REGISTRIES = {"autoencoder": AUTOENCODER_PRESETS, "unet": UNET_PRESETS, "mask_unet": MASK_UNET_PRESETS}


def preset(kind: str, name: str) -> dict:
    """A fresh copy of the constructor arguments of preset ``name`` for model ``kind``."""
    registry = _REGISTRIES[kind]
    if name not in registry:
        raise HistosynthError(f"unknown preset '{name}' for {kind}; choose one of {', '.join(registry)}")
    return copy.deepcopy(registry[name])
