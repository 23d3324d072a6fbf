"""The model folder: one writer (`write_model_folder`), one reader (`read_info`, `load_model`).

A trained or distilled diffusion model is a folder (local or on S3, committed with its step's
dataset), versioned by `format_version` in its `difforge.json`:

```
model/          diffusers `save_pretrained` of the network (plus `<name>.safetensors` extras,
                such as a guided student's `w_embedding.safetensors`); a fine-tuned model's
                adapter is merged into it
ema/            the EMA weights, where training kept them (loaded by default)
adapter/        a partial fine-tune's adapter alone (`adapter.safetensors`: the parameters that
                trained), applied onto `parent_model` by `load_model(uri, "adapter")`
scheduler/      the noise schedule it was trained with (diffusers scheduler config)
steps/NNNNNNN/  the network at training step N (`export_every`; EMA weights where kept,
                adapters merged), listed in `snapshots`: `load_model(uri, step=N)`
difforge.json   what the model is: `ModelInfo` below
```

Fields reserved for what is coming are written now (null until used), so that readers can rely
on them: `objective` (what the network predicts and how noise is added), `conditioning` and
`text_encoder`, `null_condition` (the unconditional input of classifier-free guidance),
`adapter` (LoRA or DiffFit weights over a `parent_model`). Every weight file is safetensors. A
folder of a newer format than this
reader knows is refused with a message, never misread.
"""

from __future__ import annotations

import json
import os
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from difforge.platform.errors import DifforgeError

FORMAT_VERSION = 1
INFO = "difforge.json"


class ModelInfo(BaseModel):
    """The documented content of `difforge.json` (unknown keys are kept, for newer writers)."""

    model_config = ConfigDict(extra="allow")

    format_version: int = FORMAT_VERSION
    kind: Literal["diffusion"] = "diffusion"
    backbone: str = Field(description="the diffusers class of the network")
    column: str = Field("image", description="what it generates: `image` pixels or `latent`s")
    sample_shape: list[int] = Field(description="one sample: [channels, height, width]")
    num_classes: int = 0
    classes: list[str] | None = None
    prediction_type: str = Field(
        "epsilon", description="epsilon or v_prediction (ddpm); velocity (flow_matching)"
    )
    objective: Literal["ddpm", "flow_matching"] = Field(
        "ddpm",
        description="ddpm: noise added by a DDPM schedule; flow_matching: a rectified "
        "flow, x_t = (1 - t) x0 + t noise, its velocity predicted",
    )
    timesteps: dict[str, Any] | None = Field(
        None, description="flow_matching: training's t density"
    )
    conditioning: Literal["none", "class", "text"] = "class"
    #: the class index that means "no class" (classifier-free guidance); num_classes by default
    null_condition: int | None = None
    text_encoder: dict[str, Any] | str | None = Field(
        None,
        description="a text model's encoder: its reference and settings (encode.text's); "
        "the null condition is `model/null_condition.safetensors`, its empty-prompt embedding",
    )
    vae: dict[str, Any] | None = Field(None, description="the VAE of a latent model: {uri, ...}")
    cep: dict[str, Any] | None = None
    corruption: dict[str, Any] | None = None
    num_inference_steps: int | None = None
    guidance_embedding: dict[str, Any] | None = None
    guidance_scale: float | None = Field(
        None,
        description="a distilled student's built-in classifier-free guidance: it is "
        "sampled with one conditional pass per step, at this w",
    )
    distilled_from: str | None = None
    distillation: dict[str, Any] | None = None
    adapter: dict[str, Any] | None = Field(
        None,
        description="a partial fine-tune: its method and settings (finetune params), "
        "retrain_classes, trainable_params, total_params",
    )
    parent_model: str | None = Field(None, description="the pinned reference it started from")
    parent_weights_sha256: str | None = None
    snapshots: list[int] | None = Field(None, description="training steps exported in steps/")


def write_model_folder(
    folder: str,
    info: ModelInfo,
    model: Any,
    scheduler: Any,
    ema: Any | None = None,
    extras: dict[str, dict] | None = None,
    adapter: dict[str, Any] | None = None,
) -> None:
    """Write a model folder (local) in the current format."""
    from safetensors.torch import save_file

    model.save_pretrained(os.path.join(folder, "model"))
    for name, state in (extras or {}).items():
        save_file(_contiguous(state), os.path.join(folder, "model", f"{name}.safetensors"))
    if adapter is not None:
        os.makedirs(os.path.join(folder, "adapter"))
        save_file(_contiguous(adapter), os.path.join(folder, "adapter", "adapter.safetensors"))
    if ema is not None:
        ema.save_pretrained(os.path.join(folder, "ema"))
    scheduler.save_pretrained(os.path.join(folder, "scheduler"))
    data = info.model_dump(mode="json")
    data["format_version"] = FORMAT_VERSION
    with open(os.path.join(folder, INFO), "w") as f:
        json.dump(data, f, indent=2)


def _contiguous(state: dict[str, Any]) -> dict[str, Any]:
    return {k: v.detach().contiguous() for k, v in state.items()}


def read_extra(folder: str, name: str) -> dict[str, Any]:
    """An extra state saved beside a network (`<name>.safetensors`; `.pt` in older folders)."""
    path = os.path.join(folder, f"{name}.safetensors")
    if os.path.exists(path):
        from safetensors.torch import load_file

        return load_file(path)
    import torch

    return torch.load(os.path.join(folder, f"{name}.pt"), weights_only=True)


def parse_info(data: dict[str, Any], where: str) -> ModelInfo:
    version = data.get("format_version", 1)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise DifforgeError(
            f"{where}: model folder format {version!r}; this difforge reads up to "
            f"{FORMAT_VERSION}: upgrade difforge"
        )
    try:
        return ModelInfo.model_validate(data)
    except ValueError as exc:
        raise DifforgeError(f"{where}/{INFO}: not a difforge model description: {exc}") from None


def read_info(uri: str) -> ModelInfo:
    """A model folder's description alone (no weights loaded)."""
    from difforge.platform.datasets import join, url_to_fs

    fs, path = url_to_fs(join(uri, INFO))
    try:
        raw = fs.cat_file(path)
    except FileNotFoundError:
        raise DifforgeError(f"{uri}: not a difforge model folder (no {INFO})") from None
    return parse_info(json.loads(raw), uri)


def model_info(uri: str) -> dict[str, Any]:
    """`read_info` as a plain dict (what manifests and MLflow record)."""
    return read_info(uri).model_dump(mode="json")


def snapshot_folder(step: int) -> str:
    return f"steps/{step:07d}"


def load_model(
    uri: str, weights: str = "ema", training_step: int | None = None, vae: str | None = None
):
    """A model folder, loaded: (network, info dict, scheduler config, VAE or None). `weights`
    "ema" takes the EMA weights where the folder has them, "model" the raw ones, "adapter" a
    fine-tune's adapter put back onto its parent model (what the merged weights equal).
    `training_step`: the network as it was at that step of training (one of `snapshots`).
    `vae`: a local copy of the VAE that a latent model names (its MLflow model carries one)."""
    import diffusers

    from difforge.models.resolve import local_copy, resolve

    path = resolve(uri, "diffusion model")
    if not os.path.exists(os.path.join(path, INFO)):
        raise DifforgeError(f"{uri}: not a difforge model folder (no {INFO})")
    with open(os.path.join(path, INFO)) as f:
        info = parse_info(json.load(f), uri).model_dump(mode="json")
    sub = "ema" if weights == "ema" and os.path.isdir(os.path.join(path, "ema")) else "model"
    if training_step is not None:
        if training_step not in (info.get("snapshots") or []):
            raise DifforgeError(
                f"{uri}: no snapshot at step {training_step}; it has "
                f"{info.get('snapshots') or 'none (train with export_every)'}"
            )
        sub = snapshot_folder(training_step)
    if weights == "adapter" and training_step is None:
        model = _from_adapter(path, info, uri)
    else:
        model = getattr(diffusers, info["backbone"]).from_pretrained(os.path.join(path, sub))
    model.eval()
    if info.get("guidance_embedding"):  # a guided student: w is an input, one pass per step
        from difforge.diffusion.guided import GuidedStudent

        model = GuidedStudent(model, info["backbone"])
        model.w_embedding.load_state_dict(read_extra(os.path.join(path, sub), "w_embedding"))
        model.eval()
    scheduler_config = diffusers.DDPMScheduler.load_config(os.path.join(path, "scheduler"))
    decoder = None
    if info.get("vae"):
        folder = vae or local_copy(info["vae"]["uri"])
        decoder = diffusers.AutoencoderKL.from_pretrained(folder).eval()
    return model, info, scheduler_config, decoder


def _from_adapter(path: str, info: dict[str, Any], uri: str):
    """The fine-tuned network rebuilt from its parent's weights and its adapter alone."""
    import diffusers
    from safetensors.torch import load_file

    from difforge.diffusion.finetune import apply_adapter
    from difforge.diffusion.pretrained import load_into, load_state, pretrained

    if not info.get("adapter") or not info.get("parent_model"):
        raise DifforgeError(f"{uri}: not a fine-tune with an adapter (weights: ema or model)")
    cls = getattr(diffusers, info["backbone"])
    model = cls.from_config(cls.load_config(os.path.join(path, "model")))
    parent = pretrained(info["parent_model"])
    if info.get("parent_weights_sha256") not in (None, parent.sha256):
        raise DifforgeError(
            f"{uri}: its parent {parent.ref} has other weights now than it was "
            "fine-tuned from (sha256 differs); load its merged weights instead"
        )
    load_into(model, load_state(parent.folder, parent.backbone))
    adapter = load_file(os.path.join(path, "adapter", "adapter.safetensors"))
    apply_adapter(model, info["backbone"], info["adapter"], adapter)
    return model


def text_conditioning(uri: str, device="cpu"):
    """A text-conditional model's prompt encoder and null condition (the embedding of the empty
    prompt that training dropped captions to): (TextEncoder, tensor)."""
    import torch

    from difforge.models.resolve import resolve
    from difforge.models.text import TextEncoder

    info = read_info(uri)
    if info.conditioning != "text" or not isinstance(info.text_encoder, dict):
        raise DifforgeError(
            f"{uri}: not a text-conditional model with its encoder recorded "
            "(train it on encode.text output of this release)"
        )
    encoder = TextEncoder(info.text_encoder, device)
    path = resolve(uri, "diffusion model")
    null = read_extra(os.path.join(path, "model"), "null_condition")["embedding"]
    return encoder, torch.as_tensor(null).to(device)
