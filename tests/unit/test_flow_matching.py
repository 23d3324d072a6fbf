"""Flow matching (rectified flow, Esser et al. 2024) in the training recipe, its model folder and
its samplers, without Ray: a tiny UNet trained briefly on real digits beats its untrained self in
Fréchet distance at 4 Euler steps; the folder records the objective and samples with Euler by
default (or Heun) and refuses DDIM; distillation refuses a flow teacher."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from difforge.diffusion.schedules import (
    flow_times,
    make_noise_scheduler,
    make_scheduler,
    saved_config,
)
from difforge.diffusion.training import consolidated_state, train_locally
from difforge.operators.train.diffusion import Params, train
from difforge.platform.errors import DifforgeError
from tests.unit.test_diffusion_recipe import TINY_UNET, digits_dataset

FLOW = {"objective": "flow_matching", "timesteps": {"density": "logit_normal"}}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(params, trained weights, real digits in [-1, 1]): 60 steps of flow matching."""
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("flow")
    data = digits_dataset(root)
    p = Params(
        backbone=TINY_UNET,
        batch_size=32,
        warmup_steps=10,
        checkpoint_every=30,
        max_steps=60,
        lr=2e-3,
        ema_decay=None,
        **FLOW,
    ).model_dump()
    io = train_locally(
        {"params": p, "shards": data.shards(), "column": "image", "num_classes": 10, "threads": 2},
        str(root / "ckpt"),
        train,
    )
    losses = [m["loss"] for m in io.history]
    assert losses[-1] < losses[0], losses
    real = load_digits().images.reshape(-1, 1, 8, 8) / 8.0 - 1.0
    return p, consolidated_state(str(root / "ckpt")), real.astype(np.float32)


def _fd(p, state, real, sampler: str, steps: int) -> float:
    from difforge.diffusion.backbones import build_backbone
    from difforge.diffusion.sampling import sample_batch
    from difforge.models.metrics import frechet_distance

    torch.manual_seed(0)
    model, _ = build_backbone(p, 8, 1, 10, None)
    if state is not None:
        model.load_state_dict(state)
    config = saved_config(make_noise_scheduler(p, "image"))
    n = 300
    x = sample_batch(
        model.eval(),
        "UNet2DModel",
        make_scheduler(sampler, config),
        (1, 8, 8),
        list(range(n)),
        torch.arange(n) % 10,
        [1.0] * n,
        10,
        steps,
    )
    return frechet_distance(x.clamp(-1, 1).reshape(n, -1).numpy(), real.reshape(len(real), -1))


def test_trained_flow_beats_its_untrained_self_at_4_euler_steps(trained):
    p, state, real = trained
    fd_trained, fd_fresh = _fd(p, state, real, "euler", 4), _fd(p, None, real, "euler", 4)
    assert fd_trained < 0.5 * fd_fresh, (fd_trained, fd_fresh)
    assert _fd(p, state, real, "heun", 4) < 0.5 * fd_fresh  # Heun: two evaluations per step


def test_the_folder_records_the_flow_and_samples_it_by_default(trained, tmp_path):
    from difforge.diffusion.backbones import build_backbone
    from difforge.diffusion.model_folder import ModelInfo, load_model, write_model_folder
    from difforge.diffusion.schedules import default_scheduler

    p, state, _ = trained
    model, _ = build_backbone(p, 8, 1, 10, None)
    model.load_state_dict(state)
    info = ModelInfo(
        backbone="UNet2DModel",
        sample_shape=[1, 8, 8],
        num_classes=10,
        objective="flow_matching",
        prediction_type="velocity",
        timesteps=p["timesteps"],
        null_condition=10,
    )
    write_model_folder(str(tmp_path), info, model, make_noise_scheduler(p, "image"))
    _, loaded, config, _ = load_model(str(tmp_path))
    assert (
        loaded["objective"] == "flow_matching" and loaded["timesteps"]["density"] == "logit_normal"
    )
    assert default_scheduler(config) == "euler"
    assert type(make_scheduler(None, config)).__name__ == "FlowMatchEulerDiscreteScheduler"
    with pytest.raises(DifforgeError, match="flow-matching model samples with euler or heun"):
        make_scheduler("ddim", config)
    with open(tmp_path / "difforge.json") as f:
        assert json.load(f)["prediction_type"] == "velocity"


def test_logit_normal_times_and_params():
    g = torch.Generator().manual_seed(0)
    t = flow_times(20000, {"density": "logit_normal", "mean": 0.0, "std": 1.0}, g)
    assert 0 < t.min() and t.max() < 1
    assert abs(t.mean().item() - 0.5) < 0.01
    # more mass in the middle than uniform: P(0.25 < t < 0.75) is about 0.73 for s = 1
    assert ((t > 0.25) & (t < 0.75)).float().mean().item() > 0.65
    u = flow_times(20000, {"density": "uniform"}, g)
    assert abs(((u > 0.25) & (u < 0.75)).float().mean().item() - 0.5) < 0.02
    assert Params(prediction_type="v_prediction").objective == "v_prediction"  # the old name
    with pytest.raises(ValueError, match="timesteps.density applies to objective flow_matching"):
        Params(timesteps={"density": "logit_normal"})


def test_distillation_refuses_a_flow_teacher():
    from difforge.operators.distill.progressive import Guided, Progressive

    flow = {"objective": "flow_matching", "backbone": "UNet2DModel", "num_classes": 10}
    for op in (Progressive(Progressive.Params()), Guided(Guided.Params())):
        with pytest.raises(DifforgeError, match="the teacher is a flow-matching model"):
            op.check_teacher(flow)
        op.check_teacher({**flow, "objective": "ddpm"})  # a DDPM teacher passes
