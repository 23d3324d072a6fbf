"""`evaluate.diffusion_classifier`: a trained conditional diffusion model as a zero-shot
classifier (Li et al., "Your Diffusion Model is Secretly a Zero-Shot Classifier", ICCV 2023).

For an image x0 and each class c, noise it at timestep t with noise eps and ask the model for
the noise under condition c; the class is the one with the lowest expected error,
argmin_c E_{t, eps} ||eps - eps_theta(x_t, t, c)||^2 (their eq. 4-6), the expectation taken over
the same (t, eps) pairs for every class (their paired comparison, which cancels most of the
variance). The timesteps of the trials are an evenly spaced grid over (0, T), visited in an
interleaved order so that any prefix of it covers the range. The adaptive strategy (their
sec. 3.2, Alg. 1): in stages, every class still in the running gets trials up to the stage's
count, then only the `keep` classes of lowest error go on, so the evaluations go to the likely
classes.

v-prediction models are read through their noise estimate; flow-matching models are scored on
their velocity (noise - x0) at times t in (0, 1), the same comparison on their own objective.
Latent models classify the VAE latent of the image (the VAE recorded with the model);
text-conditional models classify through a prompt per class (`prompt`, e.g. "a photo of a
{class}"), encoded by the model's own text encoder.

Writes, per image, `predicted_label`, `class_errors` (each class's mean error over the trials it
got; a class dropped early has fewer) and `evaluations` (network passes spent on it), and logs
the accuracy against `label` where the images have one, the mean evaluations per image and a
confusion matrix (`confusion.png`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

from difforge.diffusion.recognition import Denoiser
from difforge.models.features import PREDICTED
from difforge.platform import columns as C
from difforge.platform.errors import DifforgeError
from difforge.platform.operator import Columns, MapOperator
from difforge.platform.resources import Resources

if TYPE_CHECKING:
    import pyarrow as pa

    from difforge.platform.context import FinalizeContext
    from difforge.platform.operator import StepOutcome

ERRORS = "class_errors"
EVALUATIONS = "evaluations"


class Stage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    trials: int = Field(
        ge=1,
        description="(t, noise) pairs per class still in the running, counted from the first stage",
    )
    keep: int = Field(ge=1, description="classes of lowest error that go on to the next stage")


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")

    stages: list[Stage] = Field(
        default_factory=lambda: [Stage(trials=10, keep=3), Stage(trials=30, keep=1)],
        description="the adaptive schedule; one stage [{trials: N, keep: 1}] scores every "
        "class on N trials",
    )
    t_min: float = Field(0.02, ge=0, lt=1, description="the trials' timesteps, as a fraction of T")
    t_max: float = Field(0.98, gt=0, le=1)
    classes: list[int] | None = Field(None, description="the candidate classes; default all")
    prompt: str = Field(
        "a {class}", description="text models: each class's prompt ({class}: its name)"
    )
    weights: str = Field("ema", description="ema or model")
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> Params:
        counts = [s.trials for s in self.stages]
        if counts != sorted(counts):
            raise ValueError("stages: trials must not decrease from stage to stage")
        keeps = [s.keep for s in self.stages]
        if keeps != sorted(keeps, reverse=True) or keeps[-1] != 1:
            raise ValueError("stages: keep must shrink to 1 at the last stage")
        if self.t_min >= self.t_max:
            raise ValueError("t_min must be below t_max")
        return self


class DiffusionClassifier(MapOperator):
    """A conditional diffusion model as a zero-shot classifier of images (Li et al. 2023)."""

    name = "evaluate.diffusion_classifier"
    report_metrics = ("accuracy", "evaluations_per_image")
    version = 1
    Params = Params
    stateful = True
    inputs: ClassVar[tuple[int, int]] = (2, 2)
    resources = Resources(batch_size=64, num_gpus="auto")
    gpus_when_available = 1.0

    def columns(self) -> Columns:
        written = {PREDICTED, ERRORS, EVALUATIONS}
        return Columns(reads={C.ID, C.IMAGE}, writes=written, drops=C.ENCODED_IMAGE)

    def setup(self, ctx) -> None:
        import torch

        self.net = net = Denoiser(ctx.input(1), self.params.weights, ctx, self.name)
        uri, info = net.uri, net.info
        text = info.get("conditioning") == "text"
        n = info.get("num_classes") or 0
        names = info.get("classes") or [str(i) for i in range(n)]
        if not n and not (text and info.get("classes")):
            raise DifforgeError(
                f"{self.name}: {uri} is not class-conditional (a text model "
                "needs its data's class names to prompt with)"
            )
        self.classes = self.params.classes or list(range(n or len(names)))
        if any(not 0 <= c < len(names) for c in self.classes):
            raise DifforgeError(
                f"{self.name}: classes {self.params.classes}: the model has {len(names)}"
            )
        self.cond = None
        if text:  # one prompt per class, by the model's own encoder
            from difforge.diffusion.model_folder import text_conditioning

            encoder, _ = text_conditioning(uri, net.device)
            prompts = [self.params.prompt.replace("{class}", names[c]) for c in self.classes]
            self.cond = torch.from_numpy(encoder.embed(prompts)).to(net.device)
        # the trials: an evenly spaced grid of times, interleaved (any prefix spans the range),
        # and one noise per trial, the same for every image and class (paired comparison)
        trials = self.params.stages[-1].trials
        grid = torch.linspace(self.params.t_min, self.params.t_max, trials)
        order = _interleaved(trials)
        self.times = grid[order]
        shape = tuple(info["sample_shape"])
        g = torch.Generator().manual_seed(self.params.seed)
        self.noise = torch.randn((trials, *shape), generator=g)

    def _errors(self, x0, classes: list[int], trial: int):
        """Each image's error under each of `classes` at one trial: [n, len(classes)]."""
        import torch

        n, k = len(x0), len(classes)
        net = self.net
        eps = self.noise[trial].to(net.device).expand_as(x0)
        xt, t, target = net.path.at(x0, eps, float(self.times[trial]))
        xs, ts = xt.repeat(k, 1, 1, 1), t.repeat(k)
        labels = torch.tensor(classes, device=net.device).repeat_interleave(n)
        cond = None
        if self.cond is not None:
            index = [self.classes.index(c) for c in classes]
            cond, labels = self.cond[index].repeat_interleave(n, 0), None
        out = net.path.read(net(xs, ts, labels, cond), xs, ts)
        err = ((out - target.repeat(k, 1, 1, 1)) ** 2).mean(dim=(1, 2, 3))
        return err.view(k, n).T

    def process(self, batch: pa.Table) -> pa.Table:
        import numpy as np
        import pyarrow as pa
        import torch

        from difforge.platform.imaging import without_image
        from difforge.platform.tensors import to_column

        x0 = self.net.clean(batch.column(C.IMAGE).to_pylist())
        n, m = len(x0), len(self.classes)
        sums = torch.zeros(n, m)
        counts = torch.zeros(n, m)
        alive = torch.ones(n, m, dtype=torch.bool)
        done = 0
        for stage in self.params.stages:
            for trial in range(done, stage.trials):
                # the classes any image still considers, scored for every image of the batch
                # at once (a batch keeps the network busy); counted only where still alive
                cols = alive.any(0).nonzero().flatten().tolist()
                err = self._errors(x0, [self.classes[c] for c in cols], trial).cpu()
                sums[:, cols] += err * alive[:, cols]
                counts[:, cols] += alive[:, cols].float()
            done = stage.trials
            mean = sums / counts.clamp(min=1)
            mean[~alive] = float("inf")
            keep = torch.topk(-mean, min(stage.keep, m), dim=1).indices
            alive = torch.zeros_like(alive).scatter_(1, keep, True)
        best = alive.float().argmax(1)
        errors = (sums / counts.clamp(min=1)).numpy().astype(np.float32)
        out = without_image(batch)
        predicted = [self.classes[int(i)] for i in best]
        out = out.append_column(PREDICTED, pa.array(predicted, pa.int64()))
        out = out.append_column(ERRORS, to_column(errors))
        return out.append_column(EVALUATIONS, pa.array(counts.sum(1).numpy().astype(np.int64)))

    def finalize(self, outcome: StepOutcome, ctx: FinalizeContext) -> dict[str, float]:
        """Accuracy against the images' labels, evaluations per image, a confusion matrix."""
        import numpy as np

        names = outcome.column_names()
        cols = [PREDICTED, EVALUATIONS] + ([C.LABEL] if C.LABEL in names else [])
        table = outcome.read_main(cols) if names else None
        if table is None or not table.num_rows:
            return {}
        metrics = {"evaluations_per_image": float(np.mean(table.column(EVALUATIONS).to_numpy()))}
        if C.LABEL in cols:
            y = table.column(C.LABEL).to_numpy()
            p = table.column(PREDICTED).to_numpy()
            metrics["accuracy"] = float(np.mean(y == p))
            ctx.log.log_image(_confusion(y, p), "confusion.png")
        return metrics


def _interleaved(n: int) -> list[int]:
    """0..n-1 in an order whose every prefix spreads over the range (bit-reversal like)."""
    order, seen = [], set()
    step = 1
    while step < n:
        step *= 2
    while step >= 1:
        for i in range(0, n, step):
            if i not in seen:
                seen.add(i)
                order.append(i)
        step //= 2
    return order


def _confusion(y, p):
    """A confusion matrix as a PIL image (rows: true class, columns: predicted)."""
    import numpy as np

    from difforge.platform.show import figure, figure_image

    k = int(max(y.max(), p.max())) + 1
    m = np.zeros((k, k), np.int64)
    np.add.at(m, (y, p), 1)
    fig, ax = figure(1 + 0.45 * k, 1 + 0.4 * k)
    ax.imshow(m, cmap="Blues")
    for i in range(k):
        for j in range(k):
            if m[i, j]:
                ax.text(j, i, str(m[i, j]), ha="center", va="center", fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_xticks(range(k))
    ax.set_yticks(range(k))
    return figure_image(fig)
