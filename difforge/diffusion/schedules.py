"""Noise schedules and samplers' schedulers (diffusers, by name), and the DDIM arithmetic
distillation needs (trailing grids, alpha and sigma at t, x0 and noise estimates)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from difforge.platform import columns as C

if TYPE_CHECKING:
    import torch


FLOW = "flow_matching"


def make_noise_scheduler(p: dict[str, Any], column: str):
    """The training noise schedule of `p["objective"]`: DDPM for epsilon and v prediction,
    the rectified-flow path for flow matching (`FlowMatchEulerDiscreteScheduler`, unshifted:
    x_t = (1 - t) x0 + t noise). Clipping predicted x0 to [-1, 1] suits pixels only: latents
    have unit variance, and clipping them wrecks the samples."""
    if p["objective"] == FLOW:
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=p["num_train_timesteps"])
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=p["num_train_timesteps"],
        beta_schedule=p["beta_schedule"],
        prediction_type=p["objective"],
        clip_sample=column == C.IMAGE,
    )


#: samplers by name, for DDPM-trained models and for flow-matching ones
SCHEDULERS = {
    "ddpm": "DDPMScheduler",
    "ddim": "DDIMScheduler",
    "dpm_solver_pp": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "lcm": "LCMScheduler",  # multistep consistency sampling (a consistency-distilled student)
}
FLOW_SCHEDULERS = {
    "euler": "FlowMatchEulerDiscreteScheduler",
    "heun": "FlowMatchHeunDiscreteScheduler",
}


def saved_config(scheduler) -> dict[str, Any]:
    """A scheduler's config as its model folder saves it: with its class name."""
    return {**scheduler.config, "_class_name": type(scheduler).__name__}


def is_flow(config: dict[str, Any]) -> bool:
    """Whether a saved noise schedule (a model folder's `scheduler/` config) is a flow's."""
    return str(config.get("_class_name", "")).startswith("FlowMatch")


def default_scheduler(config: dict[str, Any]) -> str:
    """A model's own sampler: euler for a flow, lcm for a consistency student, else ddim."""
    if is_flow(config):
        return "euler"
    return "lcm" if config.get("_class_name") == "LCMScheduler" else "ddim"


def make_scheduler(name: str | None, config: dict[str, Any]):
    """The sampler `name` (None: the model's default, see `default_scheduler`) from the
    model's saved noise schedule; a flow-matching model samples with Euler or Heun only."""
    import diffusers

    from difforge.platform.errors import DifforgeError

    name = name or default_scheduler(config)
    if is_flow(config):
        if name not in FLOW_SCHEDULERS:
            raise DifforgeError(
                f"scheduler {name}: a flow-matching model samples with "
                f"{' or '.join(FLOW_SCHEDULERS)}"
            )
        cls = getattr(diffusers, FLOW_SCHEDULERS[name])
        return cls.from_config(
            {k: v for k, v in config.items() if k in ("num_train_timesteps", "shift")}
        )
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


def flow_times(n: int, density: dict[str, Any], generator):
    """Times t in (0, 1) of the rectified-flow path x_t = (1 - t) x0 + t noise (Esser et al.,
    "Scaling Rectified Flow Transformers for High-Resolution Image Synthesis", 2024, sec. 3.1):
    uniform, or logit-normal (their eq. 19: t = sigmoid(u), u ~ N(mean, std)), which puts more
    of training on the middle of the path, where the velocity is hardest to predict."""
    import torch

    if density["density"] == "logit_normal":
        u = torch.randn(n, generator=generator) * density["std"] + density["mean"]
        return torch.sigmoid(u)
    return torch.rand(n, generator=generator)


def consistency_grid(num_train_timesteps: int, ode_steps: int) -> list[int]:
    """The N = `ode_steps` times a consistency student is trained and sampled on: k - 1,
    2k - 1, ..., T - 1 with k = T // N (Luo et al., "Latent Consistency Models", 2023, sec. 4.3:
    a skipping step k over the teacher's DDPM times; diffusers' LCMScheduler samples on the
    same grid, its `original_inference_steps` = N)."""
    k = num_train_timesteps // ode_steps
    return [n * k - 1 for n in range(1, ode_steps + 1)]


def consistency_scalings(t: torch.Tensor, timestep_scaling: float = 10.0, sigma_data: float = 0.5):
    """c_skip(t) and c_out(t) of the consistency function f(x, t) = c_skip x + c_out x0(x, t)
    (Song et al., "Consistency Models", 2023, eq. 5 / appendix C; with Latent Consistency
    Models' discrete-time form, t scaled by `timestep_scaling`): c_skip(0) = 1 and c_out(0) = 0,
    so f is the identity on clean data (the boundary condition), and f is ~x0(x, t) elsewhere.
    Equal to diffusers' `LCMScheduler.get_scalings_for_boundary_condition_discrete`, which
    samples the students (a unit test holds them equal)."""
    scaled = t.float().clamp(min=0) * timestep_scaling
    c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
    c_out = scaled / (scaled**2 + sigma_data**2).sqrt()
    return c_skip[:, None, None, None], c_out[:, None, None, None]
