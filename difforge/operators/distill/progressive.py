"""`distill.progressive`: progressive distillation (Salimans and Ho, "Progressive Distillation
for Fast Sampling of Diffusion Models"). A teacher sampled with 2N deterministic DDIM steps is
distilled into a student that takes N: for x_t on the student's grid, two teacher steps
t -> t' -> t'' give x_t''; the student's x0-prediction is regressed onto the x~ for which one
DDIM step from x_t lands exactly on x_t'':

    x~ = (x_t'' - (sigma_t''/sigma_t) x_t) / (alpha_t'' - (sigma_t''/sigma_t) alpha_t)

weighted by max(SNR(t), 1) ("truncated SNR"). Each round halves the steps and the student
becomes the next teacher. Same DeepSpeed + Ray Train machinery as train.diffusion.

The grids use diffusers' "trailing" timestep spacing: the grid of N steps is every second
point of the grid of 2N, and DDIMScheduler(timestep_spacing="trailing") samples the student
on exactly the grid it was distilled for.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

from difforge.platform import columns as C
from difforge.platform.errors import DifforgeError
from difforge.platform.operator import JobOperator, JobResult
from difforge.platform.spec import Resources

if TYPE_CHECKING:
    from difforge.platform.context import JobContext


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")

    teacher_steps: int = Field(8, ge=2, description="N0: the teacher's DDIM steps")
    rounds: int = Field(2, ge=1, description="R: each halves the steps (8 -> 4 -> 2)")
    steps_per_round: int = Field(500, ge=1, description="optimizer steps per round")
    guidance_scale: float = Field(1.0, ge=0, description="the teacher's classifier-free guidance")
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-4, gt=0)
    checkpoint_every: int = Field(100, ge=1)
    seed: int = 0
    zero_stage: int = Field(2, ge=0, le=2)

    @model_validator(mode="after")
    def _halves(self) -> Params:
        if self.teacher_steps % (2**self.rounds):
            raise ValueError(f"teacher_steps={self.teacher_steps} cannot be halved "
                             f"{self.rounds} times")  # fmt: skip
        return self

    @property
    def student_steps(self) -> int:
        return self.teacher_steps // 2**self.rounds


def grid(steps: int, t_max: int):
    """Timestep indices of a `steps`-step trailing grid, from the clean end: [-1, ..., T-1];
    -1 stands for the clean image (alpha 1, sigma 0)."""
    return [int(k * t_max / steps) - 1 for k in range(steps + 1)]


def alpha_sigma(alphas_cumprod, t):
    import torch

    a = torch.where(t >= 0, alphas_cumprod[t.clamp(min=0)], torch.ones_like(t, dtype=torch.float32))
    return a.sqrt()[:, None, None, None], (1 - a).sqrt()[:, None, None, None]


def ddim_step(eps, x, t, s, alphas_cumprod):
    """One deterministic DDIM step from t to s (s = -1: the clean image)."""
    a_t, s_t = alpha_sigma(alphas_cumprod, t)
    a_s, s_s = alpha_sigma(alphas_cumprod, s)
    x0 = (x - s_t * eps) / a_t
    return a_s * x0 + s_s * eps, x0


def distill_loop(config: dict[str, Any]) -> None:
    import numpy as np
    import ray.train
    import torch
    from diffusers import DDPMScheduler

    from difforge.operators.sample.diffusion import load_model
    from difforge.operators.train.diffusion import forward, import_deepspeed, load_data

    deepspeed = import_deepspeed()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(config.get("threads", 1))))
    p = config["params"]
    teacher, info, sched_cfg, _ = load_model(config["teacher_uri"])
    kind, num_classes = info["backbone"], info["num_classes"] or 0
    x, labels, _ = load_data(config["files"], info["column"])
    acp = DDPMScheduler.from_config(sched_cfg).alphas_cumprod.float()
    t_max = len(acp)
    student = copy.deepcopy(teacher).train()
    teacher.eval().requires_grad_(False)
    micro = max(1, p["batch_size"] // world)
    optimizer = torch.optim.AdamW(student.parameters(), lr=p["lr"])
    engine, _, _, _ = deepspeed.initialize(model=student, optimizer=optimizer, config={
        "train_micro_batch_size_per_gpu": micro, "train_batch_size": micro * world,
        "zero_optimization": {"stage": p["zero_stage"]}, "zero_allow_untested_optimizer": True,
        "gradient_clipping": 1.0, "steps_per_print": 10**9})  # fmt: skip
    total = p["rounds"] * p["steps_per_round"]
    step = 0
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            engine.load_checkpoint(d, tag="state")
            teacher.load_state_dict(torch.load(os.path.join(d, "teacher.pt"), weights_only=True))
            with open(os.path.join(d, "progress.json")) as f:
                step = json.load(f)["step"]
    tracker = config["tracker"]
    losses: list[float] = []

    def eps_of(model, xt, t, y):
        out = forward(model, kind, xt, t, y, None)
        if p["guidance_scale"] != 1.0 and num_classes:
            un = forward(model, kind, xt, t, torch.full_like(y, num_classes), None)
            out = un + p["guidance_scale"] * (out - un)
        return out

    while step < total:
        rnd = step // p["steps_per_round"]
        n_student = p["teacher_steps"] // 2 ** (rnd + 1)
        g_student, g_teacher = grid(n_student, t_max), grid(2 * n_student, t_max)
        g = np.random.default_rng([p["seed"], step, rank])
        idx = g.integers(0, len(x), micro)
        i = torch.from_numpy(g.integers(1, n_student + 1, micro))
        t = torch.tensor([g_student[k] for k in i.tolist()])
        t1 = torch.tensor([g_teacher[2 * k - 1] for k in i.tolist()])
        t2 = torch.tensor([g_student[k - 1] for k in i.tolist()])
        x0 = torch.from_numpy(x[idx])
        y = torch.from_numpy(labels[idx]) if labels is not None else None
        noise = torch.from_numpy(g.standard_normal(x0.shape).astype(np.float32))
        a_t, s_t = alpha_sigma(acp, t)
        xt = a_t * x0 + s_t * noise
        with torch.no_grad():
            x1, _ = ddim_step(eps_of(teacher, xt, t, y), xt, t, t1, acp)
            x2, _ = ddim_step(eps_of(teacher, x1, t1, y), x1, t1, t2, acp)
            a_2, s_2 = alpha_sigma(acp, t2)
            ratio = s_2 / s_t
            target = (x2 - ratio * xt) / (a_2 - ratio * a_t)
        eps = forward(engine, kind, xt, t, y, None)
        x0_hat = (xt - s_t * eps) / a_t
        weight = torch.clamp(a_t**2 / s_t**2, min=1.0)  # truncated SNR weighting
        loss = (weight * (x0_hat - target) ** 2).mean()
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
        step += 1
        round_end = step % p["steps_per_round"] == 0
        if step % p["checkpoint_every"] == 0 or round_end:
            if round_end:  # the student becomes the next round's teacher
                teacher.load_state_dict(engine.module.state_dict())
            metrics = {"step": step, "round": rnd, "student_steps": n_student,
                       "loss": float(np.mean(losses))}  # fmt: skip
            with tempfile.TemporaryDirectory() as d:
                engine.save_checkpoint(d, tag="state")
                if rank == 0:
                    torch.save(teacher.state_dict(), os.path.join(d, "teacher.pt"))
                    with open(os.path.join(d, "progress.json"), "w") as f:
                        json.dump({"step": step}, f)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
            if rank == 0:
                tracker.log_new({"distill_loss": metrics["loss"],
                                 "student_steps": n_student}, step=step)  # fmt: skip
            losses = []


class Progressive(JobOperator):
    """Progressive distillation: halves the sampling steps of a model per round."""

    name = "distill.progressive"
    version = 1
    Params = Params
    inputs: ClassVar[tuple[int, int]] = (2, 2)
    reads = (C.MODEL_URI,)
    resources = Resources(num_workers=1, num_cpus=1, num_gpus="auto")
    gpus_when_available = 1.0

    @classmethod
    def output_columns(cls, params, input_columns):
        return {C.ID, C.MODEL_URI, "kind", "num_inference_steps", "final_loss"}

    def run(self, ctx: JobContext) -> JobResult:
        import pyarrow as pa

        from difforge.operators.sample.diffusion import load_model
        from difforge.operators.train import _raytrain
        from difforge.operators.train.diffusion import consolidated_state, import_deepspeed
        from difforge.platform.datasets import url_to_fs

        teacher_row = ctx.inputs[0].to_arrow().to_pylist()[0]
        if teacher_row.get("kind") != "diffusion":
            raise DifforgeError("distill.progressive: the first input must be a train.diffusion "
                                "(or distill) step; the second, its training data")  # fmt: skip
        teacher_uri = teacher_row[C.MODEL_URI]
        config = {"params": self.params.model_dump(), "teacher_uri": teacher_uri,
                  "files": ctx.inputs[1].file_uris()}  # fmt: skip
        result = _raytrain.fit(ctx, distill_loop, config)
        import_deepspeed()
        model, info, sched_cfg, _ = load_model(teacher_uri)
        with result.checkpoint.as_directory() as d:
            model.load_state_dict(consolidated_state(d))
        steps = self.params.student_steps
        info = {**info, "num_inference_steps": steps, "distilled_from": teacher_uri,
                "distillation": "progressive"}  # fmt: skip
        from diffusers import DDIMScheduler

        scheduler = DDIMScheduler.from_config(sched_cfg, timestep_spacing="trailing",
                                              set_alpha_to_one=True)  # fmt: skip
        with tempfile.TemporaryDirectory() as d:
            model.save_pretrained(os.path.join(d, "model"))
            scheduler.save_pretrained(os.path.join(d, "scheduler"))
            with open(os.path.join(d, "difforge.json"), "w") as f:
                json.dump(info, f, indent=2)
            fs, path = url_to_fs(ctx.artifact("model"))
            fs.put(d + "/", path, recursive=True)
            ctx.tracker.log_artifacts(d, "model")
        table = pa.table({C.ID: ["model"], C.MODEL_URI: [ctx.artifact("model")],
                          "kind": ["diffusion"],
                          "num_inference_steps": pa.array([steps], pa.int64()),
                          "final_loss": [float(result.metrics["loss"])]})  # fmt: skip
        return JobResult(table, metadata={"model": info})
