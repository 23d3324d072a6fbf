"""DeepCache (Ma et al., "DeepCache: Accelerating Diffusion Models for Free", CVPR 2024) for the
diffusers UNets, at block granularity.

High-level features of a UNet change little between adjacent denoising steps. Every
`cache_interval` steps the whole network runs and the input of the up block that mirrors down
block `cache_branch` (the deep feature) is kept; on the steps between, only the shallow path
runs: `conv_in`, down blocks 0..cache_branch, and the up blocks from the mirror of
`cache_branch` to the end, fed with that cached deep feature. Branch 0 is the shallowest and
cheapest.

The deep blocks are swapped for stand-ins during a shallow pass (and restored after), so the
UNet's own forward still runs, with its own time and class embeddings and its own wiring of skip
connections: nothing of diffusers' forward is copied here.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

SUPPORTED = ("UNet2DModel", "UNet2DConditionModel")


class _SkippedDown(nn.Module):
    """Stands in for a deep down block: returns as many (unused) residuals as it would."""

    has_cross_attention = False

    def __init__(self, block: nn.Module):
        super().__init__()
        self.count = len(block.resnets) + (1 if getattr(block, "downsamplers", None) else 0)

    def forward(self, hidden_states, *args: Any, **kwargs: Any):
        return hidden_states, (hidden_states,) * self.count


class _SkippedMid(nn.Module):
    has_cross_attention = False

    def forward(self, hidden_states, *args: Any, **kwargs: Any):
        return hidden_states


class _SkippedUp(nn.Module):
    """Stands in for a deep up block: consumes its residuals; the last one yields the cache."""

    has_cross_attention = False

    def __init__(self, block: nn.Module, cached: torch.Tensor | None):
        super().__init__()
        self.resnets = [None] * len(block.resnets)  # the UNet slices residuals by this length
        self.cached = cached

    def forward(self, hidden_states, *args: Any, **kwargs: Any):
        return self.cached if self.cached is not None else hidden_states


def check(model: nn.Module, kind: str, branch: int) -> None:
    from difforge.platform.errors import DifforgeError

    if kind not in SUPPORTED:
        raise DifforgeError(f"deepcache works with {', '.join(SUPPORTED)} backbones, not {kind}")
    n = len(model.down_blocks)
    if not 0 <= branch < n - 1:
        raise DifforgeError(
            f"deepcache.cache_branch {branch}: this UNet has {n} down blocks, so "
            f"0..{n - 2} (0 is the shallowest and fastest)"
        )
    if any(hasattr(b, "skip_conv") for b in [*model.down_blocks, *model.up_blocks]):
        raise DifforgeError("deepcache does not support Skip*Block2D UNets")


class DeepCache:
    """Runs a UNet fully or through its shallow path, keeping the deep feature between."""

    def __init__(self, model: nn.Module, kind: str, branch: int):
        check(model, kind, branch)
        self.model, self.branch = model, branch
        n = len(model.up_blocks)
        self.mirror = n - 1 - branch  # the up block that mirrors down block `branch`
        self.cached: torch.Tensor | None = None

    @contextlib.contextmanager
    def capture(self):
        """A full pass: keep the input of the mirror up block."""

        def hook(module, args, kwargs):
            feature = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            self.cached = feature.detach()

        handle = self.model.up_blocks[self.mirror].register_forward_pre_hook(hook, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()

    @contextlib.contextmanager
    def shallow(self):
        """A shallow pass: the deep blocks are stand-ins; the cached feature enters the mirror."""
        if self.cached is None:
            raise RuntimeError("DeepCache: a shallow pass before any full pass")
        m, b = self.model, self.branch
        saved = (list(m.down_blocks), m.mid_block, list(m.up_blocks))
        try:
            for i in range(b + 1, len(m.down_blocks)):
                m.down_blocks[i] = _SkippedDown(saved[0][i])
            m.mid_block = _SkippedMid()
            for i in range(self.mirror):
                last = i == self.mirror - 1
                m.up_blocks[i] = _SkippedUp(saved[2][i], self.cached if last else None)
            yield
        finally:
            for i, block in enumerate(saved[0]):
                m.down_blocks[i] = block
            m.mid_block = saved[1]
            for i, block in enumerate(saved[2]):
                m.up_blocks[i] = block
