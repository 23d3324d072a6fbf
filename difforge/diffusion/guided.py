"""Guided students (Meng et al., "On Distillation of Guided Diffusion Models"): a UNet that
takes the guidance weight w as an input, and one teacher evaluation with or without it."""

from __future__ import annotations

import math

import torch
from torch import nn


class GuidanceEmbedding(nn.Module):
    """Embeds the guidance weight w (sinusoidal features, then an MLP) and adds it to a UNet's
    time embedding through a forward hook; the last layer starts at zero, so a fresh student is
    exactly its teacher's conditional model."""

    def __init__(self, dim: int, features: int = 32):
        super().__init__()
        self.features = features
        self.mlp = nn.Sequential(nn.Linear(features, dim), nn.SiLU(), nn.Linear(dim, dim))
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        half = self.features // 2
        freqs = torch.exp(-math.log(1000.0) * torch.arange(half, device=w.device) / half)
        angles = w.float()[:, None] * 100.0 * freqs[None]
        return self.mlp(torch.cat([angles.sin(), angles.cos()], 1))


class GuidedStudent(nn.Module):
    """A diffusers UNet plus a guidance-weight input: `forward(x, t, labels, cond, w)`."""

    def __init__(self, unet: nn.Module, kind: str):
        super().__init__()
        if not hasattr(unet, "time_embedding"):
            raise ValueError(f"guided distillation needs a UNet backbone, not {kind}")
        self.unet, self.kind = unet, kind
        self.w_embedding = GuidanceEmbedding(unet.time_embedding.linear_2.out_features)
        self._w: torch.Tensor | None = None
        unet.time_embedding.register_forward_hook(self._add_w)

    def _add_w(self, module, inputs, output):
        return output if self._w is None else output + self.w_embedding(self._w).to(output.dtype)

    def forward(self, x, t, labels, cond, w):
        from difforge.diffusion.backbones import forward

        self._w = w
        try:
            return forward(self.unet, self.kind, x, t, labels, cond)
        finally:
            self._w = None


def teacher_output(teacher, kind, z, t, y, c, w, null_label: int | None, guided_input: bool):
    """One teacher evaluation: with w as an input (a guided student), or classifier-free
    guidance from a conditional and an unconditional pass."""
    from difforge.diffusion.backbones import forward

    if guided_input:
        return teacher(z, t, y, c, w).float()
    if null_label is None or y is None or w is None:
        return forward(teacher, kind, z, t, y, c).float()
    both = forward(
        teacher,
        kind,
        torch.cat([z, z]),
        torch.cat([t, t]),
        torch.cat([y, torch.full_like(y, null_label)]),
        torch.cat([c, torch.zeros_like(c)]) if c is not None else None,
    ).float()
    cond, uncond = both.chunk(2)
    return uncond + w[:, None, None, None] * (cond - uncond)
