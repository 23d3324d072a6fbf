"""The diffusion training recipe without Ray: DeepSpeed's single-rank set-up on real digits,
CEP's statistics, and the errors a user can make."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest
import torch

from difforge.diffusion.backbones import CEPHook, cep_delta
from difforge.diffusion.training import deepspeed_config, train_locally
from difforge.operators.train.diffusion import Params, train
from difforge.platform import datasets as D
from difforge.platform.errors import DifforgeError
from difforge.platform.events import NullLog
from difforge.platform.outputs import write_dataset
from difforge.platform.tensors import to_column

TINY_UNET = {
    "type": "UNet2DModel",
    "block_out_channels": [8, 16],
    "layers_per_block": 1,
    "down_block_types": ["DownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "UpBlock2D"],
    "norm_num_groups": 4,
}


def digits_dataset(root) -> D.Dataset:
    """scikit-learn's real 8x8 digits as a committed image dataset (no Ray needed)."""
    from sklearn.datasets import load_digits

    from difforge.platform.imaging import encode_png

    d = load_digits()
    images = (d.images * (255 / 16)).round().astype(np.uint8)
    table = pa.table(
        {
            "id": [f"d{i}" for i in range(len(images))],
            "image": [encode_png(im) for im in images],
            "label": pa.array(d.target, pa.int64()),
        }
    )
    uri = str(root / "digits")
    write_dataset(uri, table, "digits", metadata={"classes": [str(i) for i in range(10)]})
    return D.open_dataset(uri)


def run(tmp_path, data, column="image", **params):
    p = Params(
        backbone=TINY_UNET, batch_size=32, warmup_steps=2, checkpoint_every=10, **params
    ).model_dump()
    return train_locally(
        {"params": p, "shards": data.shards(), "column": column, "num_classes": 10, "threads": 2},
        str(tmp_path / "ckpt"),
        train,
    )


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return digits_dataset(tmp_path_factory.mktemp("digits"))


def test_loss_goes_down_on_real_digits(tmp_path, digits):
    io = run(tmp_path, digits, max_steps=60, lr=1e-3)
    losses = [m["loss"] for m in io.history]
    assert [m["step"] for m in io.history] == [10, 20, 30, 40, 50, 60]
    assert losses[-1] < 0.7 * losses[0], losses


def test_resume_continues_to_exactly_max_steps(tmp_path, digits):
    run(tmp_path, digits, max_steps=20)
    io = run(tmp_path, digits, max_steps=30)  # the same folder: continues from step 20
    assert [m["step"] for m in io.history] == [30]


def test_a_resumed_run_replays_cep_on_class_embeddings_exactly(tmp_path, digits):
    """CEP's perturbations of class embeddings come from each step's own generator: stopped
    at step 10 and resumed, a run ends with the very weights of an uninterrupted one."""
    from difforge.diffusion.training import consolidated_state

    cep = {"kind": "gaussian", "gamma": 1.0}
    run(tmp_path / "straight", digits, max_steps=20, cep=cep)
    run(tmp_path / "resumed", digits, max_steps=10, cep=cep)
    run(tmp_path / "resumed", digits, max_steps=20, cep=cep)
    a = consolidated_state(str(tmp_path / "straight" / "ckpt"))
    b = consolidated_state(str(tmp_path / "resumed" / "ckpt"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_zero3_without_ema_and_cep_uniform(tmp_path, digits):
    io = run(
        tmp_path,
        digits,
        max_steps=10,
        ema_decay=None,
        cep={"kind": "uniform"},
        deepspeed={"zero_stage": 3},
    )
    assert io.history[-1]["step"] == 10 and np.isfinite(io.history[-1]["loss"])


def test_bf16_and_v_prediction(tmp_path, digits):
    io = run(
        tmp_path,
        digits,
        max_steps=10,
        prediction_type="v_prediction",
        deepspeed={"zero_stage": 1, "precision": "bf16"},
    )
    assert np.isfinite(io.history[-1]["loss"])


def test_latent_space_training(tmp_path):
    z = np.random.default_rng(0).standard_normal((64, 4, 4, 4)).astype(np.float32)
    table = pa.table(
        {
            "id": [f"z{i}" for i in range(64)],
            "latent": to_column(z),
            "label": pa.array(np.arange(64) % 10, pa.int64()),
        }
    )
    uri = str(tmp_path / "lat")
    write_dataset(uri, table, "lat")
    unet = {**TINY_UNET, "block_out_channels": [8, 8]}
    p = Params(backbone=unet, batch_size=16, max_steps=10, checkpoint_every=10).model_dump()
    io = train_locally(
        {
            "params": p,
            "shards": D.open_dataset(uri).shards(),
            "column": "latent",
            "num_classes": 10,
        },
        str(tmp_path / "c"),
        train,
    )
    assert io.history[-1]["step"] == 10


def test_cep_delta_statistics():
    d, gamma = 256, 1.0
    g = torch.Generator().manual_seed(0)
    gauss = cep_delta((4096, d), "gaussian", gamma, g)
    assert abs(gauss.std().item() - gamma / d**0.5) < 0.002
    assert abs(gauss.mean().item()) < 0.001
    uni = cep_delta((4096, d), "uniform", gamma, g)
    bound = gamma / d**0.5
    assert uni.abs().max().item() <= bound
    assert abs(uni.std().item() - bound / 3**0.5) < 0.002  # U(-a, a) has sd a/sqrt(3)
    assert torch.count_nonzero(cep_delta((8, d), "none", gamma)) == 0


def test_cep_perturbs_training_never_sampling():
    emb = torch.nn.Embedding(11, 32)
    emb.register_forward_hook(CEPHook("gaussian", 1.0))
    labels = torch.arange(10)
    clean = emb.weight[:10].detach()
    emb.train()
    assert not torch.allclose(emb(labels), clean)
    emb.eval()
    assert torch.equal(emb(labels), clean)


def test_user_errors():
    with pytest.raises(DifforgeError, match="fp16 is not supported on CPUs"):
        deepspeed_config(Params(deepspeed={"precision": "fp16"}).model_dump(), 8, 1, False)
    with pytest.raises(ValueError, match="ema_decay needs full parameters"):
        Params(deepspeed={"zero_stage": 3})
    cfg = deepspeed_config(Params(grad_accum=2).model_dump(), 8, 2, False)
    assert cfg["train_batch_size"] == 32 and "bf16" not in cfg  # auto: fp32 on CPU
    assert deepspeed_config(Params().model_dump(), 8, 1, True)["bf16"] == {"enabled": True}


def test_dit_backbone_class_conditional(tmp_path, digits):
    dit = {
        "type": "DiTTransformer2DModel",
        "num_layers": 1,
        "num_attention_heads": 2,
        "attention_head_dim": 8,
        "patch_size": 2,
        "norm_num_groups": 1,
    }
    p = Params(
        backbone=dit, batch_size=16, max_steps=4, checkpoint_every=2, cep={"kind": "gaussian"}
    ).model_dump()
    io = train_locally(
        {"params": p, "shards": digits.shards(), "column": "image", "num_classes": 10},
        str(tmp_path / "c"),
        train,
    )
    assert [m["step"] for m in io.history] == [2, 4]


def test_text_conditional_unet_with_cep_on_the_embedding(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (32, 1, 8, 8)).astype(np.float32)
    from difforge.platform.imaging import encode_png

    images = [encode_png(((im[0] + 1) * 127.5).astype(np.uint8)) for im in x]
    emb = rng.standard_normal((32, 6, 16)).astype(np.float32)
    table = pa.table(
        {"id": [f"t{i}" for i in range(32)], "image": images, "cond_embedding": to_column(emb)}
    )
    uri = str(tmp_path / "txt")
    write_dataset(uri, table, "txt")
    unet = {
        "type": "UNet2DConditionModel",
        "block_out_channels": [8, 16],
        "layers_per_block": 1,
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
        "norm_num_groups": 4,
        "attention_head_dim": 4,
    }
    p = Params(
        backbone=unet,
        batch_size=8,
        max_steps=4,
        checkpoint_every=4,
        cep={"kind": "uniform", "gamma": 1.0},
    ).model_dump()
    io = train_locally(
        {"params": p, "shards": D.open_dataset(uri).shards(), "column": "image", "num_classes": 0},
        str(tmp_path / "c"),
        train,
    )
    assert io.history[-1]["step"] == 4 and np.isfinite(io.history[-1]["loss"])


def test_latents_with_no_vae_show_each_channel_side_by_side():
    """A model trained on latents that no VAE decodes still gets its sample grid: each of the
    four channels in grey, side by side (a three-channel view would mislabel them as RGB)."""
    from difforge.diffusion.sampling import to_pil

    x = torch.linspace(-1, 1, 2 * 4 * 3 * 5).reshape(2, 4, 3, 5)
    images = to_pil(x)
    assert [(im.mode, im.size) for im in images] == [("L", (20, 3))] * 2
    second_channel = (x[1, 1] + 1).mul(127.5).round().byte().numpy()
    np.testing.assert_array_equal(np.asarray(images[1])[:, 5:10], second_channel)


class _Images(NullLog):
    """A step log that keeps the images the recipe logs."""

    def __init__(self):
        self.images: list[tuple] = []

    def log_image(self, image, name):
        self.images.append((name, image.size))

    def log_image_at(self, image, key, step):
        self.images.append((f"{key}@{step}", image.size))


def test_an_unconditional_model_gets_its_grid_during_and_after_training(tmp_path):
    """8 rows of 8 unguided samples (digits with their labels left out), every `sample_every`
    steps and at the end, from the training loop itself."""
    from difforge.operators.train.diffusion import _grid_plan

    table = digits_dataset(tmp_path).to_arrow().drop_columns(["label"])
    write_dataset(str(tmp_path / "unlabeled"), table, "unlabeled")
    data = D.open_dataset(str(tmp_path / "unlabeled"))
    p = Params(
        backbone=TINY_UNET, batch_size=16, max_steps=4, checkpoint_every=4, sample_every=2
    ).model_dump()
    plan = _grid_plan(p, data, (None, None), 0)
    sink = _Images()
    train_locally(
        {
            "params": p,
            "shards": data.shards(),
            "column": "image",
            "num_classes": 0,
            "sample_shape": [1, 8, 8],
            "grid": plan,
            "log": sink,
        },
        str(tmp_path / "c"),
        train,
    )
    size = (3 * (8 * 10 + 2), 3 * (8 * 10 + 2))  # 8 x 8 tiles of 8 px, 2 px apart, 3x
    assert sink.images == [("samples@2", size), ("samples.png", size), ("samples@4", size)]


def test_a_grid_that_cannot_be_drawn_never_fails_the_training(tmp_path, caplog):
    data = digits_dataset(tmp_path)
    p = Params(backbone=TINY_UNET, batch_size=16, max_steps=2, checkpoint_every=2).model_dump()
    sink = _Images()
    io = train_locally(
        {
            "params": p,
            "shards": data.shards(),
            "column": "image",
            "num_classes": 10,
            "sample_shape": [1, 8, 8],
            "grid": {"classes": 10},
            "vae_uri": str(tmp_path / "no-such-vae"),
            "log": sink,
        },
        str(tmp_path / "c"),
        train,
    )
    assert io.history[-1]["step"] == 2 and sink.images == []
    assert "no sample grid at training step 2" in caplog.text


def test_an_empty_ds_accelerator_counts_as_unset():
    """An image that sets DS_ACCELERATOR="" (DeepSpeed 0.19 raises ValueError for it) still
    trains: difforge picks the accelerator as if it were unset."""
    code = (
        "from difforge.diffusion.training import import_deepspeed; import os; "
        "ds = import_deepspeed(); print(os.environ['DS_ACCELERATOR'], "
        "ds.get_accelerator().device_name())"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "DS_ACCELERATOR": ""},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-2:] == ["cpu", "cpu"]
