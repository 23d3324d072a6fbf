"""The shared model layer: every model reference resolves to a folder or says what to do, and
the model folder format has one writer and one reader that refuses what it does not know.
(`models:/NAME/VERSION` is resolved in tests/integration/test_diffusion_training.py.)"""

from __future__ import annotations

import json

import pytest

from difforge.diffusion.model_folder import (
    FORMAT_VERSION,
    ModelInfo,
    load_model,
    read_info,
    write_model_folder,
)
from difforge.models.resolve import resolve
from difforge.platform.errors import DifforgeError


def test_references_resolve_or_say_what_to_do(tmp_path, monkeypatch):
    assert resolve(str(tmp_path)) == str(tmp_path)
    with pytest.raises(DifforgeError, match="VAE '/nowhere/vae': no such folder"):
        resolve("/nowhere/vae", "VAE")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DifforgeError, match="hub is offline .*--local-dir DIR"):
        resolve("stabilityai/sd-vae-ft-mse", "VAE")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert resolve("stabilityai/sd-vae-ft-mse") == "stabilityai/sd-vae-ft-mse"  # for the hub


def test_the_model_folder_round_trips_and_refuses_newer_formats(tmp_path):
    from diffusers import DDPMScheduler, UNet2DModel

    unet = UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        num_class_embeds=11,
        down_block_types=("DownBlock2D",) * 2,
        up_block_types=("UpBlock2D",) * 2,
    )
    info = ModelInfo(
        backbone="UNet2DModel", sample_shape=[1, 8, 8], num_classes=10, null_condition=10
    )
    write_model_folder(str(tmp_path), info, unet, DDPMScheduler())
    assert read_info(str(tmp_path)).null_condition == 10
    written = json.loads((tmp_path / "difforge.json").read_text())
    assert written["format_version"] == FORMAT_VERSION
    assert {"objective", "conditioning", "text_encoder", "adapter", "parent_model"} <= set(written)
    model, loaded, scheduler_config, vae = load_model(str(tmp_path))
    assert loaded["num_classes"] == 10 and vae is None
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in unet.parameters())
    (tmp_path / "difforge.json").write_text(json.dumps({**written, "format_version": 99}))
    with pytest.raises(DifforgeError, match="model folder format 99; .* upgrade difforge"):
        read_info(str(tmp_path))
    with pytest.raises(DifforgeError, match="not a difforge model folder"):
        load_model(str(tmp_path / "model"))
