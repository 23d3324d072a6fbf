"""Fine-tuning methods: which parameters of a backbone train, and what an export keeps.

- `full`: every parameter;
- `lora`: low-rank adapters on the named layers, through `peft` (Hu et al., "LoRA"); the base
  weights are frozen;
- `difffit`: bias terms, normalization layers, the class embedding and a learned per-channel
  scale (gamma, initialised to 1) on each block's residual branches (Xie et al., "DiffFit").
  Where the scales go: on every attention's output projection (`to_out.0`) and every
  feed-forward's last linear layer, as the paper puts them on DiT's attention and MLP branches;
  on UNets also on each ResNet block's `conv2`, the last layer of its residual branch. A scale
  on a branch's last layer is folded into that layer's weights and bias when the model is
  merged, so a merged model is a plain diffusers model;
- `bias`: bias terms only (BitFit-style).

The class embedding also trains whenever it was re-initialised (a pretrained model fine-tuned
on a different number of classes), or when `train_class_embedding` asks for it (classes the
pretrained model saw no examples of), whatever the method.

The adapter of a partial method is the set of parameters that trained; it is saved alone (next
to the merged model) and applied back onto the parent model by `apply_adapter`."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from difforge.platform.errors import DifforgeError

GAMMA = "difffit_gamma"
#: LoRA's default layers: attention projections, plus the feed-forward layers of transformers
LORA_TARGETS = {
    "UNet2DModel": ["to_q", "to_k", "to_v", "to_out.0"],
    "UNet2DConditionModel": ["to_q", "to_k", "to_v", "to_out.0"],
    "DiTTransformer2DModel": ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"],
}


class Finetune(BaseModel):
    """How a pretrained backbone is fine-tuned (`full` trains everything)."""

    model_config = ConfigDict(extra="forbid")

    method: Literal["full", "lora", "difffit", "bias"] = "full"
    rank: int = Field(8, ge=1, description="LoRA rank")
    alpha: float = Field(8.0, gt=0, description="LoRA alpha (the update is scaled by alpha/rank)")
    dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout")
    target_modules: list[str] | None = Field(
        None,
        description="LoRA: layer names (suffixes) to adapt; default: attention projections "
        "(and feed-forward layers on DiT)",
    )
    train_class_embedding: bool = Field(
        False,
        description="the class embedding trains too, whatever the method: for a "
        "fine-tune set whose classes the pretrained model never saw under their labels "
        "(it trains anyway when the class count differs)",
    )


def is_class_embedding(name: str) -> bool:
    """A parameter of a backbone's class embedding (a UNet's `class_embedding`, each DiT
    block's `class_embedder`)."""
    return name.startswith("class_embedding.") or ".class_embedder." in name


def prepare(model, kind: str, ft: dict[str, Any], retrain_classes: bool = False):
    """Set which parameters of `model` train (in place; LoRA layers are injected) and return
    (trainable, total) parameter counts. `retrain_classes`: the class embedding trains in any
    case (it was re-initialised)."""
    import torch

    method = ft["method"]
    if method == "lora":
        from peft import LoraConfig, inject_adapter_in_model

        targets = ft.get("target_modules") or LORA_TARGETS[kind]
        names = [n for n, _ in model.named_modules()]
        if not any(n == t or n.endswith("." + t) for n in names for t in targets):
            raise DifforgeError(
                f"finetune lora: no layer of this {kind} is named {targets}; set "
                f"finetune.target_modules (for a UNet without attention, e.g. [conv1, conv2])"
            )
        config = LoraConfig(
            r=ft["rank"], lora_alpha=ft["alpha"], lora_dropout=ft["dropout"], target_modules=targets
        )
        inject_adapter_in_model(config, model)
    elif method == "difffit":
        for layer in scaled_layers(model):
            out = layer.weight.shape[0]
            layer.register_parameter(GAMMA, torch.nn.Parameter(torch.ones(out)))
            layer.register_forward_hook(_scale)
    if method != "full":
        classes = retrain_classes or ft.get("train_class_embedding", False)
        norms = {
            f"{n}.{p}" if n else p
            for n, m in model.named_modules()
            if _is_norm(m)
            for p, _ in m.named_parameters(recurse=False)
        }
        for name, p in model.named_parameters():
            cls = is_class_embedding(name)
            p.requires_grad_(_trains(name, method, name in norms, cls) or (classes and cls))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def _trains(name: str, method: str, norm: bool, class_embedding: bool) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    if method == "lora":
        return "lora_" in name
    if method == "bias":
        return leaf == "bias"
    return leaf in ("bias", GAMMA) or norm or class_embedding  # difffit


def _is_norm(module) -> bool:
    import torch

    kinds = (torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.modules.batchnorm._BatchNorm)
    return isinstance(module, kinds) or type(module).__name__.endswith("RMSNorm")


def scaled_layers(model):
    """The last layer of each residual branch: attention output projections, feed-forward
    output layers and ResNet blocks' `conv2`."""
    import torch

    layers = []
    for m in model.modules():
        cls = type(m).__name__
        if cls == "Attention" and hasattr(m, "to_out"):
            layers.append(m.to_out[0])
        elif cls == "FeedForward":
            layers.append([x for x in m.net if isinstance(x, torch.nn.Linear)][-1])
        elif cls == "ResnetBlock2D":
            layers.append(m.conv2)
    return layers


def _scale(module, inputs, output):
    g = getattr(module, GAMMA)
    return output * (g.view(1, -1, 1, 1) if module.weight.ndim == 4 else g)


def merged_state(model, method: str) -> dict[str, Any]:
    """The state dict of the plain backbone that computes what `model` (prepared by `prepare`)
    computes: LoRA merged into its base layers by peft, DiffFit's scales folded into the
    layers they follow."""
    if method == "lora":
        from peft.tuners.tuners_utils import BaseTunerLayer

        for m in model.modules():
            if isinstance(m, BaseTunerLayer) and not m.merged:
                m.merge()
    state = {}
    for k, v in model.state_dict().items():
        if "lora_" in k:
            continue
        state[k.replace(".base_layer.", ".")] = v.detach().clone()
    for k in [k for k in state if k.endswith("." + GAMMA)]:
        g = state.pop(k)
        prefix = k[: -len(GAMMA)]
        w = state[prefix + "weight"]
        state[prefix + "weight"] = w * g.view(-1, *([1] * (w.ndim - 1)))
        if prefix + "bias" in state:
            state[prefix + "bias"] = state[prefix + "bias"] * g
    return state


def adapter_state(model) -> dict[str, Any]:
    """What trained: the adapter of a partial method."""
    return {
        n: p.detach().clone().contiguous() for n, p in model.named_parameters() if p.requires_grad
    }


def apply_adapter(model, kind: str, ft: dict[str, Any], state: dict[str, Any]) -> None:
    """Put an adapter saved by `adapter_state` onto its parent model (in place)."""
    prepare(model, kind, ft)
    own = dict(model.named_parameters())
    unknown = sorted(set(state) - set(own))
    if unknown:
        raise DifforgeError(f"adapter: parameters the model does not have: {unknown[:5]}")
    for name, value in state.items():
        if own[name].shape != value.shape:
            raise DifforgeError(
                f"adapter: {name} has shape {tuple(value.shape)}, the model's "
                f"is {tuple(own[name].shape)}"
            )
    model.load_state_dict(state, strict=False)
