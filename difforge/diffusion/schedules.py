"""Noise schedules and samplers' schedulers (diffusers, by name), and the DDIM arithmetic
distillation needs (trailing grids, alpha and sigma at t, x0 and noise estimates)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from difforge.platform import columns as C

if TYPE_CHECKING:
    import torch


def make_noise_scheduler(p: dict[str, Any], column: str):
    """The DDPM noise schedule. Clipping predicted x0 to [-1, 1] suits pixels only: latents
    have unit variance, and clipping them wrecks the samples."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=p["num_train_timesteps"],
                         beta_schedule=p["beta_schedule"], prediction_type=p["prediction_type"],
                         clip_sample=column == C.IMAGE)  # fmt: skip


SCHEDULERS = {
    "ddpm": "DDPMScheduler",
    "ddim": "DDIMScheduler",
    "dpm_solver_pp": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
}


def make_scheduler(name: str, config: dict[str, Any]):
    import diffusers

    cls = getattr(diffusers, SCHEDULERS[name])
    extra = {"algorithm_type": "dpmsolver++"} if name == "dpm_solver_pp" else {}
    return cls.from_config(config, **extra)


def trailing_grid(num_train_timesteps: int, steps: int) -> list[int]:
    """The DDIM timesteps of a `trailing` spacing: T-1 first, then every T/steps."""
    import numpy as np

    grid = np.round(np.arange(num_train_timesteps, 0, -num_train_timesteps / steps)) - 1
    return [int(t) for t in grid.astype(np.int64)]


def alpha_sigma(alphas_cumprod: torch.Tensor, t: torch.Tensor):
    """sqrt(alpha_bar) and sqrt(1 - alpha_bar) at t, shaped for images; t = -1 is clean data."""
    import torch

    ab = torch.where(
        t >= 0, alphas_cumprod[t.clamp(min=0)], torch.ones_like(t, dtype=torch.float32)
    )
    return ab.sqrt()[:, None, None, None], (1 - ab).sqrt()[:, None, None, None]


def x0_eps(out, z, a, s, prediction_type: str, clip: bool):
    """The model's estimates of x0 and of the noise, as diffusers' DDIM computes them."""
    if prediction_type == "v_prediction":
        x0, eps = a * z - s * out, a * out + s * z
    else:
        x0, eps = (z - s * out) / a, out
    return (x0.clamp(-1, 1) if clip else x0), eps
