"""A diffusion model as an MLflow model: the `pyfunc` flavour that difforge registers for
every trained or distilled diffusion model, so that

    mlflow.pyfunc.load_model("models:/quickstart-model/1").predict(
        pandas.DataFrame({"class_label": [3, 7], "seed": [0, 1]}))

draws images (offline: the MLflow model holds the difforge model folder and, for a latent
model, its VAE), and `mlflow models serve` answers HTTP requests with them.

A request is a table, one row per image: `class_label` (a class model) or `prompt` (a text
model; `negative_prompt` optional), and optional `seed` (default: the row's index), `steps`
(default: the model's own) and `guidance` (default 2.0). The answer has one row per image:
`image`, a base64-encoded PNG, and the `seed` it was drawn from.
"""

from __future__ import annotations

import base64
import io
import os
import shutil
from typing import Any

import mlflow.pyfunc
import pandas as pd

DEFAULT_GUIDANCE = 2.0
#: what the MLflow model needs installed (its `requirements.txt`), at the versions that made it
REQUIREMENTS = ("difforge", "torch", "diffusers", "safetensors", "pillow", "pandas", "mlflow")


class DiffusionModel(mlflow.pyfunc.PythonModel):
    """Loads the model folder once (`load_context`), then draws each request's images."""

    def load_context(self, context) -> None:
        from difforge.diffusion.generate import Generator

        self.generator = Generator(context.artifacts["model"], vae=context.artifacts.get("vae"))

    def predict(
        self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        rows = model_input.reset_index(drop=True)
        n = len(rows)
        seeds = _column(rows, "seed", list(range(n)), int)
        steps = _column(rows, "steps", [None] * n, int)
        guidance = _column(rows, "guidance", [DEFAULT_GUIDANCE] * n, float)
        labels = _column(rows, "class_label", None, int)
        prompts = _column(rows, "prompt", None, str)
        negatives = _column(rows, "negative_prompt", [None] * n, str)
        images: list[str | None] = [None] * n
        for s in dict.fromkeys(steps):  # one sampler run per number of steps asked
            at = [i for i in range(n) if steps[i] == s]
            drawn = self.generator.draw(
                [seeds[i] for i in at],
                None if labels is None else [labels[i] for i in at],
                None if prompts is None else [prompts[i] for i in at],
                [negatives[i] for i in at],
                s,
                [guidance[i] for i in at],
            )
            for i, image in zip(at, drawn.images, strict=True):
                images[i] = png_base64(image)
        return pd.DataFrame({"image": images, "seed": seeds})


def _column(rows, name: str, default, cast):
    """A request column as a list (missing values: the default's), or `default` without it."""
    if name not in rows.columns:
        return default
    values = rows[name].tolist()
    fallback = default if default is not None else [None] * len(values)
    return [fallback[i] if v is None or pd.isna(v) else cast(v) for i, v in enumerate(values)]


def png_base64(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def signature(text: bool):
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, Schema

    asks = [ColSpec("string", "prompt"), ColSpec("string", "negative_prompt", required=False)]
    if not text:
        asks = [ColSpec("long", "class_label", required=False)]
    extras = [ColSpec("long", "seed", required=False), ColSpec("long", "steps", required=False)]
    inputs = Schema([*asks, *extras, ColSpec("double", "guidance", required=False)])
    return ModelSignature(inputs, Schema([ColSpec("string", "image"), ColSpec("long", "seed")]))


def save_mlflow_model(folder: str, dest: str, info: dict[str, Any]) -> str:
    """Write the MLflow model of the difforge model folder `folder` (whose `difforge.json` is
    `info`) at `dest`: the folder (and a latent model's VAE) as its artifacts, its signature,
    a one-image input example and pinned requirements."""
    from difforge.models.resolve import local_copy

    # the artifacts under the names they keep in the MLflow model, hard-linked there (MLflow
    # refuses symbolic links): the weights are copied once, by MLflow, into `dest`
    staged = dest + ".staged"
    artifacts = {"model": os.path.join(staged, "model")}
    shutil.copytree(folder, artifacts["model"], copy_function=_link_or_copy)
    if info.get("vae"):
        artifacts["vae"] = os.path.join(staged, "vae")
        shutil.copytree(
            local_copy(info["vae"]["uri"]), artifacts["vae"], copy_function=_link_or_copy
        )
    text = info.get("conditioning") == "text"
    example = {"prompt": ["a photo"]} if text else {"class_label": [0]}
    steps = info.get("num_inference_steps") or 2  # a tiny example: 2 steps
    example = pd.DataFrame({**example, "seed": [0], "steps": [steps]})
    mlflow.pyfunc.save_model(
        dest,
        python_model=DiffusionModel(),
        artifacts=artifacts,
        signature=signature(text),
        input_example=example,
        pip_requirements=requirements(),
    )
    shutil.rmtree(staged)
    return dest


def _link_or_copy(src: str, dst: str) -> None:
    """A hard link where both lie on one filesystem, else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def register(ctx, folder: str, info: dict[str, Any], kind: str) -> str:
    """Commit a step's model folder with its dataset and register it in MLflow as the step's
    logged model, in this MLflow model form (`StepContext.publish_model`)."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        served = save_mlflow_model(folder, os.path.join(d, "mlflow-model"), info)
        return ctx.publish_model(folder, kind, mlflow_model=served, usage=usage(info))


def usage(info: dict[str, Any]) -> str:
    """How to draw from it, for its model card (`{ref}`: its `models:/` reference)."""
    ask = '"prompt": ["a photo"]' if info.get("conditioning") == "text" else '"class_label": [0, 1]'
    return (
        'Draw images: `mlflow.pyfunc.load_model("{ref}").predict(pandas.DataFrame({'
        + ask
        + ', "seed": [0, 1]}))` (a column `image` of base64 PNGs); '
        "`difforge sample {ref}`; or serve it: "
        "`mlflow models serve -m {ref} --env-manager local`."
    )


def requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for name in REQUIREMENTS:
        try:
            out.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            out.append(name)
    return out
