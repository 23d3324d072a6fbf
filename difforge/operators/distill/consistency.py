"""`distill.consistency` (Song et al., "Consistency Models", 2023, consistency distillation;
Luo et al., "Latent Consistency Models", 2023, for the skipping-step grid and guided teachers):
a trained diffusion model distilled into a student that maps any point of the teacher's
probability-flow ODE trajectory to its origin, and so samples in 1 to 4 steps (multistep
consistency sampling, diffusers' LCMScheduler). Same machinery as `distill.progressive`
(DeepSpeed under Ray Train, checkpoints with the EMA target, resume, one loss point per
checkpoint, a registered model); the recipe is the `consistency` phase of _recipe.py.

Inputs: the teacher (a `train.diffusion` step, epsilon or v-prediction) and the data it was
trained on; optionally a `train.classifier` step and reference images, for a Fréchet distance of
the student at its step count.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from difforge.operators.distill.progressive import Training, _Distill


class ConsistencyParams(Training):
    steps: int = Field(1000, ge=1, description="optimizer steps")
    ode_steps: int = Field(
        50,
        ge=2,
        description="N: the teacher's solver takes one DDIM step "
        "between neighbours of an N-point grid over its T noise levels "
        "(LCM: 50 of 1000, a skipping step of 20)",
    )
    num_inference_steps: int = Field(
        4,
        ge=1,
        le=8,
        description="the steps the student samples in by default (any of 1 to ode_steps works)",
    )
    target_ema: float = Field(
        0.95,
        ge=0,
        lt=1,
        description="mu of the target network "
        "theta- <- mu theta- + (1 - mu) theta (LCM: 0.95; 0: the student "
        "itself, without gradient)",
    )
    loss: Literal["l2", "pseudo_huber"] = Field(
        "l2", description="the distance d: squared L2, or pseudo-Huber (Song and Dhariwal 2023)"
    )
    guidance_scale: float | None = Field(
        None,
        description="distil the teacher's classifier-free guided ODE at this w: the "
        "student has it built in and samples with one conditional pass per step",
    )

    @model_validator(mode="after")
    def _check(self):
        if self.num_inference_steps > self.ode_steps:
            raise ValueError(
                f"num_inference_steps {self.num_inference_steps} exceeds the "
                f"ode_steps grid ({self.ode_steps})"
            )
        if self.deepspeed.zero_stage == 3:
            raise ValueError(
                "deepspeed.zero_stage 3 partitions the student's parameters, "
                "which the target network's EMA reads whole: use 0, 1 or 2"
            )
        return self


class Consistency(_Distill):
    """Consistency distillation: a student that samples in 1-4 steps."""

    name = "distill.consistency"
    version = 1
    Params = ConsistencyParams

    def plan(self) -> list[dict[str, Any]]:
        p = self.params
        return [
            {
                "kind": "consistency",
                "steps": p.steps,
                "ode_steps": p.ode_steps,
                "sample_steps": p.num_inference_steps,
            }
        ]

    def check_teacher(self, info: dict) -> None:
        from difforge.platform.errors import DifforgeError

        super().check_teacher(info)

        if self.params.guidance_scale is not None and not info.get("num_classes"):
            raise DifforgeError(f"{self.name}: guidance_scale needs a class-conditional teacher")
