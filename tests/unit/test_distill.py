"""Distillation without Ray (DeepSpeed's single-rank set-up): the DDIM grid the students sample
on, a guided student that starts as its teacher, and students that really learn: a 2-step
student lands closer to its 4-step teacher than an untrained one, a guided student follows
w in one pass, and a consistency student lands near the teacher's ODE endpoint in one step."""

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
from difforge.diffusion.schedules import (
    consistency_grid,
    consistency_scalings,
    make_noise_scheduler,
    make_scheduler,
    saved_config,
    trailing_grid,
)
from difforge.diffusion.training import consolidated_state, train_locally
from difforge.operators.distill._recipe import consistency, distill, student_scheduler
from difforge.operators.distill.consistency import ConsistencyParams
from difforge.operators.distill.progressive import GuidedParams, ProgressiveParams
from difforge.operators.train.diffusion import Params, train
from tests.unit.test_diffusion_recipe import TINY_UNET, digits_dataset

pytestmark = pytest.mark.slow  # a teacher trained once per module, students trained


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A v-prediction class-conditional UNet on the real 8x8 digits, as a model folder."""
    root = tmp_path_factory.mktemp("teacher")
    data = digits_dataset(root)
    p = Params(
        backbone=TINY_UNET,
        batch_size=64,
        warmup_steps=10,
        checkpoint_every=400,
        max_steps=400,
        prediction_type="v_prediction",
        lr=1e-3,
        ema_decay=None,
    ).model_dump()
    train_locally(
        {"params": p, "shards": data.shards(), "column": "image", "num_classes": 10, "threads": 2},
        str(root / "ckpt"),
        train,
    )
    model, _ = build_backbone(p, 8, 1, 10, None)
    model.load_state_dict(consolidated_state(str(root / "ckpt")))
    model.save_pretrained(str(root / "model" / "model"))
    make_noise_scheduler(p, "image").save_pretrained(str(root / "model" / "scheduler"))
    info = {
        "kind": "diffusion",
        "backbone": "UNet2DModel",
        "column": "image",
        "num_classes": 10,
        "sample_shape": [1, 8, 8],
        "vae": None,
        "prediction_type": "v_prediction",
    }
    (root / "model" / "difforge.json").write_text(json.dumps(info))
    return str(root / "model"), data


def draw(model, config, steps: int, w: float):
    labels = torch.arange(64) % 10
    config = {**config, "timestep_spacing": "trailing"}
    return sample_batch(
        model,
        "UNet2DModel",
        make_scheduler("ddim", config),
        (1, 8, 8),
        list(range(64)),
        labels,
        [w] * 64,
        10,
        steps,
    )


def run_distill(teacher, folder, params: dict, plan: list[dict], guided: bool = False):
    """distill's recipe on the teacher's digits, one rank, no Ray: the training's io."""
    uri, data = teacher
    return train_locally(
        {
            "params": params,
            "plan": plan,
            "shards": data.shards(),
            "column": "image",
            "teacher_uri": uri,
            "guided": guided,
            "threads": 2,
        },
        str(folder),
        distill,
    )


def distilled(teacher, folder, params: dict, plan: list[dict], guided: bool = False):
    """(the teacher, its scheduler config, the trained student in eval mode)."""
    io = run_distill(teacher, folder, params, plan, guided)
    model, _, config, _ = load_model(teacher[0])
    student = copy.deepcopy(model)
    if guided:
        student = GuidedStudent(student, "UNet2DModel")
    student.load_state_dict(consolidated_state(io.folder))
    return model, config, student.eval()


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
    p = ProgressiveParams(
        teacher_steps=4,
        rounds=1,
        steps_per_round=300,
        batch_size=64,
        lr=3e-4,
        warmup_steps=10,
        checkpoint_every=1000,
    ).model_dump()
    plan = [{"kind": "halve", "teacher_steps": 4, "steps": 300, "sample_steps": 2}]
    model, config, student = distilled(teacher, tmp_path / "ckpt", p, plan)
    reference = draw(model, config, 4, 1.0)  # the teacher's 4 steps, same noise
    untrained = (draw(model, config, 2, 1.0) - reference).abs().mean().item()
    trained = (draw(student, config, 2, 1.0) - reference).abs().mean().item()
    assert trained < 0.7 * untrained, (trained, untrained)


def test_guided_student_follows_w_in_one_pass(teacher, tmp_path):
    p = GuidedParams(
        teacher_steps=4,
        rounds=1,
        steps_per_round=200,
        guide_steps=300,
        batch_size=64,
        lr=3e-4,
        w_min=0.0,
        w_max=4.0,
        warmup_steps=10,
        checkpoint_every=1000,
    ).model_dump()
    plan = [
        {"kind": "guide", "steps": 300, "sample_steps": 4},
        {"kind": "halve", "teacher_steps": 4, "steps": 200, "sample_steps": 2},
    ]
    model, config, student = distilled(teacher, tmp_path / "ckpt", p, plan, guided=True)
    reference = draw(model, config, 4, 3.0)  # the teacher with guidance: two passes per step
    unguided = (draw(model, config, 2, 1.0) - reference).abs().mean().item()
    guided = (draw(student, config, 2, 3.0) - reference).abs().mean().item()
    assert guided < 0.7 * unguided, (guided, unguided)


def test_consistency_function_is_the_samplers():
    """Training's c_skip/c_out are the LCM sampler's (what a student learns is what samples it),
    and f is the identity on clean data (the boundary condition)."""
    lcm = diffusers.LCMScheduler()
    t = torch.tensor([0, 1, 19, 99, 999])
    c_skip, c_out = consistency_scalings(t)
    for i, ti in enumerate(t.tolist()):
        skip, out = lcm.get_scalings_for_boundary_condition_discrete(ti)
        assert c_skip[i].item() == pytest.approx(skip) and c_out[i].item() == pytest.approx(out)
    z, a, s = torch.randn(2, 1, 8, 8), torch.ones(2, 1, 1, 1), torch.zeros(2, 1, 1, 1)
    f = consistency(torch.randn(2, 1, 8, 8), z, torch.tensor([-1, -1]), a, s, "v_prediction")
    assert torch.equal(f, z)
    assert consistency_grid(1000, 10) == sorted(trailing_grid(1000, 10))


def test_consistency_student_lands_on_the_teachers_ode_endpoint_in_one_step(teacher, tmp_path):
    """Consistency distillation (Song et al. 2023): after training, the student's one-step
    output from pure noise is much closer to where the teacher's ODE solver takes that noise
    than the untrained student's (the teacher itself, in one step); `pytest -s` prints the ratio."""
    p = ConsistencyParams(
        steps=150,
        ode_steps=10,
        num_inference_steps=1,
        batch_size=64,
        lr=3e-4,
        warmup_steps=10,
        checkpoint_every=1000,
    ).model_dump()
    plan = [{"kind": "consistency", "steps": 150, "ode_steps": 10, "sample_steps": 1}]
    model, config, student = distilled(teacher, tmp_path / "ckpt", p, plan)
    endpoint = draw(model, config, 10, 1.0)  # the teacher's DDIM solver on the same grid
    lcm = saved_config(student_scheduler(config, plan))

    def one_step(net):
        return sample_batch(
            net,
            "UNet2DModel",
            make_scheduler(None, lcm),
            (1, 8, 8),
            list(range(64)),
            torch.arange(64) % 10,
            [1.0] * 64,
            10,
            1,
        )

    untrained = (one_step(model) - endpoint).abs().mean().item()
    trained = (one_step(student) - endpoint).abs().mean().item()
    print(f"one-step distance to the 10-step endpoint: {trained / untrained:.2f} of untrained")
    assert trained < 0.7 * untrained, (trained, untrained)
    # multistep consistency sampling injects noise from each sample's own seed: a sample does
    # not depend on the batch it is drawn in
    two = [
        sample_batch(
            student,
            "UNet2DModel",
            make_scheduler(None, lcm),
            (1, 8, 8),
            seeds,
            torch.tensor([3] * len(seeds)),
            [1.0] * len(seeds),
            10,
            2,
        )
        for seeds in ([5, 6], [6])
    ]
    assert torch.allclose(two[0][1], two[1][0], atol=1e-5) and not torch.allclose(
        two[0][0], two[0][1]
    )


def test_consistency_distillation_resumes_with_its_target_network(teacher, tmp_path):
    """Stopped at a checkpoint and resumed, consistency distillation ends where an
    uninterrupted run ends: the EMA target network travels in the checkpoint."""

    def run(folder, steps: int):
        p = ConsistencyParams(
            steps=steps,
            ode_steps=10,
            num_inference_steps=1,
            batch_size=32,
            lr=3e-4,
            warmup_steps=5,
            checkpoint_every=10,
        ).model_dump()
        plan = [{"kind": "consistency", "steps": steps, "ode_steps": 10, "sample_steps": 1}]
        return run_distill(teacher, folder, p, plan)

    straight = run(tmp_path / "straight", 20)
    run(tmp_path / "stopped", 10)
    resumed = run(tmp_path / "stopped", 20)
    assert [m["step"] for m in resumed.history] == [20]  # it continued from step 10
    a, b = consolidated_state(straight.folder), consolidated_state(resumed.folder)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    ta, tb = (torch.load(f"{io.folder}/ema.pt", weights_only=True) for io in (straight, resumed))
    assert all(torch.allclose(ta[k], tb[k], atol=1e-6) for k in ta)
