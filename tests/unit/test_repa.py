"""REPA (Yu et al. 2025) in train.diffusion's recipe, without Ray: features of a frozen encoder
(a classifier's feature map, precomputed as a column, as `encode.features pooling: none`
writes it) are aligned with a UNet block through a projector that trains with the network; the
alignment loss falls, the projector learns, and the exported network has no projector."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from difforge.diffusion.data import ShardStream
from difforge.diffusion.repa import Aligned, backbone_state, match_grid
from difforge.diffusion.training import consolidated_state, train_locally
from difforge.models.classifier import SmallCNN
from difforge.models.features import FeatureSpec
from difforge.operators.train.diffusion import Params, train
from difforge.platform import datasets as D
from difforge.platform.tensors import to_column
from tests.unit.test_diffusion_recipe import TINY_UNET, digits_dataset, write_dataset


@pytest.fixture(scope="module")
def digits_with_features(tmp_path_factory):
    """The 8x8 digits with a frozen CNN's last feature map (128 x 2 x 2) of each image."""
    root = tmp_path_factory.mktemp("repa")
    digits = digits_dataset(root)
    table = digits.to_arrow()
    torch.manual_seed(0)
    encoder = SmallCNN(1, 10).eval()
    from difforge.models.features import Extractor

    extractor = Extractor(FeatureSpec("pixels"))  # decoding only: uint8 [N, 1, 8, 8]
    x = torch.from_numpy(extractor.arrays(table.column("image").to_pylist())).float()
    with torch.no_grad():
        fmap = encoder.feature_map(x / 127.5 - 1).numpy()
    assert fmap.shape[1:] == (128, 2, 2)
    table = table.append_column("features", to_column(fmap.astype(np.float32)))
    write_dataset(
        str(root / "with-features"),
        table,
        "digits",
        metadata={"classes": [str(i) for i in range(10)]},
    )
    return D.open_dataset(str(root / "with-features"))


def run(folder, data, steps: int, repa: dict | None, **params):
    p = Params(
        backbone=TINY_UNET,
        batch_size=32,
        warmup_steps=2,
        checkpoint_every=20,
        max_steps=steps,
        lr=1e-3,
        repa=repa,
        **params,
    ).model_dump()
    return train_locally(
        {"params": p, "shards": data.shards(), "column": "image", "num_classes": 10, "threads": 2},
        str(folder),
        train,
    )


def test_alignment_loss_falls_and_the_projector_learns(tmp_path, digits_with_features):
    repa = {"block": 0, "weight": 1.0, "projector_dim": 32}
    first = run(tmp_path / "ckpt", digits_with_features, 20, repa)
    at_20 = consolidated_state(first.folder)
    io = run(tmp_path / "ckpt", digits_with_features, 80, repa)  # resumed from step 20
    history = first.history + io.history
    align = [m["repa_loss"] for m in history]
    assert [m["step"] for m in history] == [20, 40, 60, 80]
    # -cosine similarity: starts near 0 (a random projector), falls as the block aligns
    assert align[-1] < align[0] - 0.2 and align[-1] < -0.3, align
    final = consolidated_state(io.folder)
    projector = [k for k in final if k.startswith("projector.")]
    assert projector and all(not torch.equal(final[k], at_20[k]) for k in projector)
    # the network as export loads it: no projector, the bare backbone's keys
    bare = backbone_state(final)
    assert not any(k.startswith(("projector.", "net.")) for k in bare)
    assert set(bare) == {k[len("net.") :] for k in final if k.startswith("net.")}


def test_weight_zero_is_a_control_the_network_trains_as_without_repa(
    tmp_path, digits_with_features
):
    """weight 0: the projector learns on the detached hidden state (alignment measured, the
    same batches), and the network ends where a run without REPA ends, up to the rounding
    noise of a different parameter layout in DeepSpeed's flat buffers; with a weight, REPA's
    gradient moves it far more."""

    def network(name: str, weight: float | None):
        repa = None if weight is None else {"block": 0, "weight": weight, "projector_dim": 32}
        io = run(tmp_path / name, digits_with_features, 20, repa, grad_clip=None)
        return io.history[0], backbone_state(consolidated_state(io.folder))

    (h0, control), (_, plain), (h1, aligned) = (
        network("control", 0.0),
        network("plain", None),
        network("repa", 1.0),
    )

    def distance(a, b):
        return max((a[k] - b[k]).abs().max().item() for k in a)

    assert set(control) == set(plain) == set(aligned)
    near, far = distance(control, plain), distance(aligned, plain)
    print(f"weight 0 vs no REPA: {near:.4f}; weight 1 vs no REPA: {far:.4f}")  # pytest -s
    assert near < 0.2 * far
    assert "repa_loss" in h0 and "repa_loss" in h1


def test_the_hidden_state_is_the_blocks_and_the_grids_are_matched():
    from difforge.diffusion.backbones import build_backbone

    p = Params(backbone=TINY_UNET).model_dump()
    net, _ = build_backbone(p, 8, 1, 10, None)
    model = Aligned(net, "UNet2DModel", {"block": 0, "projector_dim": 16}, 128)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([10, 500])
    model(x, t, class_labels=torch.tensor([1, 2]))
    tokens, grid = model.tokens()
    assert tokens.shape == (2, 16, 8) and grid == (4, 4)  # down block 0: 8 channels at 4x4
    target = torch.randn(2, 128, 8, 8)
    assert torch.allclose(match_grid(target, (4, 4)), torch.nn.functional.avg_pool2d(target, 2))
    assert match_grid(torch.randn(2, 128, 2, 2), (4, 4)).shape == (2, 128, 4, 4)
    # the encoder's features are data: the loss's gradient reaches the projector and the
    # network, never the target
    target.requires_grad_(True)
    model.alignment_loss(target.detach()).backward()
    assert model.projector[0].weight.grad is not None and target.grad is None
    assert net.down_blocks[0].resnets[0].conv1.weight.grad is not None


def test_a_missing_features_column_is_named(tmp_path):
    data = digits_dataset(tmp_path)
    with pytest.raises(ValueError, match="no column 'features'"):
        ShardStream(data.shards(), "image", 0, 8, aux="features")


def test_features_rows_travel_with_their_images(digits_with_features):
    """The stream's aux values belong to the same rows as its images (shuffled together)."""
    from difforge.models.features import Extractor
    from difforge.platform.tensors import to_numpy

    table = digits_with_features.to_arrow()
    feats = to_numpy(table.column("features"))
    images = Extractor(FeatureSpec("pixels")).arrays(table.column("image").to_pylist())
    batch = ShardStream(digits_with_features.shards(), "image", 3, 16, aux="features").batch(5)
    assert batch.aux.shape == (16, 128, 2, 2)
    for x, f in zip(batch.x0, batch.aux, strict=True):
        i = int(np.argmin(np.abs(feats - f).reshape(len(feats), -1).sum(1)))
        assert np.allclose(feats[i], f) and np.allclose(images[i] / 127.5 - 1.0, x, atol=1e-6)


def test_a_dit_aligns_its_patch_tokens():
    """On DiT, block k's patch tokens (on their grid) are aligned; the gradient reaches the
    blocks before it."""
    from difforge.diffusion.backbones import build_backbone

    dit = {
        "type": "DiTTransformer2DModel",
        "num_layers": 2,
        "num_attention_heads": 2,
        "attention_head_dim": 8,
        "patch_size": 2,
        "norm_num_groups": 4,
    }
    net, _ = build_backbone({"backbone": dit}, 8, 4, 10, None)
    model = Aligned(net, "DiTTransformer2DModel", {"block": 1, "projector_dim": 16}, 128)
    model(torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), class_labels=torch.tensor([1, 2]))
    tokens, grid = model.tokens()
    assert tokens.shape == (2, 16, 16) and grid == (4, 4)  # 8x8 latents in 2x2 patches
    model.alignment_loss(torch.randn(2, 128, 8, 8)).backward()
    assert net.transformer_blocks[0].attn1.to_q.weight.grad is not None
    assert net.proj_out_2.weight.grad is None  # the layers after the aligned output: none
