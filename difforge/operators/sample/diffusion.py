"""`sample.diffusion`: draws the images of a sample plan with a trained model, in an actor
pool (the model loaded once per actor). Per-sample generators: an image depends on its seed,
not on its batch, actor or block. Schedulers from diffusers by name; classifier-free guidance;
latent models decode through the VAE recorded when they were trained."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from difforge.diffusion.model_folder import load_model
from difforge.diffusion.sampling import built_in_guidance, prompt_conditions, sample_batch
from difforge.diffusion.schedules import make_scheduler
from difforge.platform import columns as C
from difforge.platform.operator import Columns, MapOperator
from difforge.platform.resources import Resources

if TYPE_CHECKING:
    import pyarrow as pa

    from difforge.platform.context import FinalizeContext
    from difforge.platform.operator import StepOutcome


class DeepCacheParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    cache_interval: int = Field(3, ge=1, description="a full network pass every N steps")
    cache_branch: int = Field(0, ge=0, description="down blocks run in between (0: shallowest)")


class FasterParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    key_steps: list[int] | None = Field(
        None,
        description="the steps (0 first) whose UNet encoder runs; the paper's schedule is "
        "dense early, sparse late. Default: every `interval`-th step",
    )
    interval: int = Field(2, ge=1, description="without key_steps: a key step every N steps")


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")

    scheduler: Literal["ddpm", "ddim", "dpm_solver_pp", "euler", "heun", "lcm"] | None = Field(
        None,
        description="default: the model's, ddim (euler for a flow-matching model, lcm "
        "for a consistency student); a flow-matching model samples with euler or heun",
    )
    num_inference_steps: int | None = Field(
        None,
        ge=1,
        description="default: the model's own (`num_inference_steps` in its difforge.json), else 25",
    )
    weights: Literal["ema", "model", "adapter"] = Field(
        "ema",
        description="EMA weights where saved; raw ones; or a fine-tune's adapter put back "
        "onto its parent model",
    )
    training_step: int | None = Field(
        None,
        ge=1,
        description="sample the model as it was at this training step (one it "
        "exported with export_every); default: the final model",
    )
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    deepcache: DeepCacheParams | None = Field(
        None, description="DeepCache (Ma et al.) for UNet backbones; off by default"
    )
    faster_diffusion: FasterParams | None = Field(
        None,
        description="Faster Diffusion's encoder propagation (Li et al.) for UNet "
        "backbones: the encoder runs at key steps only; off by default",
    )

    @model_validator(mode="after")
    def _one_cache(self) -> Params:
        if self.deepcache is not None and self.faster_diffusion is not None:
            raise ValueError("deepcache and faster_diffusion both skip UNet blocks: use one")
        return self


class SampleDiffusion(MapOperator):
    """Draws the images of a sample plan (PNG bytes plus the plan's columns)."""

    name = "sample.diffusion"
    report_metrics = ("samples_per_s",)
    rows_are = "samples"
    # 3: scheduler defaults to the model's own (flow-matching models: euler); heun; training_step;
    # faster_diffusion; 4: lcm (consistency students), noise injected by a sampler drawn from each
    # sample's own seed, a student's built-in guidance
    version = 4
    Params = Params
    stateful = True
    resumable = True
    inputs: ClassVar[tuple[int, int]] = (1, 1)
    resources = Resources(batch_size=64, num_gpus="auto")
    gpus_when_available = 1.0

    def setup(self, ctx) -> None:

        plan = ctx.input(0)
        # every row of a plan names the same model: its first batch says which
        uri = next(plan.iter_batches(columns=[C.MODEL_URI], batch_size=1)).column(0)[0].as_py()
        self.model, self.info, config, self.vae = load_model(
            uri, self.params.weights, self.params.training_step
        )
        self.scheduler = make_scheduler(self.params.scheduler, config)
        self.device, self.dtype = ctx.torch_device(self.params.dtype)
        self.model.to(self.device, self.dtype)
        dc, fd = self.params.deepcache, self.params.faster_diffusion
        self.deepcache = (dc.cache_interval, dc.cache_branch) if dc else None
        self.faster = (fd.key_steps, fd.interval) if fd else None
        if fd:
            from difforge.diffusion.faster import check as check_faster

            check_faster(getattr(self.model, "unet", self.model), self.info["backbone"])
        if dc:
            from difforge.diffusion.deepcache import check

            check(getattr(self.model, "unet", self.model), self.info["backbone"], dc.cache_branch)
        if self.vae is not None:
            self.vae.to(self.device)
        self.text = None
        if self.info.get("conditioning") == "text":  # its own encoder, and the null it learned
            from difforge.diffusion.model_folder import text_conditioning

            self.text = text_conditioning(uri, self.device)

    def process(self, batch: pa.Table) -> pa.Table:
        import pyarrow as pa
        import torch

        from difforge.diffusion.sampling import to_pil
        from difforge.platform.imaging import encode_png

        info = self.info
        labels = torch.tensor(batch.column(C.LABEL).to_pylist(), device=self.device)
        cond = uncond = None
        if self.text is not None:
            negatives = (
                batch.column("negative_prompt").to_pylist()
                if "negative_prompt" in batch.column_names
                else None
            )
            cond, uncond = prompt_conditions(
                self.text, batch.column("prompt").to_pylist(), negatives
            )
        guidance, drawn_at = built_in_guidance(info, batch.column("guidance_scale").to_pylist())
        x = sample_batch(
            self.model,
            info["backbone"],
            self.scheduler,
            tuple(info["sample_shape"]),
            batch.column("seed").to_pylist(),
            labels,
            guidance,
            info["num_classes"] or None,
            self.params.num_inference_steps or (info.get("num_inference_steps") or 25),
            self.device,
            self.dtype,
            self.deepcache,
            cond,
            uncond,
            self.faster,
        )
        images = to_pil(x, self.vae)
        n = len(images)
        out = batch.drop_columns([C.MODEL_URI])
        if drawn_at is not guidance:  # the model's own w, not the plan's
            i = out.column_names.index("guidance_scale")
            out = out.set_column(i, "guidance_scale", pa.array(drawn_at, pa.float64()))
        cols = {
            C.IMAGE: pa.array([encode_png(im) for im in images], pa.binary()),
            C.FORMAT: pa.array(["png"] * n),
            C.WIDTH: pa.array([im.width for im in images], pa.int32()),
            C.HEIGHT: pa.array([im.height for im in images], pa.int32()),
            C.MODE: pa.array([im.mode for im in images]),
        }
        for name, col in cols.items():
            out = out.append_column(name, col)
        return out

    def columns(self) -> Columns:
        reads = {"index", "seed", C.LABEL, "guidance_scale", C.MODEL_URI}
        written = {C.IMAGE, C.FORMAT, C.WIDTH, C.HEIGHT, C.MODE}
        return Columns(reads=reads, writes=written, drops={C.MODEL_URI})

    def finalize(self, outcome: StepOutcome, ctx: FinalizeContext) -> dict[str, float]:
        """A grid per class, or per prompt captioned with it, as MLflow images."""
        from difforge.platform.show import captioned, grid

        if _has_prompts(outcome):  # up to 8 prompts, 8 images each, each row under its prompt
            rows, by_prompt = _images_by(outcome, "prompt", per=8, keys=8)
            shown = [(t, grid(ims, columns=8)) for t, ims in by_prompt.items()]
            if shown:
                ctx.log.log_image(captioned(shown), "samples.png")
            return {"images": float(rows)}
        rows, by_class = _images_by(outcome, C.LABEL, per=16)
        if not rows:
            return {}
        lines = [grid(t, columns=16) for _, t in sorted(by_class.items())]
        canvas = grid(lines, columns=1, pad=0)
        ctx.log.log_image(canvas.resize((canvas.width * 3, canvas.height * 3), 0), "samples.png")
        return {"images": float(rows)}


def _images_by(outcome: StepOutcome, key: str, per: int, keys: int | None = None):
    """(rows, {key value: up to `per` images}) for at most `keys` values, read a shard at a
    time: its key column first, its images only where a value still needs some."""
    from difforge.platform.imaging import decode

    found: dict = {}  # value -> its images (counted as they are chosen, decoded after)
    rows = 0
    for uri in outcome.main_files:
        values = outcome.read_file(uri, [key]).column(0).to_pylist()
        rows += len(values)
        need = []
        for i, v in enumerate(values):
            if v not in found and keys is not None and len(found) >= keys:
                continue
            if len(found.setdefault(v, [])) < per:
                found[v].append(None)
                need.append(i)
        if need:
            images = outcome.read_file(uri, [C.IMAGE]).column(0).to_pylist()
            for i in need:
                chosen = found[values[i]]
                chosen[chosen.index(None)] = decode(images[i])
    return rows, {v: ims for v, ims in found.items() if ims}


def _has_prompts(outcome: StepOutcome) -> bool:
    """Whether the samples were drawn from prompts (a text model's), not class labels."""
    import pyarrow.parquet as pq

    from difforge.platform.datasets import url_to_fs

    if not outcome.main_files:
        return False
    fs, path = url_to_fs(outcome.main_files[0])
    if "prompt" not in pq.read_schema(path, filesystem=fs).names:
        return False
    prompts = outcome.read_file(outcome.main_files[0], ["prompt"]).column(0)
    return prompts.null_count < len(prompts)
