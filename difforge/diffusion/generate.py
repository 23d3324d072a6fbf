"""A trained model, loaded once, drawing images on request: what `difforge sample` and the
registered MLflow model's `predict` both call (the `sample.diffusion` operator batches the same
`sample_batch` over a dataset of requests)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from difforge.platform.errors import DifforgeError


@dataclass
class Drawn:
    """Images and how they were drawn: their classes, the sampler, its steps, and the guidance
    per image (a student with guidance built in was drawn at its own scale, whatever was
    asked)."""

    images: list[Any]
    labels: list[int]
    scheduler: str
    steps: int
    guidance: list[float]
    built_in_guidance: bool


class Generator:
    """A diffusion model folder (any reference `load_model` takes), loaded on this process's
    CPU. `vae`: a local VAE folder to decode latents with instead of the one the model names
    (the MLflow model carries its own copy)."""

    def __init__(
        self,
        uri: str,
        weights: str = "ema",
        training_step: int | None = None,
        vae: str | None = None,
    ):
        from difforge.diffusion.model_folder import load_model

        self.uri = uri
        try:
            self.model, self.info, self.config, self.vae = load_model(
                uri, weights, training_step, vae=vae
            )
        except (FileNotFoundError, OSError) as exc:
            raise DifforgeError(f"{uri}: not a difforge model folder ({exc})") from None
        self._text = None

    @property
    def num_classes(self) -> int:
        return self.info.get("num_classes") or 0

    @property
    def text(self) -> bool:
        return self.info.get("conditioning") == "text"

    def check(self, labels: list[int] | None, prompts: list[str] | None) -> None:
        """A clear error for a request the model cannot draw."""
        if self.text and not prompts:
            raise DifforgeError("the model is text-conditional: give a prompt for each image")
        if prompts and not self.text:
            raise DifforgeError("the model is not text-conditional: give class labels instead")
        bad = [y for y in labels or [] if not 0 <= y < max(self.num_classes, 1)]
        if bad:
            raise DifforgeError(
                f"class {bad[0]}: the model has {self.num_classes} classes "
                f"(0 to {max(self.num_classes - 1, 0)})"
            )

    def draw(
        self,
        seeds: list[int],
        labels: list[int] | None = None,
        prompts: list[str] | None = None,
        negative_prompts: list[str | None] | None = None,
        steps: int | None = None,
        guidance: float | list[float] = 2.0,
        scheduler: str | None = None,
    ) -> Drawn:
        """One image per seed: of class `labels[i]` (default: all classes in turn) or of
        `prompts[i]`, `steps` sampler steps (default: the model's own, else 25)."""
        import torch

        from difforge.diffusion.sampling import built_in_guidance, sample_batch, to_pil
        from difforge.diffusion.schedules import default_scheduler, make_scheduler

        n = len(seeds)
        self.check(labels, prompts)
        if labels is None:
            labels = [i % max(self.num_classes, 1) for i in range(n)]
        cond = uncond = None
        if self.text:
            from difforge.diffusion.sampling import prompt_conditions

            cond, uncond = prompt_conditions(self._text_conditioning(), prompts, negative_prompts)
        steps = steps or self.info.get("num_inference_steps") or 25
        scheduler = scheduler or default_scheduler(self.config)
        asked = (
            [float(g) for g in guidance] if isinstance(guidance, list) else [float(guidance)] * n
        )
        applied, drawn_at = built_in_guidance(self.info, asked)
        x = sample_batch(
            self.model,
            self.info["backbone"],
            make_scheduler(scheduler, self.config),
            tuple(self.info["sample_shape"]),
            list(seeds),
            torch.tensor(labels),
            applied,
            self.num_classes or None,
            steps,
            cond=cond,
            uncond=uncond,
        )
        images = to_pil(x, self.vae)
        return Drawn(images, labels, scheduler, steps, drawn_at, drawn_at is not applied)

    def _text_conditioning(self):
        if self._text is None:
            from difforge.diffusion.model_folder import text_conditioning

            self._text = text_conditioning(self.uri)
        return self._text
