"""Distillation without Ray (DeepSpeed's single-rank set-up): the DDIM grid the students sample
on, a guided student that starts as its teacher, and students that really learn: a 2-step
student lands closer to its 4-step teacher than an untrained one, and a guided student follows
w in one pass."""

from __future__ import annotations

import copy
import json

import diffusers
import pytest
import torch

from difforge.diffusion.backbones import build_backbone
from difforge.diffusion.guided import GuidedStudent
from difforge.diffusion.model_folder import load_model
from difforge.diffusion.sampling import sample_batch
from difforge.diffusion.schedules import make_noise_scheduler, make_scheduler, trailing_grid
from difforge.diffusion.training import consolidated_state, train_locally
from difforge.operators.distill._recipe import distill
from difforge.operators.distill.progressive import GuidedParams, ProgressiveParams
from difforge.operators.train.diffusion import Params, train
from tests.unit.test_diffusion_recipe import TINY_UNET, digits_dataset


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A v-prediction class-conditional UNet on the real 8x8 digits, as a model folder."""
    root = tmp_path_factory.mktemp("teacher")
    data = digits_dataset(root)
    p = Params(backbone=TINY_UNET, batch_size=64, warmup_steps=10, checkpoint_every=400,
               max_steps=400, prediction_type="v_prediction", lr=1e-3, ema_decay=None).model_dump()  # fmt: skip
    train_locally({"params": p, "shards": data.shards(), "column": "image", "num_classes": 10,
                   "threads": 2}, str(root / "ckpt"), train)  # fmt: skip
    model, _ = build_backbone(p, 8, 1, 10, None)
    model.load_state_dict(consolidated_state(str(root / "ckpt")))
    model.save_pretrained(str(root / "model" / "model"))
    make_noise_scheduler(p, "image").save_pretrained(str(root / "model" / "scheduler"))
    info = {"kind": "diffusion", "backbone": "UNet2DModel", "column": "image", "num_classes": 10,
            "sample_shape": [1, 8, 8], "vae": None, "prediction_type": "v_prediction"}  # fmt: skip
    (root / "model" / "difforge.json").write_text(json.dumps(info))
    return str(root / "model"), data


def draw(model, config, steps: int, w: float):
    labels = torch.arange(64) % 10
    config = {**config, "timestep_spacing": "trailing"}
    return sample_batch(model, "UNet2DModel", make_scheduler("ddim", config), (1, 8, 8),
                        list(range(64)), labels, [w] * 64, 10, steps)  # fmt: skip


def test_trailing_grid_is_what_the_sampler_steps_through():
    ddim = diffusers.DDIMScheduler(timestep_spacing="trailing")
    for n in (1, 2, 4, 8, 64):
        ddim.set_timesteps(n)
        assert trailing_grid(1000, n) == ddim.timesteps.tolist()
    assert trailing_grid(1000, 4)[::2] == trailing_grid(
        1000, 2
    )  # a student's grid halves its teacher's


def test_a_fresh_guided_student_is_its_teachers_conditional_model(teacher):
    model, _, _, _ = load_model(teacher[0])
    student = GuidedStudent(copy.deepcopy(model), "UNet2DModel").eval()
    x, t, y = torch.randn(4, 1, 8, 8), torch.full((4,), 500), torch.arange(4)
    with torch.no_grad():
        assert torch.equal(
            student(x, t, y, None, torch.full((4,), 3.0)), model(x, t, class_labels=y).sample
        )


def test_progressive_student_halves_the_steps(teacher, tmp_path):
    uri, data = teacher
    p = ProgressiveParams(teacher_steps=4, rounds=1, steps_per_round=300, batch_size=64, lr=3e-4,
                          warmup_steps=10, checkpoint_every=1000).model_dump()  # fmt: skip
    plan = [{"kind": "halve", "teacher_steps": 4, "steps": 300}]
    io = train_locally({"params": p, "plan": plan, "shards": data.shards(), "column": "image",
                        "teacher_uri": uri, "guided": False, "threads": 2},
                       str(tmp_path / "ckpt"), distill)  # fmt: skip
    model, _, config, _ = load_model(uri)
    student = copy.deepcopy(model)
    student.load_state_dict(consolidated_state(io.folder))
    reference = draw(model, config, 4, 1.0)  # the teacher's 4 steps, same noise
    untrained = (draw(model, config, 2, 1.0) - reference).abs().mean().item()
    trained = (draw(student, config, 2, 1.0) - reference).abs().mean().item()
    assert trained < 0.7 * untrained, (trained, untrained)


def test_guided_student_follows_w_in_one_pass(teacher, tmp_path):
    uri, data = teacher
    p = GuidedParams(teacher_steps=4, rounds=1, steps_per_round=200, guide_steps=300,
                     batch_size=64, lr=3e-4, w_min=0.0, w_max=4.0, warmup_steps=10,
                     checkpoint_every=1000).model_dump()  # fmt: skip
    plan = [{"kind": "guide", "steps": 300}, {"kind": "halve", "teacher_steps": 4, "steps": 200}]
    io = train_locally({"params": p, "plan": plan, "shards": data.shards(), "column": "image",
                        "teacher_uri": uri, "guided": True, "threads": 2},
                       str(tmp_path / "ckpt"), distill)  # fmt: skip
    model, _, config, _ = load_model(uri)
    student = GuidedStudent(copy.deepcopy(model), "UNet2DModel")
    student.load_state_dict(consolidated_state(io.folder))
    student.eval()
    reference = draw(model, config, 4, 3.0)  # the teacher with guidance: two passes per step
    unguided = (draw(model, config, 2, 1.0) - reference).abs().mean().item()
    guided = (draw(student, config, 2, 3.0) - reference).abs().mean().item()
    assert guided < 0.7 * unguided, (guided, unguided)
