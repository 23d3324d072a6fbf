"""The VAE of latent diffusion (Rombach et al.): built from config, loaded by reference."""

from __future__ import annotations

from typing import Any


def build_vae(p: dict[str, Any], channels: int, size: int):
    from diffusers import AutoencoderKL

    n = len(p["block_out_channels"])
    return AutoencoderKL(
        in_channels=channels,
        out_channels=channels,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(p["block_out_channels"]),
        latent_channels=p["latent_channels"],
        layers_per_block=p["layers_per_block"],
        norm_num_groups=p["norm_num_groups"] or min(32, p["block_out_channels"][0]),
        sample_size=size,
    )
