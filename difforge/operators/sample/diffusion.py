"""`sample.diffusion`: draws the images of a sample plan with a trained model, in an actor
pool (the model loaded once per actor). Per-sample generators: an image depends on its seed,
not on its batch, actor or block. Schedulers from diffusers by name; classifier-free guidance;
latent models decode through the VAE recorded when they were trained."""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from difforge.platform import columns as C
from difforge.platform.operator import MapOperator, passthrough
from difforge.platform.spec import Resources

if TYPE_CHECKING:
    import pyarrow as pa

SCHEDULERS = {
    "ddpm": "DDPMScheduler",
    "ddim": "DDIMScheduler",
    "dpm_solver_pp": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
}


class DeepCacheParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    cache_interval: int = Field(3, ge=1, description="a full network pass every N steps")
    cache_branch: int = Field(0, ge=0, description="down blocks run in between (0: shallowest)")


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")

    scheduler: Literal["ddpm", "ddim", "dpm_solver_pp", "euler"] = "ddim"
    num_inference_steps: int | None = Field(
        None,
        ge=1,
        description="default: the model's own (`num_inference_steps` in its difforge.json), else 25",
    )
    weights: Literal["ema", "model"] = Field("ema", description="EMA weights where saved")
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    deepcache: DeepCacheParams | None = Field(
        None, description="DeepCache (Ma et al.) for UNet backbones; off by default"
    )


def make_scheduler(name: str, config: dict[str, Any]):
    import diffusers

    cls = getattr(diffusers, SCHEDULERS[name])
    extra = {"algorithm_type": "dpmsolver++"} if name == "dpm_solver_pp" else {}
    return cls.from_config(config, **extra)


def sample_batch(model, kind: str, scheduler, shape: tuple[int, ...], seeds: list[int],
                 labels, guidance: list[float], null_label: int | None, steps: int,
                 device: str = "cpu", dtype=None, deepcache: tuple[int, int] | None = None):  # fmt: skip
    """The sampler, one explicit loop: noise from each sample's own generator, then the
    scheduler's steps with classifier-free guidance (a conditional and an unconditional pass).
    `deepcache=(interval, branch)` runs the full UNet every `interval` steps and only its
    shallow path in between."""
    import contextlib

    import torch

    from difforge.operators.sample.deepcache import DeepCache
    from difforge.operators.train.diffusion import forward

    dtype = dtype or torch.float32
    scheduler.set_timesteps(steps)
    x = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s)))
                     for s in seeds]).to(device)  # fmt: skip
    x = x * scheduler.init_noise_sigma
    w = torch.tensor(guidance, device=device, dtype=torch.float32)[:, None, None, None]
    guided = null_label is not None and any(g != 1.0 for g in guidance)
    takes_w = hasattr(model, "w_embedding")  # a guided student: no unconditional pass
    n = len(seeds)
    unet = getattr(model, "unet", model)  # a guided student wraps its UNet
    cache = DeepCache(unet, kind, deepcache[1]) if deepcache and deepcache[0] > 1 else None
    for i, t in enumerate(scheduler.timesteps):
        xin = scheduler.scale_model_input(x, t).to(dtype)
        tt = torch.full((n,), int(t), device=device, dtype=torch.long)
        mode = contextlib.nullcontext()
        if cache is not None:
            mode = cache.capture() if i % deepcache[0] == 0 else cache.shallow()
        with torch.no_grad(), mode:
            if takes_w:
                out = model(xin, tt, labels, None, w.flatten().to(dtype)).float()
            elif guided:
                both = forward(
                    model,
                    kind,
                    torch.cat([xin, xin]),
                    torch.cat([tt, tt]),
                    torch.cat([labels, torch.full_like(labels, null_label)]),
                    None,
                )
                cond, uncond = both.float().chunk(2)
                out = uncond + w * (cond - uncond)
            else:
                out = forward(model, kind, xin, tt, labels, None).float()
        x = scheduler.step(out, t, x).prev_sample
    return x


class SampleDiffusion(MapOperator):
    """Draws the images of a sample plan (PNG bytes plus the plan's columns)."""

    name = "sample.diffusion"
    version = 2
    Params = Params
    stateful = True
    resumable = True
    inputs: ClassVar[tuple[int, int]] = (1, 1)
    reads = ("index", "seed", C.LABEL, "guidance_scale", C.MODEL_URI)
    writes = (C.IMAGE, C.FORMAT, C.WIDTH, C.HEIGHT, C.MODE)
    resources = Resources(batch_size=64, num_gpus="auto")
    gpus_when_available = 1.0

    def setup(self, ctx) -> None:

        plan = ctx.input(0)
        uri = plan.to_arrow(columns=[C.MODEL_URI]).column(0)[0].as_py()
        self.model, self.info, config, self.vae = load_model(uri, self.params.weights)
        self.scheduler = make_scheduler(self.params.scheduler, config)
        self.device, self.dtype = ctx.torch_device(self.params.dtype)
        self.model.to(self.device, self.dtype)
        dc = self.params.deepcache
        self.deepcache = (dc.cache_interval, dc.cache_branch) if dc else None
        if dc:
            from difforge.operators.sample.deepcache import check

            check(getattr(self.model, "unet", self.model), self.info["backbone"], dc.cache_branch)
        if self.vae is not None:
            self.vae.to(self.device)

    def process(self, batch: pa.Table) -> pa.Table:
        import pyarrow as pa
        import torch

        from difforge.operators.train.diffusion import to_pil
        from difforge.platform.imaging import encode_png

        info = self.info
        labels = torch.tensor(batch.column(C.LABEL).to_pylist(), device=self.device)
        x = sample_batch(self.model, info["backbone"], self.scheduler, tuple(info["sample_shape"]),
                         batch.column("seed").to_pylist(), labels,
                         batch.column("guidance_scale").to_pylist(),
                         info["num_classes"] or None,
                         self.params.num_inference_steps or info.get("num_inference_steps", 25),
                         self.device, self.dtype, self.deepcache)  # fmt: skip
        images = to_pil(x, self.vae)
        n = len(images)
        out = batch.drop_columns([C.MODEL_URI])
        cols = {C.IMAGE: pa.array([encode_png(im) for im in images], pa.binary()),
                C.FORMAT: pa.array(["png"] * n), C.WIDTH: pa.array([im.width for im in images], pa.int32()),
                C.HEIGHT: pa.array([im.height for im in images], pa.int32()),
                C.MODE: pa.array([im.mode for im in images])}  # fmt: skip
        for name, col in cols.items():
            out = out.append_column(name, col)
        return out

    @classmethod
    def output_columns(cls, params, input_columns):
        return passthrough(
            input_columns, add=(C.IMAGE, C.FORMAT, C.WIDTH, C.HEIGHT, C.MODE), remove=(C.MODEL_URI,)
        )

    def finalize(self, outcome, tracker) -> dict[str, float]:
        """A grid per class, as MLflow images."""
        from PIL import Image

        from difforge.platform.imaging import decode
        from difforge.platform.show import grid

        table = outcome.read_main([C.LABEL, C.IMAGE, "guidance_scale"])
        if table is None:
            return {}
        rows = table.to_pylist()
        by_class: dict[int, list[Image.Image]] = {}
        for r in rows:
            tiles = by_class.setdefault(r[C.LABEL], [])
            if len(tiles) < 16:
                tiles.append(decode(r[C.IMAGE]))
        lines = [grid(t, columns=16) for _, t in sorted(by_class.items())]
        canvas = grid(lines, columns=1, pad=0)
        tracker.log_image(canvas.resize((canvas.width * 3, canvas.height * 3), 0), "samples.png")
        return {"images": float(len(rows))}


def model_info(uri: str) -> dict[str, Any]:
    """A model folder's difforge.json alone (no weights loaded)."""
    from difforge.platform.datasets import join, url_to_fs

    fs, path = url_to_fs(join(uri, "difforge.json"))
    return json.loads(fs.cat_file(path))


def load_model(uri: str, weights: str = "ema"):
    """A trained model folder: the network, its difforge.json, its scheduler, its VAE."""

    import diffusers

    from difforge.operators.encode.vae import local_copy

    path = local_copy(uri)
    with open(os.path.join(path, "difforge.json")) as f:
        info = json.load(f)
    sub = "ema" if weights == "ema" and os.path.isdir(os.path.join(path, "ema")) else "model"
    model = getattr(diffusers, info["backbone"]).from_pretrained(os.path.join(path, sub)).eval()
    if info.get("guidance_embedding"):  # a guided student: w is an input, one pass per step
        import torch

        from difforge.operators.distill._recipe import GuidedStudent

        model = GuidedStudent(model, info["backbone"])
        state = torch.load(os.path.join(path, sub, "w_embedding.pt"), weights_only=True)
        model.w_embedding.load_state_dict(state)
        model.eval()
    scheduler_config = diffusers.DDPMScheduler.load_config(os.path.join(path, "scheduler"))
    vae = None
    if info.get("vae"):
        vae = diffusers.AutoencoderKL.from_pretrained(local_copy(info["vae"]["uri"])).eval()
    return model, info, scheduler_config, vae
