"""Progressive distillation: a 2-step student from a 4-step teacher reproduces the teacher's
samples for the same noise far better than the teacher itself does in 2 steps."""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler

import difforge
from difforge.operators.sample.diffusion import load_model, sample_batch
from tests.unit.test_diffusion_recipe import TINY_UNET


def test_two_step_student_matches_four_step_teacher(ray_session, tmp_path):
    spec = {
        "name": "distill",
        "storage": str(tmp_path / "s"),
        "tracking": {"experiment": "distill-tests"},
        "steps": [
            {"id": "raw", "op": "ingest.digits"},
            {"id": "teacher", "op": "train.diffusion", "inputs": ["raw"],
             "params": {"backbone": TINY_UNET, "batch_size": 32, "max_steps": 60,
                        "checkpoint_every": 60, "warmup_steps": 2, "lr": 1e-3,
                        "ema_decay": None}},
            {"id": "student", "op": "distill.progressive", "inputs": ["teacher", "raw"],
             "params": {"teacher_steps": 4, "rounds": 1, "steps_per_round": 150,
                        "batch_size": 32, "lr": 5e-4, "checkpoint_every": 50}},
        ],
    }  # fmt: skip
    summary = difforge.run(spec)
    out = difforge.open_dataset(summary.step("student").uri).to_arrow().to_pylist()[0]
    assert out["num_inference_steps"] == 2
    teacher_uri = difforge.open_dataset(summary.step("teacher").uri).to_arrow().to_pylist()[0]
    teacher, info, cfg, _ = load_model(teacher_uri["model_uri"], "model")
    student, sinfo, scfg, _ = load_model(out["model_uri"], "model")
    assert sinfo["num_inference_steps"] == 2 and sinfo["distilled_from"] == teacher_uri["model_uri"]

    seeds, labels = list(range(64)), torch.arange(64) % 10
    shape = tuple(info["sample_shape"])

    def draw(model, config, steps):
        sched = DDIMScheduler.from_config(
            config, timestep_spacing="trailing", set_alpha_to_one=True
        )
        return sample_batch(model, "UNet2DModel", sched, shape, seeds, labels, [1.0] * 64, None,
                            steps)  # fmt: skip

    reference = draw(teacher, cfg, 4)
    student_error = torch.mean((draw(student, scfg, 2) - reference) ** 2).item()
    untrained_error = torch.mean((draw(teacher, cfg, 2) - reference) ** 2).item()
    assert student_error < 0.6 * untrained_error, (student_error, untrained_error)
