"""Starting from pretrained weights: which folder holds a backbone, the architecture it fixes,
a digest of its weights for lineage, and loading them into a freshly built backbone.

A pretrained model is any of: a difforge model folder (its `ema/` weights where training kept
them, else `model/`), a diffusers pipeline folder (its `unet/` or `transformer/`), or a plain
`save_pretrained` folder of one network (`config.json` beside its weights). It is named the way
every model is (`difforge.models.resolve`): a path, an `s3://` URI, `models:/NAME/VERSION` or
`models:/NAME@ALIAS`, or a hub id."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from difforge.platform.errors import DifforgeError

#: config keys that size the class embedding: set from the data, not taken from the weights
CLASS_KEYS = ("num_class_embeds", "num_embeds_ada_norm")


@dataclass(frozen=True)
class Pretrained:
    ref: str  # the reference with nothing left to move (a registry version, a hub commit)
    folder: str  # the backbone's own folder on this node
    backbone: str  # its diffusers class
    config: dict[str, Any]
    sha256: str  # of its weight files

    def lineage(self) -> dict[str, str]:
        return {"init_from": self.ref, "init_weights_sha256": self.sha256}


#: where each kind of network lies in a model folder, and the diffusers classes it may be
KINDS = {
    "backbone": (
        ("ema", "model", "unet", "transformer", ""),
        ("UNet2DModel", "UNet2DConditionModel", "DiTTransformer2DModel"),
    ),
    "vae": (("vae", ""), ("AutoencoderKL",)),
}


def pretrained(ref: str, kind: str = "backbone") -> Pretrained:
    """The pretrained network `ref` names (a diffusion backbone, or a VAE), pinned and resolved.
    Its weights are hashed once per process for as long as their files are unchanged."""
    from difforge.models.resolve import pin, resolve, weights_sha256

    pinned = pin(ref)
    root = resolve(pinned, "pretrained model")
    if not os.path.isdir(root):  # online, a hub id: fetched whole
        from huggingface_hub import snapshot_download

        name, _, revision = pinned.partition("@")
        root = snapshot_download(name, revision=revision or None)
    subfolders, classes = KINDS[kind]
    folder = network_folder(root, ref, subfolders)
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    cls = config.get("_class_name")
    if cls not in classes:
        raise DifforgeError(
            f"{ref}: a {cls or 'model of unknown class'}, not a {' or '.join(classes)}"
        )
    return Pretrained(pinned, folder, cls, config, weights_sha256(folder))


def network_folder(root: str, ref: str, subfolders: tuple[str, ...]) -> str:
    for sub in subfolders:
        folder = os.path.join(root, sub) if sub else root
        if os.path.exists(os.path.join(folder, "config.json")):
            return folder
    raise DifforgeError(
        f"{ref}: no network in it (a difforge model folder, a diffusers "
        f"pipeline with {'/ or '.join(s for s in subfolders if s)}/, or a "
        "save_pretrained folder)"
    )


def architecture(given: dict[str, Any], pre: Pretrained) -> dict[str, Any]:
    """The backbone config training builds: the pretrained one, with what the YAML gives
    checked against it (`given`: the keys the user wrote). The class embedding is sized from
    the data (and re-initialised if that differs)."""
    cfg = {k: v for k, v in pre.config.items() if not k.startswith("_") and k not in CLASS_KEYS}
    given = {k: v for k, v in given.items() if k not in CLASS_KEYS}
    if given.get("type", pre.backbone) != pre.backbone:
        raise DifforgeError(
            f"backbone does not match init_from {pre.ref}: type: "
            f"{given['type']} in the YAML, {pre.backbone} in the weights"
        )
    check_matches({k: v for k, v in given.items() if k != "type"}, cfg, pre, "backbone")
    return {"type": pre.backbone, **cfg}


def check_matches(
    given: dict[str, Any], config: dict[str, Any], pre: Pretrained, what: str
) -> None:
    """What the YAML sets must be what the weights were built with."""
    problems = []
    for key, value in given.items():
        if key not in config:
            problems.append(f"{key}: not a setting of the pretrained {pre.backbone}")
        elif json.dumps(config[key]) != json.dumps(value):
            problems.append(f"{key}: {value!r} in the YAML, {config[key]!r} in the weights")
    if problems:
        raise DifforgeError(
            f"{what} does not match init_from {pre.ref} (omit these settings "
            f"to take the weights' own): " + "; ".join(problems)
        )


def check_shape(cfg: dict[str, Any], sample_shape: tuple[int, ...], ref: str) -> None:
    """The pretrained network must generate what the data holds ([channels, height, width])."""
    channels, size = sample_shape[0], sample_shape[-1]
    have = (cfg.get("in_channels"), cfg.get("sample_size"))
    if have != (channels, size) and None not in have:
        raise DifforgeError(
            f"init_from {ref} generates {have[0]} channel(s) at {have[1]}x"
            f"{have[1]}; the training data is {channels}x{size}x{size}"
        )


def load_state(folder: str, backbone: str) -> dict[str, Any]:
    import diffusers

    return getattr(diffusers, backbone).from_pretrained(folder).state_dict()


def fresh_class_keys(model, state: dict[str, Any]) -> list[str]:
    """The model's class-embedding entries the pretrained state cannot fill (another number
    of classes, or none): they keep their fresh initialisation."""
    from difforge.diffusion.finetune import is_class_embedding

    return [
        k
        for k, v in model.state_dict().items()
        if is_class_embedding(k) and (k not in state or tuple(state[k].shape) != tuple(v.shape))
    ]


def load_into(model, state: dict[str, Any]) -> bool:
    """Pretrained weights into a freshly built backbone of the same architecture. A class
    embedding of another size (or none) keeps its fresh initialisation; returns whether that
    happened (it then trains, whatever the fine-tuning method)."""
    from difforge.diffusion.finetune import is_class_embedding

    fresh = fresh_class_keys(model, state)
    own = model.state_dict()
    keep = {
        k: v
        for k, v in state.items()
        if k not in fresh and not (is_class_embedding(k) and k not in own)
    }
    missing, unexpected = model.load_state_dict(keep, strict=False)
    missing = [k for k in missing if k not in fresh]
    if missing or unexpected:
        raise DifforgeError(
            f"pretrained weights do not fit the backbone: missing "
            f"{missing[:5]}, unexpected {unexpected[:5]}"
        )
    return bool(fresh)
