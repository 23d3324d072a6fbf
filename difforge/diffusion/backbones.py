"""Backbones from config and the forward pass with its conditioning.

A backbone is a diffusers model named by `type` (UNet2DModel, UNet2DConditionModel,
DiTTransformer2DModel), the other keys its constructor's arguments; its condition input is sized
for the data. Condition Embedding Perturbation (Chen et al., "Slight Corruption in Pre-training
Data Makes Better Diffusion Models", eq. 8): during training only, the condition embedding c
becomes c + delta, delta ~ U(-gamma/sqrt(d), gamma/sqrt(d)) (uniform) or N(0, (gamma/sqrt(d))^2 I)
(gaussian), d the embedding dimension. Sampling never perturbs."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from difforge.platform.errors import DifforgeError

BACKBONES = ("UNet2DModel", "UNet2DConditionModel", "DiTTransformer2DModel")


class Backbone(BaseModel):
    """A diffusers backbone by name; other keys are its constructor's arguments."""

    model_config = ConfigDict(extra="allow")

    type: Literal["UNet2DModel", "UNet2DConditionModel", "DiTTransformer2DModel"] = "UNet2DModel"


class CEP(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["none", "gaussian", "uniform"] = "none"
    gamma: float = Field(1.0, ge=0, description="perturbation scale (the paper's gamma)")


class RepaParams(BaseModel):
    """REPA's settings (difforge/diffusion/repa.py has the method)."""

    model_config = ConfigDict(extra="forbid")

    features: str = Field(
        "features",
        description="the training input's column of the "
        "encoder's features of each clean image: [D, H, W] or [D]",
    )
    block: int = Field(
        0,
        ge=0,
        description="align the output of this block: "
        "down_blocks.<block> of a UNet, transformer_blocks.<block> of a DiT",
    )
    weight: float = Field(
        0.5,
        ge=0,
        description="lambda of eq. 9 (the paper: 0.5); 0: a "
        "control, the network trains as without REPA while the projector "
        "learns on its detached hidden state (alignment measured, not "
        "trained)",
    )
    projector_dim: int = Field(
        256, ge=1, description="the MLP projector's hidden width (the paper: 2048)"
    )


def cep_delta(shape: tuple[int, ...], kind: str, gamma: float, generator=None, device="cpu"):
    """Chen et al. eq. 8: the perturbation added to a condition embedding of dimension d."""
    import torch

    d = shape[-1]
    scale = gamma / math.sqrt(d)
    if kind == "uniform":
        return (torch.rand(shape, generator=generator, device=device) * 2 - 1) * scale
    if kind == "gaussian":
        return torch.randn(shape, generator=generator, device=device) * scale
    return torch.zeros(shape, device=device)


class CEPHook:
    """A forward hook on the module that produces the condition embedding: adds delta while
    the model is training, nothing at evaluation (sampling never perturbs)."""

    def __init__(self, kind: str, gamma: float):
        self.kind, self.gamma = kind, gamma
        #: set by the recipe before each forward: the step's own generator, so that a resumed
        #: run draws the same perturbations as an uninterrupted one
        self.generator = None

    def __call__(self, module, inputs, output):
        if not module.training or self.kind == "none":
            return output
        delta = cep_delta(tuple(output.shape), self.kind, self.gamma, self.generator)
        return output + delta.to(device=output.device, dtype=output.dtype)


def build_backbone(
    p: dict[str, Any], sample_size: int, channels: int, num_classes: int, cond_dim: int | None
):
    """The diffusers model named in `backbone`, with its condition input sized for the data.
    Class-conditional models get num_classes + 1 class embeddings: the last is the null token
    of classifier-free guidance."""
    import diffusers

    cfg = dict(p["backbone"])
    kind = cfg.pop("type")
    cls = getattr(diffusers, kind)
    cfg.setdefault("sample_size", sample_size)
    cfg.setdefault("in_channels", channels)
    cfg.setdefault("out_channels", channels)
    try:
        if kind == "UNet2DModel":
            if num_classes:
                cfg.setdefault("num_class_embeds", num_classes + 1)
            model = cls(**cfg)
            cond_module = model.class_embedding
        elif kind == "UNet2DConditionModel":
            if cond_dim is None:
                raise DifforgeError("UNet2DConditionModel needs a `cond_embedding` column")
            cfg.setdefault("cross_attention_dim", cond_dim)
            model = cls(**cfg)
            cond_module = None  # the embedding is an input: perturbed directly
        else:
            cfg.pop("out_channels")
            cfg.setdefault("num_embeds_ada_norm", num_classes)
            model = cls(**cfg)
            cond_module = model.transformer_blocks[0].norm1.emb.class_embedder.embedding_table
    except (TypeError, ValueError) as exc:  # an unknown argument, or ones that do not agree
        raise DifforgeError(f"backbone {kind}: {exc}") from None
    return model, cond_module


def forward(model, kind: str, x, t, labels, cond):
    if kind == "UNet2DModel":
        return model(x, t, class_labels=labels).sample
    if kind == "UNet2DConditionModel":
        return model(x, t, encoder_hidden_states=cond).sample
    return model(x, t, class_labels=labels).sample


BLOCK_FAMILIES = ("down_blocks", "mid_block", "up_blocks", "transformer_blocks")


def named_block(model, name: str, who: str):
    """The block of a backbone named as its modules are (`down_blocks.1`, `mid_block`,
    `up_blocks.0` on UNets, `transformer_blocks.3` on DiT); an unknown name is an error that
    lists the backbone's blocks. `who` names the setting in the error."""
    modules = dict(model.named_modules())
    if not name or name not in modules or name.split(".")[0] not in BLOCK_FAMILIES:
        blocks = [n for n in modules if n.count(".") <= 1 and n.split(".")[0] in BLOCK_FAMILIES]
        raise DifforgeError(
            f"{who}: no block '{name}' in this {type(model).__name__}; it has "
            f"{', '.join(b for b in blocks if b)}"
        )
    return modules[name]


class BlockOutput:
    """Records what one block outputs at each forward pass of its backbone (a UNet block's
    feature map [B, C, H, W], a DiT block's patch tokens [B, N, C]); `remove()` unhooks it."""

    def __init__(self, model, name: str, who: str):
        self.value = None
        self._handle = named_block(model, name, who).register_forward_hook(self._record)

    def _record(self, _module, _inputs, output) -> None:
        self.value = output[0] if isinstance(output, tuple) else output

    def remove(self) -> None:
        self._handle.remove()
