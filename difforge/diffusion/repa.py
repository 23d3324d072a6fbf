"""REPA, representation alignment (Yu et al., "Representation Alignment for Generation:
Training Diffusion Transformers Is Easier Than You Think", ICLR 2025, sec. 3.3, eq. 8-9).

A hidden state h_t of the denoiser at an early block, computed on the noisy input x_t, passes
through a small trainable MLP projector h_phi applied at each position, and is aligned with a
frozen encoder's features y* of the clean image at the same positions:

    L_REPA = - E[ 1/N sum_n sim(y*_n, h_phi(h_t,n)) ]      (eq. 8, sim: cosine similarity)
    L = L_diffusion + lambda L_REPA                        (eq. 9)

The encoder's features come precomputed, as a tensor column of the training data (for example
`encode.features` with `pooling: none` on the pipeline's own `train.classifier`: its pre-pool
map, 128 x 8 x 8 for 32 x 32 images), so the encoder never trains and never runs in the
training loop (`RepaParams`, in backbones.py, are its settings). The projector trains with the network (in the same DeepSpeed engine and its
checkpoints) and is dropped at export: sampling does not use it.

Where the hidden state is taken: `block` k is the output of UNet down block k, or of DiT
transformer block k (its patch tokens, laid out on the patch grid). Where the grids differ, the
encoder's map is average-pooled (or, if coarser, bilinearly resized) to the hidden state's."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from difforge.diffusion.backbones import BlockOutput


def block_name(kind: str, block: int) -> str:
    """`repa.block` k as the backbone's block name (see `backbones.named_block`)."""
    return (
        f"transformer_blocks.{block}" if kind == "DiTTransformer2DModel" else f"down_blocks.{block}"
    )


def hidden_channels(net: nn.Module, kind: str, block: int) -> int:
    if kind == "DiTTransformer2DModel":
        return net.inner_dim
    return net.config.block_out_channels[block]


class Aligned(nn.Module):
    """A backbone and its REPA projector, trained as one module: `forward` is the backbone's
    (it records the hidden state of the aligned block); `alignment_loss(y)` is L_REPA."""

    def __init__(self, net: nn.Module, kind: str, p: dict[str, Any], feature_dim: int):
        super().__init__()
        self.net, self.kind = net, kind
        width = p["projector_dim"]
        self._hidden = BlockOutput(net, block_name(kind, p["block"]), "repa.block")
        c = hidden_channels(net, kind, p["block"])
        # the paper's projector: a 3-layer MLP with SiLU, at each position
        self.projector = nn.Sequential(
            nn.Linear(c, width),
            nn.SiLU(),
            nn.Linear(width, width),
            nn.SiLU(),
            nn.Linear(width, feature_dim),
        )

    def forward(self, *args, **kwargs):
        self._hidden.value = None
        return self.net(*args, **kwargs)

    def tokens(self) -> torch.Tensor:
        """The last forward's hidden state as [B, N, C] with its grid (h, w)."""
        h = self._hidden.value
        if h.ndim == 4:  # a UNet feature map [B, C, H, W]
            b, c, hh, ww = h.shape
            return h.flatten(2).transpose(1, 2), (hh, ww)
        side = int(round(h.shape[1] ** 0.5))  # DiT patch tokens [B, N, C] on a square grid
        return h, (side, side)

    def alignment_loss(self, target: torch.Tensor, probe: bool = False) -> torch.Tensor:
        """-mean cosine similarity between the projected hidden state and the encoder's
        features (eq. 8), position by position; pooled features ([B, D]) align with the
        mean of the projected positions. `probe`: the hidden state detached, so that only the
        projector learns (how aligned the network is on its own: the control of weight 0)."""
        tokens, (hh, ww) = self.tokens()
        if probe:
            tokens = tokens.detach()
        projected = self.projector(tokens.float())  # [B, N, D]
        if target.ndim == 2:
            sim = nn.functional.cosine_similarity(projected.mean(1), target, dim=-1)
            return -sim.mean()
        target = match_grid(target.float(), (hh, ww))  # [B, D, hh, ww]
        sim = nn.functional.cosine_similarity(projected, target.flatten(2).transpose(1, 2), dim=-1)
        return -sim.mean()


def match_grid(target: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The encoder's map [B, D, H, W] on the hidden state's grid."""
    if tuple(target.shape[-2:]) == size:
        return target
    if target.shape[-2] >= size[0] and target.shape[-1] >= size[1]:
        return nn.functional.adaptive_avg_pool2d(target, size)
    return nn.functional.interpolate(target, size=size, mode="bilinear", align_corners=False)


def backbone_state(state: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's weights without the projector, keyed as the bare network's."""
    if not any(k.startswith("projector.") for k in state):
        return state
    return {k[len("net.") :]: v for k, v in state.items() if k.startswith("net.")}
