"""Encoder propagation (Li et al., "Faster Diffusion: Rethinking the Role of the Encoder for
Diffusion Model Inference", NeurIPS 2024, sec. 3.2-3.3) for the diffusers UNets.

The UNet's encoder (`conv_in`, the down blocks and the mid block) changes little between
adjacent denoising steps, its decoder (the up blocks) a lot. At key steps the whole UNet runs
and the encoder's outputs are kept: `conv_in`'s, each down block's output and skip features,
and the mid block's. At the other steps the encoder is not run at all: the decoder runs with
the current step's time (and class) embedding on the features of the last key step. The paper's
schedule puts key steps densely at the start of sampling and sparsely later; `key_steps` gives
them explicitly (indices into the sampler's steps, 0 first), `interval` uniformly.

Like DeepCache (`deepcache.py`), the encoder's modules are swapped for stand-ins during a
propagated pass and restored after, so the UNet's own forward runs: nothing of diffusers' forward
is copied. The cached features are per sample of the batch, so a guided batch (conditional and
unconditional halves) keeps its layout from step to step, as the sampler's does.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

SUPPORTED = ("UNet2DModel", "UNet2DConditionModel")


class _Cached(nn.Module):
    """Stands in for an encoder module: returns what the module returned at the key step."""

    has_cross_attention = False

    def __init__(self, output: Any):
        super().__init__()
        self.output = output

    def forward(self, *args: Any, **kwargs: Any):
        return self.output


def key_schedule(steps: int, key_steps: list[int] | None, interval: int) -> list[bool]:
    """Which of `steps` sampler steps are key steps (the first always is)."""
    if key_steps is not None:
        keys = {k for k in key_steps if 0 <= k < steps} | {0}
    else:
        keys = set(range(0, steps, interval))
    return [i in keys for i in range(steps)]


def check(model: nn.Module, kind: str) -> None:
    from difforge.platform.errors import DifforgeError

    if kind not in SUPPORTED:
        raise DifforgeError(
            f"faster_diffusion works with {', '.join(SUPPORTED)} backbones, not {kind}"
        )
    if any(hasattr(b, "skip_conv") for b in model.down_blocks):
        raise DifforgeError("faster_diffusion does not support Skip*Block2D UNets")


class EncoderPropagation:
    """Runs a UNet fully (keeping its encoder's outputs) or its decoder alone on them."""

    def __init__(self, model: nn.Module, kind: str):
        check(model, kind)
        self.model = model
        self.outputs: dict[str, Any] | None = None

    def _encoder(self) -> dict[str, nn.Module]:
        m = self.model
        found = {"conv_in": m.conv_in}
        if m.mid_block is not None:
            found["mid_block"] = m.mid_block
        found.update({f"down_blocks.{i}": b for i, b in enumerate(m.down_blocks)})
        return found

    @staticmethod
    def _detached(out: Any) -> Any:
        if isinstance(out, torch.Tensor):
            return out.detach()
        if isinstance(out, tuple):
            return tuple(EncoderPropagation._detached(o) for o in out)
        return out

    @contextlib.contextmanager
    def capture(self):
        """A key step: the whole UNet runs; its encoder's outputs are kept."""
        outputs: dict[str, Any] = {}
        handles = []
        for name, module in self._encoder().items():

            def hook(_module, _args, out, name=name):
                outputs[name] = self._detached(out)

            handles.append(module.register_forward_hook(hook))
        try:
            yield
        finally:
            for h in handles:
                h.remove()
        self.outputs = outputs

    @contextlib.contextmanager
    def propagate(self):
        """A non-key step: the encoder's modules return the key step's outputs."""
        if self.outputs is None:
            raise RuntimeError("encoder propagation: a propagated pass before any key step")
        m = self.model
        saved = (m.conv_in, m.mid_block, list(m.down_blocks))
        try:
            m.conv_in = _Cached(self.outputs["conv_in"])
            if m.mid_block is not None:
                m.mid_block = _Cached(self.outputs["mid_block"])
            for i in range(len(m.down_blocks)):
                m.down_blocks[i] = _Cached(self.outputs[f"down_blocks.{i}"])
            yield
        finally:
            m.conv_in, m.mid_block = saved[0], saved[1]
            for i, block in enumerate(saved[2]):
                m.down_blocks[i] = block
