"""A small VAE trained by the pipeline itself encodes real Fashion-MNIST images to latents that
decode back to them (latent diffusion's first stage, Rombach et al.)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL

import difforge
from difforge.platform.imaging import to_array
from difforge.platform.tensors import to_numpy

PSNR_FLOOR = 20.0  # dB; an untrained VAE scores about 5


@pytest.fixture(scope="module")
def encoded(ray_session, tmp_path_factory):
    spec = {
        "name": "latents",
        "storage": str(tmp_path_factory.mktemp("vae")),
        "steps": [
            {"id": "raw", "op": "ingest.fashion_mnist", "params": {"limit": 2000}},
            {
                "id": "raw_test",
                "op": "ingest.fashion_mnist",
                "params": {"split": "test", "limit": 300},
            },
            {
                "id": "images",
                "op": "image.resize",
                "inputs": ["raw"],
                "params": {"size": 16, "method": "resize"},
            },
            {
                "id": "test_images",
                "op": "image.resize",
                "inputs": ["raw_test"],
                "params": {"size": 16, "method": "resize"},
            },
            {
                "id": "vae",
                "op": "train.vae",
                "inputs": ["images", "test_images"],
                "params": {
                    "block_out_channels": [16, 32],
                    "max_steps": 300,
                    "batch_size": 32,
                    "checkpoint_every": 150,
                },
            },
            {
                "id": "latents",
                "op": "encode.vae",
                "inputs": ["images", "vae"],
                "resources": {"batch_size": 128},
            },
        ],
    }
    return difforge.run(spec)


def test_latents_decode_back_to_the_images(encoded):
    latents = difforge.open_dataset(encoded.step("latents").uri)
    assert "image" not in latents.manifest.column_names
    table = latents.to_arrow()
    z = to_numpy(table.column("latent"))
    assert z.shape == (2000, 4, 8, 8) and z.dtype == np.float32
    meta = latents.metadata["vae"]
    model_uri = meta["uri"]
    assert latents.metadata["classes"][0] == "T-shirt/top"  # upstream metadata kept
    vae = AutoencoderKL.from_pretrained(model_uri).eval()
    scale = vae.config.scaling_factor
    assert 0.7 < float(np.std(z)) < 1.4  # scaled to about unit variance, as LDM does
    images = difforge.open_dataset(encoded.step("images").uri).to_arrow()
    by_id = dict(
        zip(images.column("id").to_pylist(), images.column("image").to_pylist(), strict=True)
    )
    ids = table.column("id").to_pylist()[:200]
    x = np.stack([to_array(by_id[i]) for i in ids]).astype(np.float32) / 127.5 - 1
    with torch.no_grad():
        rec = vae.decode(torch.from_numpy(z[:200] / scale)).sample.clamp(-1, 1).numpy()[:, 0]
    psnr = 10 * np.log10(4.0 / np.mean((rec - x) ** 2))
    assert psnr > PSNR_FLOOR, psnr


def test_vae_training_is_tracked(encoded):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(encoded.tracking_uri)
    run = encoded.step("vae").run_id
    assert "reconstructions.png" in {a.path for a in client.list_artifacts(run)}
    (logged,) = client.get_run(run).outputs.model_outputs  # the VAE is the run's logged model
    assert client.get_logged_model(logged.model_id).model_type == "vae"
    history = client.get_metric_history(run, "train_mse")
    assert [m.step for m in history] == [150, 300]  # each checkpointed step logged once
    assert history[-1].value < history[0].value
    waits = client.get_metric_history(run, "data_wait_s/rank0")
    assert [m.step for m in waits] == [150, 300]  # where the worker's time went


def test_psnr_is_measured_on_the_held_out_images(encoded):
    """The PSNR the step reports is the VAE's on the first 256 held-out images (its second
    input), which it never trained on: the same figure computed here from the saved VAE."""
    from mlflow.tracking import MlflowClient

    row = difforge.open_dataset(encoded.step("vae").uri).to_arrow().to_pylist()[0]
    assert row["psnr_on"] == "held_out"
    held = difforge.open_dataset(encoded.step("test_images").uri).to_arrow()
    x = np.stack([to_array(b) for b in held.column("image").to_pylist()[:256]])
    x = torch.from_numpy(x[:, None].astype(np.float32) / 127.5 - 1)
    vae = AutoencoderKL.from_pretrained(row["model_uri"]).eval()
    with torch.no_grad():
        rec = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
    psnr = 10 * np.log10(4.0 / float(torch.mean((rec - x) ** 2)))
    assert row["psnr"] == pytest.approx(psnr, abs=0.05)
    client = MlflowClient(encoded.tracking_uri)
    logged = client.get_run(encoded.step("vae").run_id).data.metrics
    assert logged["holdout_psnr"] == pytest.approx(row["psnr"]) and "final_train_psnr" not in logged


def test_held_out_images_of_another_size_are_refused_before_training(ray_session, tmp_path):
    spec = {
        "name": "vae-sizes",
        "storage": str(tmp_path),
        "steps": [
            {"id": "raw", "op": "ingest.fashion_mnist", "params": {"limit": 64}},
            {"id": "small", "op": "image.resize", "inputs": ["raw"], "params": {"size": 16}},
            {
                "id": "vae",
                "op": "train.vae",
                "inputs": ["small", "raw"],
                "params": {"block_out_channels": [16, 32], "max_steps": 1000},
            },
        ],
    }
    with pytest.raises(
        difforge.platform.errors.DifforgeError,
        match=r"held-out images are \[1, 28, 28\].*training images \[1, 16, 16\]",
    ):
        difforge.run(spec)
    assert not list(tmp_path.glob("vae-sizes/vae/*/_work/*/ray-train/checkpoint_*"))  # none ran
