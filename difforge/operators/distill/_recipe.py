"""The distillation recipe shared by `distill.progressive`, `distill.guided` and
`distill.consistency`, read top to bottom: teacher -> student (a copy) -> DeepSpeed engine ->
resume -> phases -> export.

Phases, in order:
- `guide` (Meng et al., "On Distillation of Guided Diffusion Models", stage one): the student,
  which takes the guidance weight w as an extra input, learns to output in one pass what the
  teacher outputs with classifier-free guidance at w (a conditional and an unconditional pass),
  at random noise levels and w ~ U[w_min, w_max].
- `halve` (Salimans and Ho, "Progressive Distillation for Fast Sampling of Diffusion Models"):
  the student learns to take in one DDIM step what the teacher takes in two, on the teacher's
  N-step grid; at the end of the phase the student becomes the next phase's teacher, N / 2.
- `consistency` (Song et al., "Consistency Models", 2023, Algorithm 2, consistency
  distillation; in the discrete-time, skipping-step form of Luo et al., "Latent Consistency
  Models", 2023): on the grid t_n = n k - 1, the teacher takes one DDIM step from a noised
  example at t_{n+1} to t_n (with classifier-free guidance at `guidance_scale` where given); the
  student's consistency function f(z, t) = c_skip(t) z + c_out(t) x0(z, t) at t_{n+1} learns
  to match an EMA target network's f at the teacher's point (CM eq. 7: d(f_theta(x_{t_{n+1}}),
  f_theta-(x^_{t_n})), the target updated as theta- <- mu theta- + (1 - mu) theta). At t = -1
  (clean data) f is the identity: the boundary condition that anchors the chain.

`guide` and `halve` match the model's estimate of x0 with the "truncated SNR" weight
max(alpha^2/sigma^2, 1) of Salimans and Ho, well-posed at every noise level for v-prediction
models (an epsilon model's x0 estimate divides by alpha, which is ~0 at the noisiest step: distil
v-prediction teachers). DDIM grids are "trailing" (they start at t = T - 1), as the students'
saved schedulers sample. Each phase of an operator's `plan()` names its `kind`, its `steps`
and `sample_steps`, the steps the student samples in once the phase ends (its round's grid is
drawn at them; the last phase's are the exported model's default).
"""

from __future__ import annotations

import copy
import functools
import os
from typing import Any

import torch

from difforge.diffusion.guided import GuidedStudent, teacher_output
from difforge.diffusion.schedules import (
    alpha_sigma,
    consistency_grid,
    consistency_scalings,
    trailing_grid,
    x0_eps,
)


def phase_at(plan: list[dict[str, Any]], step: int) -> tuple[int, dict[str, Any], int]:
    """(index, phase, first step of the phase) for a global optimizer step."""
    start = 0
    for i, ph in enumerate(plan):
        if step < start + ph["steps"]:
            return i, ph, start
        start += ph["steps"]
    return len(plan) - 1, plan[-1], start - plan[-1]["steps"]


def distill(config: dict[str, Any], rank: int, world: int, io) -> None:
    import numpy as np

    from difforge.diffusion.backbones import forward
    from difforge.diffusion.data import ShardStream
    from difforge.diffusion.model_folder import load_model
    from difforge.diffusion.training import (
        deepspeed_config,
        import_deepspeed,
        log_interval,
        to_device,
    )

    deepspeed = import_deepspeed()
    p, plan = config["params"], config["plan"]
    torch.set_num_threads(max(1, int(config.get("threads", 1))))
    on_gpu = torch.cuda.is_available() and config.get("use_gpu", False)
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if on_gpu else "cpu"

    # data (this rank's stream, in an order fixed by the seed), teacher, student
    micro = max(1, p["batch_size"] // world)
    data = ShardStream(
        config["shards"], config["column"], p["seed"], micro, rank, world, p["shuffle_mb"] << 20
    )
    base, info, sched_cfg, vae = load_model(config["teacher_uri"], "ema")
    kind, prediction_type = info["backbone"], info.get("prediction_type", "epsilon")
    num_classes = info.get("num_classes") or 0
    null_label = num_classes if num_classes else None
    clip = bool(sched_cfg.get("clip_sample", False))
    guided = config["guided"]
    torch.manual_seed(p["seed"])
    student = GuidedStudent(copy.deepcopy(base), kind) if guided else copy.deepcopy(base)
    # the phase's teacher (`halve`), or the EMA target network (`consistency`), float32
    teacher = copy.deepcopy(student).eval().requires_grad_(False)
    original = base.eval().requires_grad_(False).to(device)  # the guided teacher of `guide`
    teacher.to(device)
    alphas = torch.tensor(sched_cfg_alphas(sched_cfg), dtype=torch.float32, device=device)
    T = len(alphas)

    optimizer = torch.optim.AdamW(student.parameters(), lr=p["lr"])
    lr_sched = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / max(1, p["warmup_steps"]))
    )
    ds = {**p, "grad_accum": 1}
    engine, _, _, _ = deepspeed.initialize(
        model=student,
        optimizer=optimizer,
        lr_scheduler=lr_sched,
        config=deepspeed_config(ds, micro, world, on_gpu),
    )
    dtype = torch.bfloat16 if engine.bfloat16_enabled() else torch.float32
    # the phase's frozen teacher travels in the checkpoints (the IO's extra-module slot)
    step = io.restore(engine, teacher)
    total = sum(ph["steps"] for ph in plan)
    if any(ph.get("ode_steps", 0) > T for ph in plan):
        raise ValueError(f"ode_steps exceeds the teacher's {T} noise levels")
    step_log = config["log"]
    losses: list = []  # device tensors
    while step < total:
        index, phase, start = phase_at(plan, step)
        if step == start and phase["kind"] == "halve" and (index > 0 or guided):
            # a new round: the student so far becomes the teacher (also after a resume here)
            teacher.load_state_dict(_unwrap(engine).state_dict())
        g = np.random.default_rng([p["seed"], step, rank])
        batch = data.batch(step)
        x0 = to_device(batch.x0, device)
        tg = torch.Generator().manual_seed(int(g.integers(2**62)))
        noise = to_device(torch.randn(x0.shape, generator=tg), device)
        y = to_device(batch.labels, device) if batch.labels is not None and num_classes else None
        c = to_device(batch.cond, device) if batch.cond is not None else None
        w = None
        if guided or p.get("guidance_scale") is not None:
            lo, hi = (p["w_min"], p["w_max"]) if guided else (p["guidance_scale"],) * 2
            w = lo + (hi - lo) * to_device(torch.rand(micro, generator=tg), device)
        # the frozen networks (the teacher, the phase's teacher, the target) are float32
        if phase["kind"] == "guide":
            t = to_device(torch.randint(0, T, (micro,), generator=tg), device)
            a, s = alpha_sigma(alphas, t)
            z = a * x0 + s * noise
            with torch.no_grad():
                out = teacher_output(original, kind, z, t, y, c, w, null_label, False)
                target, _ = x0_eps(out, z, a, s, prediction_type, clip)
        elif phase["kind"] == "consistency":
            grid = torch.tensor(consistency_grid(T, phase["ode_steps"]), device=device)
            t = grid[to_device(torch.randint(0, len(grid), (micro,), generator=tg), device)]
            t1 = t - (T // phase["ode_steps"])  # one step down the grid; -1: clean data
            a, s = alpha_sigma(alphas, t)
            a1, s1 = alpha_sigma(alphas, t1)
            z = a * x0 + s * noise
            with torch.no_grad():  # the teacher's DDIM step t -> t1, then the target's f there
                out = teacher_output(original, kind, z, t, y, c, w, null_label, False)
                hx, he = x0_eps(out, z, a, s, prediction_type, clip)
                z1 = a1 * hx + s1 * he
                out = forward(teacher, kind, z1, t1.clamp(min=0), y, c).float()
                target = consistency(out, z1, t1, a1, s1, prediction_type)
        else:
            grid = trailing_grid(T, phase["teacher_steps"]) + [-1]
            k = 2 * torch.randint(0, phase["teacher_steps"] // 2, (micro,), generator=tg)
            t, t1, t2 = (torch.tensor(grid, device=device)[k + i] for i in range(3))
            a, s = alpha_sigma(alphas, t)
            a1, s1 = alpha_sigma(alphas, t1)
            a2, s2 = alpha_sigma(alphas, t2)
            z = a * x0 + s * noise
            # after `guide`, teachers take w as an input; a fixed guidance scale is applied by
            # the original teacher only (later rounds' teachers have it built in)
            use_w = guided
            wt = w if guided or index == 0 else None
            with torch.no_grad():  # two teacher DDIM steps: t -> t1 -> t2
                out = teacher_output(teacher, kind, z, t, y, c, wt, null_label, use_w)
                hx, he = x0_eps(out, z, a, s, prediction_type, clip)
                z1 = a1 * hx + s1 * he
                out = teacher_output(teacher, kind, z1, t1, y, c, wt, null_label, use_w)
                hx, he = x0_eps(out, z1, a1, s1, prediction_type, clip)
                z2 = a2 * hx + s2 * he
                # the x0 whose one DDIM step from (z, t) lands on z2 (Salimans and Ho, eq. 8)
                ratio = s2 / s
                target = (z2 - ratio * z) / (a2 - ratio * a)
        if guided:
            out = engine(z.to(dtype), t, y, c.to(dtype) if c is not None else None, w).float()
        else:
            out = forward(
                engine, kind, z.to(dtype), t, y, c.to(dtype) if c is not None else None
            ).float()
        if phase["kind"] == "consistency":
            loss = distance(consistency(out, z, t, a, s, prediction_type), target, p["loss"])
        else:
            pred, _ = x0_eps(out, z, a, s, prediction_type, False)
            weight = torch.clamp((a / s) ** 2, min=1.0)
            loss = (weight * (pred - target) ** 2).mean()
        engine.backward(loss)
        engine.step()
        if phase["kind"] == "consistency":  # theta- <- mu theta- + (1 - mu) theta
            with torch.no_grad():
                for target_p, p_ in zip(
                    teacher.parameters(), _unwrap(engine).parameters(), strict=True
                ):
                    target_p.lerp_(p_.detach().float(), 1.0 - p["target_ema"])
        losses.append(loss.detach())  # read at checkpoints: no wait for the device each step
        step += 1
        if rank == 0:
            step_log.log_progress(step, losses[-1])
        ends_phase = step == start + phase["steps"]
        if ends_phase and rank == 0:
            # each round: a grid of the student at its new step count (and its FD if asked)
            log_round(
                config, _unwrap(engine), info, sched_cfg, vae, index, phase["sample_steps"], step
            )
        if step % p["checkpoint_every"] == 0 or ends_phase:
            metrics = {
                "step": step,
                "loss": float(np.mean([x.item() for x in losses])),
                "phase": index,
                "lr": lr_sched.get_last_lr()[0],
            }
            io.save(engine, teacher, step, metrics)
            log_interval(
                step_log,
                step,
                data,
                rank,
                {"loss": metrics["loss"], f"loss_phase_{index}": metrics["loss"]},
            )
            losses = []


def consistency(out, z, t, a, s, prediction_type: str):
    """The consistency function f(z, t) = c_skip(t) z + c_out(t) x0(z, t) of a network output
    at t (Song et al. 2023, eq. 5); at t = -1, clean data, exactly z."""
    x0, _ = x0_eps(out, z, a, s, prediction_type, False)
    c_skip, c_out = consistency_scalings(t)
    return torch.where((t < 0)[:, None, None, None], z, c_skip * z + c_out * x0)


def distance(pred, target, kind: str):
    """The consistency loss's metric d: the squared L2 distance per pixel, or the pseudo-Huber
    sqrt(||x - y||^2 + c^2) - c with c = 0.00054 sqrt(dim) (Song and Dhariwal, "Improved
    Techniques for Training Consistency Models", 2023, sec. 3.3), per example, averaged."""
    if kind == "l2":
        return ((pred - target) ** 2).mean()
    c = 0.00054 * float(pred[0].numel()) ** 0.5
    per = ((pred - target) ** 2).flatten(1).sum(1)
    return ((per + c * c).sqrt() - c).mean()


def student_scheduler(sched_cfg: dict[str, Any], plan: list[dict[str, Any]]):
    """The scheduler a student samples with and saves: a consistency student's LCMScheduler on
    the grid it was trained on (clipping off: training's f does not clip); else DDIM-trailing
    on the teacher's noise schedule."""
    import diffusers

    if plan[-1]["kind"] == "consistency":
        import inspect

        known = inspect.signature(diffusers.LCMScheduler.__init__).parameters
        return diffusers.LCMScheduler.from_config(
            {k: v for k, v in sched_cfg.items() if k in known},
            original_inference_steps=plan[-1]["ode_steps"],
            clip_sample=False,
        )
    return diffusers.DDPMScheduler.from_config({**sched_cfg, "timestep_spacing": "trailing"})


def log_round(config, student, info, sched_cfg, vae, index: int, steps: int, step: int) -> None:
    """The student after a phase: a sample grid per class at its step count, logged to the
    step's MLflow run, and, when the operator has an evaluation input, its Fréchet distance
    (classifier features) against the reference images."""
    import numpy as np

    from difforge.diffusion.sampling import sample_batch, to_pil
    from difforge.diffusion.schedules import make_scheduler, saved_config
    from difforge.platform.show import grid

    p, step_log = config["params"], config["log"]
    classes = info.get("num_classes") or 0
    # a guided student takes w; a fixed guidance scale is built into the student
    w = float(p["w_max"]) if config["guided"] else 1.0
    scheduler_config = saved_config(student_scheduler(sched_cfg, config["plan"][: index + 1]))
    was_training = student.training
    student.eval()

    def draw(n: int, seed0: int):
        labels = torch.arange(n) % max(classes, 1)
        out = []
        for s in range(0, n, 100):
            m = min(100, n - s)
            x = sample_batch(
                student,
                info["backbone"],
                make_scheduler(None, scheduler_config),
                tuple(info["sample_shape"]),
                list(range(seed0 + s, seed0 + s + m)),
                labels[s : s + m],
                [w] * m,
                classes or None,
                steps,
            )
            out += to_pil(x, vae)
        return out

    try:
        tiles = draw(8 * min(max(classes, 1), 10), 0)
        ordered = sorted(range(len(tiles)), key=lambda i: (i % max(classes, 1), i))
        canvas = grid([tiles[i] for i in ordered], columns=8)
        image = canvas.resize((canvas.width * 3, canvas.height * 3), 0)
        step_log.log_image(image, f"round_{index}_{steps}_steps.png")
        if index == len(config["plan"]) - 1:  # the exported student's, drawn where it trained
            step_log.log_image(image, f"samples_{steps}_steps.png")
        ev = config.get("evaluation")
        if ev:
            from difforge.models.classifier import classifier_features
            from difforge.models.metrics import frechet_distance

            net, mode, f_real = _reference(ev["classifier_uri"], ev["reference_uri"], ev["images"])
            arrays = [np.asarray(im.convert(mode)) for im in draw(ev["images"], 10**6)]
            fake = np.stack([a[None] if a.ndim == 2 else a.transpose(2, 0, 1) for a in arrays])
            fd = frechet_distance(f_real, classifier_features(net, fake)[0])
            step_log.log_metrics({f"fd_{steps}_steps": fd, "fd": fd}, step=step)
    finally:
        student.train(was_training)


@functools.lru_cache(maxsize=2)
def _reference(classifier_uri: str, reference_uri: str, images: int):
    """The judge and the reference side's features (its first `images` rows, read alone),
    loaded once per worker, not every round."""
    from difforge.models.classifier import classifier_features, first_images, load_classifier
    from difforge.platform.datasets import open_dataset

    net, cfg = load_classifier(classifier_uri)
    mode = "L" if cfg["in_channels"] == 1 else "RGB"
    real = first_images(open_dataset(reference_uri), images, mode)
    return net, mode, classifier_features(net, real)[0]


def sched_cfg_alphas(sched_cfg: dict[str, Any]):
    """alphas_cumprod of the teacher's DDPM noise schedule."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(sched_cfg).alphas_cumprod.numpy()


def _unwrap(engine):
    return engine.module if hasattr(engine, "module") else engine
