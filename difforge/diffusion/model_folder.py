"""The model folder: one writer (`write_model_folder`), one reader (`read_info`, `load_model`).

A trained or distilled diffusion model is a folder (local or on S3, committed with its step's
dataset), versioned by `format_version` in its `difforge.json`:

```
model/          diffusers `save_pretrained` of the network (plus `<name>.pt` extras, such as a
                guided student's `w_embedding.pt`)
ema/            the EMA weights, where training kept them (loaded by default)
scheduler/      the noise schedule it was trained with (diffusers scheduler config)
difforge.json   what the model is: `ModelInfo` below
```

Fields reserved for what is coming are written now (null until used), so that readers can rely
on them: `objective` (what the network predicts and how noise is added), `conditioning` and
`text_encoder`, `null_condition` (the unconditional input of classifier-free guidance),
`adapter` (LoRA or DiffFit weights over a `parent_model`). A folder of a newer format than this
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
    prediction_type: str = "epsilon"
    objective: str = Field("ddpm", description="ddpm (noise prediction by a DDPM schedule)")
    conditioning: Literal["none", "class", "text"] = "class"
    #: the class index that means "no class" (classifier-free guidance); num_classes by default
    null_condition: int | None = None
    text_encoder: str | None = None
    vae: dict[str, Any] | None = Field(None, description="the VAE of a latent model: {uri, ...}")
    cep: dict[str, Any] | None = None
    corruption: dict[str, Any] | None = None
    num_inference_steps: int | None = None
    guidance_embedding: dict[str, Any] | None = None
    distilled_from: str | None = None
    distillation: dict[str, Any] | None = None
    adapter: dict[str, Any] | None = None
    parent_model: str | None = None


def write_model_folder(
    folder: str,
    info: ModelInfo,
    model: Any,
    scheduler: Any,
    ema: Any | None = None,
    extras: dict[str, dict] | None = None,
) -> None:
    """Write a model folder (local) in the current format."""
    import torch

    model.save_pretrained(os.path.join(folder, "model"))
    for name, state in (extras or {}).items():
        torch.save(state, os.path.join(folder, "model", f"{name}.pt"))
    if ema is not None:
        ema.save_pretrained(os.path.join(folder, "ema"))
    scheduler.save_pretrained(os.path.join(folder, "scheduler"))
    data = info.model_dump(mode="json")
    data["format_version"] = FORMAT_VERSION
    with open(os.path.join(folder, INFO), "w") as f:
        json.dump(data, f, indent=2)


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


def load_model(uri: str, weights: str = "ema"):
    """A model folder, loaded: (network, info dict, scheduler config, VAE or None). `weights`
    "ema" takes the EMA weights where the folder has them."""
    import diffusers

    from difforge.models.resolve import local_copy, resolve

    path = resolve(uri, "diffusion model")
    if not os.path.exists(os.path.join(path, INFO)):
        raise DifforgeError(f"{uri}: not a difforge model folder (no {INFO})")
    with open(os.path.join(path, INFO)) as f:
        info = parse_info(json.load(f), uri).model_dump(mode="json")
    sub = "ema" if weights == "ema" and os.path.isdir(os.path.join(path, "ema")) else "model"
    model = getattr(diffusers, info["backbone"]).from_pretrained(os.path.join(path, sub)).eval()
    if info.get("guidance_embedding"):  # a guided student: w is an input, one pass per step
        import torch

        from difforge.diffusion.guided import GuidedStudent

        model = GuidedStudent(model, info["backbone"])
        state = torch.load(os.path.join(path, sub, "w_embedding.pt"), weights_only=True)
        model.w_embedding.load_state_dict(state)
        model.eval()
    scheduler_config = diffusers.DDPMScheduler.load_config(os.path.join(path, "scheduler"))
    vae = None
    if info.get("vae"):
        vae = diffusers.AutoencoderKL.from_pretrained(local_copy(info["vae"]["uri"])).eval()
    return model, info, scheduler_config, vae
