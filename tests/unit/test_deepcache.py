"""DeepCache's shallow pass and Faster Diffusion's encoder propagation: exact wiring (for the same
input each reproduces the full pass), the skipped blocks really skipped, interval 1 identical to
no caching, and clear refusals."""

from __future__ import annotations

import diffusers
import pytest
import torch

from difforge.diffusion.deepcache import DeepCache
from difforge.diffusion.sampling import sample_batch
from difforge.diffusion.schedules import make_scheduler
from difforge.platform.errors import DifforgeError


def unet(kind: str):
    torch.manual_seed(0)
    common = dict(
        sample_size=16,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16, 16),
        layers_per_block=1,
        norm_num_groups=4,
    )
    if kind == "UNet2DModel":
        return diffusers.UNet2DModel(
            down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
            num_class_embeds=11,
            attention_head_dim=4,
            **common,
        ).eval()
    return diffusers.UNet2DConditionModel(
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=12,
        attention_head_dim=4,
        **common,
    ).eval()


def call(model, kind, x, t):
    if kind == "UNet2DModel":
        return model(x, t, class_labels=torch.arange(len(x)) % 10).sample
    return model(x, t, encoder_hidden_states=torch.ones(len(x), 3, 12)).sample


@pytest.mark.parametrize("kind", ["UNet2DModel", "UNet2DConditionModel"])
@pytest.mark.parametrize("branch", [0, 1])
def test_shallow_pass_reuses_the_deep_feature_exactly(kind, branch):
    model = unet(kind)
    x, t = torch.randn(4, 1, 16, 16), torch.full((4,), 300)
    cache = DeepCache(model, kind, branch)
    deep = [*model.down_blocks[branch + 1 :], model.mid_block, *model.up_blocks[: cache.mirror]]
    calls = []
    for block in deep:
        block.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        with cache.capture():
            full = call(model, kind, x, t)
        n_full = len(calls)
        with cache.shallow():
            shallow = call(model, kind, x, t)
        other = call(model, kind, x * 0.5, t)
    assert n_full == len(deep)  # a full pass runs every deep block once
    assert len(calls) == 2 * len(deep)  # ... the shallow pass none of them
    assert torch.allclose(full, shallow, atol=1e-5)
    assert not torch.allclose(full, other, atol=1e-3)  # the model does depend on its input
    assert list(model.up_blocks) == list(cache.model.up_blocks)  # the real blocks are back


def test_interval_one_is_no_caching_and_cached_sampling_runs_through():
    model = unet("UNet2DModel")
    sch = make_scheduler("ddim", diffusers.DDPMScheduler().config)
    labels = torch.arange(4)
    args = (model, "UNet2DModel", sch, (1, 16, 16), [0, 1, 2, 3], labels, [1.0] * 4, 10, 4)
    plain = sample_batch(*args)
    assert torch.equal(plain, sample_batch(*args, deepcache=(1, 0)))
    assert sample_batch(*args, deepcache=(2, 0)).shape == plain.shape


def test_refusals_name_the_problem():
    dit = diffusers.DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=1,
        num_layers=1,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=11,
    )
    with pytest.raises(DifforgeError, match="UNet2DModel, UNet2DConditionModel backbones"):
        DeepCache(dit, "DiTTransformer2DModel", 0)
    with pytest.raises(DifforgeError, match="3 down blocks, so 0..1"):
        DeepCache(unet("UNet2DModel"), "UNet2DModel", 2)


# Faster Diffusion's encoder propagation (difforge/diffusion/faster.py)


@pytest.mark.parametrize("kind", ["UNet2DModel", "UNet2DConditionModel"])
def test_a_propagated_pass_runs_no_encoder_block_and_reuses_its_features_exactly(kind):
    from difforge.diffusion.faster import EncoderPropagation

    model = unet(kind)
    x, t = torch.randn(4, 1, 16, 16), torch.full((4,), 300)
    prop = EncoderPropagation(model, kind)
    encoder = [model.conv_in, *model.down_blocks, model.mid_block]
    decoder_calls, encoder_calls = [], []
    for block in encoder:
        block.register_forward_hook(lambda *a: encoder_calls.append(1))
    for block in model.up_blocks:
        block.register_forward_hook(lambda *a: decoder_calls.append(1))
    with torch.no_grad():
        with prop.capture():
            full = call(model, kind, x, t)
        assert len(encoder_calls) == len(encoder)
        with prop.propagate():  # the same step again: exactly the full pass
            same = call(model, kind, x, t)
            later = call(model, kind, x * 0.5, torch.full((4,), 250))  # the next step
        assert len(encoder_calls) == len(encoder)  # no encoder block ran since the key step
        assert len(decoder_calls) == 3 * len(model.up_blocks)  # the decoder ran each time
        fresh = call(model, kind, x * 0.5, torch.full((4,), 250))
    assert torch.allclose(full, same, atol=1e-5)
    assert not torch.allclose(later, full, atol=1e-4)  # the decoder sees the new time
    assert not torch.allclose(later, fresh, atol=1e-4)  # ... but the key step's features
    assert model.conv_in in encoder and list(model.down_blocks) == encoder[1:-1]  # restored


def test_faster_diffusion_sampling_key_steps_and_refusals():
    from difforge.diffusion.faster import EncoderPropagation, key_schedule
    from difforge.operators.sample.diffusion import Params

    assert key_schedule(6, None, 2) == [True, False, True, False, True, False]
    assert key_schedule(5, [1, 3, 9], 2) == [True, True, False, True, False]  # 0 always
    model = unet("UNet2DModel")
    sch = make_scheduler("ddim", diffusers.DDPMScheduler().config)
    args = (model, "UNet2DModel", sch, (1, 16, 16), [0, 1, 2, 3], torch.arange(4), [2.0] * 4, 10, 4)
    plain = sample_batch(*args)
    assert torch.equal(plain, sample_batch(*args, faster=(None, 1)))  # every step a key step
    propagated = sample_batch(*args, faster=([0, 2], 1))  # guided: both halves kept apart
    assert propagated.shape == plain.shape and not torch.equal(propagated, plain)
    dit = diffusers.DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=1,
        num_layers=1,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=11,
    )
    with pytest.raises(DifforgeError, match="faster_diffusion works with UNet2DModel"):
        EncoderPropagation(dit, "DiTTransformer2DModel")
    with pytest.raises(ValueError, match="use one"):
        Params(deepcache={}, faster_diffusion={})
