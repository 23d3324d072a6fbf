"""The sampler, one explicit loop, and turning its outputs into images."""

from __future__ import annotations


def sample_batch(
    model,
    kind: str,
    scheduler,
    shape: tuple[int, ...],
    seeds: list[int],
    labels,
    guidance: list[float],
    null_label: int | None,
    steps: int,
    device: str = "cpu",
    dtype=None,
    deepcache: tuple[int, int] | None = None,
    cond=None,
    uncond=None,
    faster: tuple[list[int] | None, int] | None = None,
):
    """The sampler, one explicit loop: noise from each sample's own generator, then the
    scheduler's steps with classifier-free guidance (a conditional and an unconditional pass).
    A text model takes `cond` (the prompts' embeddings) and guides against `uncond` (the null
    condition, or a negative prompt's embedding, per sample) instead of class labels.
    `deepcache=(interval, branch)` runs the full UNet every `interval` steps and only its
    shallow path in between; `faster=(key_steps, interval)` runs its encoder at key steps only
    (Faster Diffusion's encoder propagation)."""
    import contextlib
    import inspect

    import torch

    from difforge.diffusion.backbones import forward
    from difforge.diffusion.deepcache import DeepCache

    dtype = dtype or torch.float32
    scheduler.set_timesteps(steps)
    # each sample's own generator draws its starting noise and, for samplers that inject noise
    # on the way (ddpm, lcm), that noise too: a sample depends on its seed alone
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    x = torch.stack([torch.randn(shape, generator=g) for g in generators]).to(device)
    noisy = "generator" in inspect.signature(scheduler.step).parameters
    x = x * getattr(scheduler, "init_noise_sigma", 1.0)
    # a flow's sampler (no input scaling) steps through real-valued times; the network was
    # trained on those, not on their integer part
    flow = not hasattr(scheduler, "scale_model_input")
    w = torch.tensor(guidance, device=device, dtype=torch.float32)[:, None, None, None]
    text = cond is not None
    if text:
        cond = cond.to(device, dtype)
        uncond = None if uncond is None else uncond.to(device, dtype)
    null = uncond if text else null_label
    guided = null is not None and any(g != 1.0 for g in guidance)
    takes_w = hasattr(model, "w_embedding")  # a guided student: no unconditional pass
    n = len(seeds)
    unet = getattr(model, "unet", model)  # a guided student wraps its UNet
    cache = DeepCache(unet, kind, deepcache[1]) if deepcache and deepcache[0] > 1 else None
    propagation = keys = None
    if faster is not None:
        from difforge.diffusion.faster import EncoderPropagation, key_schedule

        propagation = EncoderPropagation(unet, kind)
        keys = key_schedule(len(scheduler.timesteps), faster[0], faster[1])
    for i, t in enumerate(scheduler.timesteps):
        xin = (x if flow else scheduler.scale_model_input(x, t)).to(dtype)
        tt = (
            torch.full((n,), float(t), device=device)
            if flow
            else torch.full((n,), int(t), device=device, dtype=torch.long)
        )
        mode = contextlib.nullcontext()
        if cache is not None:
            mode = cache.capture() if i % deepcache[0] == 0 else cache.shallow()
        elif propagation is not None:
            mode = propagation.capture() if keys[i] else propagation.propagate()
        with torch.no_grad(), mode:
            if takes_w:
                out = model(xin, tt, labels, None, w.flatten().to(dtype)).float()
            elif guided:
                both = forward(
                    model,
                    kind,
                    torch.cat([xin, xin]),
                    torch.cat([tt, tt]),
                    None if text else torch.cat([labels, torch.full_like(labels, null_label)]),
                    torch.cat([cond, uncond]) if text else None,
                )
                on, off = both.float().chunk(2)
                out = off + w * (on - off)
            else:
                out = forward(model, kind, xin, tt, None if text else labels, cond).float()
        extra = {"generator": generators} if noisy else {}
        x = scheduler.step(out, t, x, **extra).prev_sample
    return x


def built_in_guidance(info: dict, guidance: list[float]) -> tuple[list[float], list[float]]:
    """(what the sampler applies, what the images were drawn at). A student distilled from a
    guided teacher at a fixed w (`guidance_scale` in its difforge.json) has that guidance in its
    one conditional pass: it is sampled without classifier-free guidance, at its own w."""
    w = info.get("guidance_scale")
    if w is None:
        return guidance, guidance
    return [1.0] * len(guidance), [float(w)] * len(guidance)


def prompt_conditions(text, prompts: list[str | None], negatives: list[str | None] | None = None):
    """`text`: (encoder, null) of a text model (`model_folder.text_conditioning`). The prompts'
    embeddings, and per sample what guidance pushes away from: its negative prompt's embedding
    where it has one, else the model's null condition."""
    import torch

    from difforge.platform.errors import DifforgeError

    encoder, null = text
    if any(p is None for p in prompts):
        raise DifforgeError(
            "a text-conditional model needs a prompt for every image (sample.plan with prompts)"
        )
    cond = torch.from_numpy(encoder.embed(prompts))
    uncond = null.to(cond.dtype).expand_as(cond).clone()
    which = [i for i, t in enumerate(negatives or []) if t]
    if which:
        uncond[which] = torch.from_numpy(encoder.embed([negatives[i] for i in which]))
    return cond, uncond


def to_pil(x, vae=None):
    """Model outputs in [-1, 1] (decoded through the VAE for latents) as PIL images. Other
    channel counts than 1 and 3 (latents with no VAE to decode them) show each channel side by
    side in grey."""
    import numpy as np
    import torch
    from PIL import Image

    if vae is not None:
        with torch.no_grad():
            x = vae.decode(x / vae.config.scaling_factor).sample
    arr = x.clamp(-1, 1).add(1).mul(127.5).round().byte().cpu().numpy()
    if arr.shape[1] == 1:
        return [Image.fromarray(a[0], "L") for a in arr]
    if arr.shape[1] != 3:
        return [Image.fromarray(np.concatenate(list(a), axis=1), "L") for a in arr]
    return [Image.fromarray(a.transpose(1, 2, 0), "RGB") for a in arr]
