"""`train.vae`: fits a small diffusers `AutoencoderKL` (reconstruction + KL), the first stage of
latent diffusion (Rombach et al.), so a pipeline gets a real VAE without any download."""

from __future__ import annotations

import json
import math
import os
import tempfile
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

from difforge.diffusion.data import DEFAULT_SHUFFLE_MB, ShardStream, ShuffleMB
from difforge.models.vae import build_vae
from difforge.platform import columns as C
from difforge.platform.errors import DifforgeError
from difforge.platform.operator import Columns, JobOperator, JobResult
from difforge.platform.resources import Resources

if TYPE_CHECKING:
    from difforge.platform.context import JobContext

CHECK_ROWS = 256  # images the final check reconstructs (and the latent scale is measured on)


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")

    latent_channels: int = Field(4, ge=1)
    block_out_channels: list[int] = Field(
        [16, 32, 32], min_length=1, description="one per level; latents are 2^(levels-1) smaller"
    )
    layers_per_block: int = Field(1, ge=1)
    norm_num_groups: int | None = Field(
        None, ge=1, description="default: the first level's width, at most 32"
    )
    kl_weight: float = Field(1e-6, ge=0, description="weight of the KL term")
    max_steps: int = Field(1000, ge=1, description="optimizer steps")
    batch_size: int = Field(64, ge=1, description="global batch size")
    lr: float = Field(1e-3, gt=0)
    seed: int = 0
    checkpoint_every: int = Field(250, ge=1, description="steps between checkpoints")
    shuffle_mb: ShuffleMB = DEFAULT_SHUFFLE_MB
    init_from: str | None = Field(
        None,
        description="start from this AutoencoderKL: a folder (local or s3://), "
        "models:/NAME/VERSION (or @ALIAS), or a hub id; its architecture is then the weights' "
        "own (settings given must match it)",
    )

    @model_validator(mode="after")
    def _groups_divide(self) -> Params:
        g = self.groups
        bad = [c for c in self.block_out_channels if c % g]
        if bad:
            raise ValueError(f"norm_num_groups={g} must divide every block_out_channels {bad}")
        return self

    @property
    def groups(self) -> int:
        return self.norm_num_groups or min(32, self.block_out_channels[0])


def _objective(vae):
    """The VAE and its loss terms as one module, so DDP sees (and syncs) the whole forward."""
    import torch

    class Objective(torch.nn.Module):
        def __init__(self, vae):
            super().__init__()
            self.vae = vae

        def forward(self, x):
            posterior = self.vae.encode(x).latent_dist
            rec = self.vae.decode(posterior.sample()).sample
            return torch.nn.functional.mse_loss(rec, x), posterior.kl().mean()

    return Objective(vae)


def train_loop(config: dict[str, Any]) -> None:
    import numpy as np
    import ray.train
    import ray.train.torch
    import torch

    from difforge.diffusion.training import log_interval
    from difforge.platform.raytrain import report, restore, unwrap

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(config["threads"])))
    p = config["params"]
    per_rank = max(1, p["batch_size"] // world)
    # this rank's stream of batches, in an order fixed by the seed (resumes at any step)
    data = ShardStream(
        config["shards"], C.IMAGE, p["seed"], per_rank, rank, world, p["shuffle_mb"] << 20
    )
    torch.manual_seed(p["seed"])
    if config.get("init") is not None:  # pretrained: (config, weights in Ray's object store)
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_config(config["init"][0])
        vae.load_state_dict(ray.get(config["init"][1]))
    else:
        vae = build_vae(p, data.sample_shape[0], data.sample_shape[1])
    opt = torch.optim.AdamW(vae.parameters(), lr=p["lr"])
    state = restore()
    start = 0
    if state:
        vae.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start = state["step"]
    model = ray.train.torch.prepare_model(_objective(vae))
    device = ray.train.torch.get_device()
    step_log = config["log"]
    losses: list[float] = []
    for step in range(start, p["max_steps"]):
        batch = torch.from_numpy(data.batch(step).x0).to(device)
        mse, kl = model(batch)
        loss = mse + p["kl_weight"] * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(mse.item())
        done = step + 1
        if rank == 0:
            step_log.log_progress(done, losses[-1])
        if done % p["checkpoint_every"] == 0 or done == p["max_steps"]:
            psnr = 10 * math.log10(4.0 / max(1e-10, float(np.mean(losses))))
            metrics = {"step": done, "mse": float(np.mean(losses)), "psnr": psnr}
            state = {"model": unwrap(model).vae.state_dict(), "opt": opt.state_dict(), "step": done}
            report(metrics, state if rank == 0 else None)
            log_interval(
                step_log, done, data, rank, {"train_mse": metrics["mse"], "train_psnr": psnr}
            )
            losses = []


class TrainVAE(JobOperator):
    """Fits a small AutoencoderKL on an image dataset; saves a folder `encode.vae` loads."""

    name = "train.vae"
    # 2: the input is streamed, each image once per epoch (was drawn with replacement)
    # 3: init_from; registered in MLflow's model registry
    # 4: PSNR on held-out images (a second input) or named as the training images'; the
    #    check reads 256 rows, not whole shards
    version = 4

    def external_state(self) -> dict[str, str] | None:
        """A pretrained start: its fixed version and weights digest."""
        if self.params.init_from is None:
            return None
        from difforge.diffusion.pretrained import pretrained

        self._start = pretrained(self.params.init_from, "vae")  # what runs is what was planned
        return self._start.lineage()

    Params = Params
    resources = Resources(num_workers=1)
    gpus_when_available = 1.0
    # the images, and optionally held-out images of the same size to measure it on
    inputs: ClassVar[tuple[int, int]] = (1, 2)

    def columns(self) -> Columns:
        written = {C.ID, C.MODEL_URI, "kind", "psnr", "psnr_on", "scaling_factor"}
        return Columns(reads={C.ID, C.IMAGE}, writes=written, keeps_input=False)

    def run(self, ctx: JobContext) -> JobResult:
        import numpy as np
        import pyarrow as pa
        import torch

        from difforge.models.classifier import first_images
        from difforge.platform import raytrain as _raytrain

        data = ctx.inputs[0]
        held = ctx.inputs[1] if len(ctx.inputs) > 1 else None
        if held is not None:  # refused before training, not after
            if C.IMAGE not in held.manifest.column_names:
                raise DifforgeError(
                    "train.vae: the second input (held-out images to measure "
                    f"the VAE on) has no `{C.IMAGE}` column"
                )
            a, b = first_images(data, 1).shape[1:], first_images(held, 1).shape[1:]
            if a != b:
                raise DifforgeError(
                    f"train.vae: the held-out images are {list(b)} (channels, "
                    f"height, width), the training images {list(a)}"
                )
        init = pre = None
        if self.params.init_from:
            import ray

            from difforge.diffusion.pretrained import check_matches, load_state, pretrained

            pre = getattr(self, "_start", None) or pretrained(self.params.init_from, "vae")
            arch = ("latent_channels", "block_out_channels", "layers_per_block", "norm_num_groups")
            check_matches(
                {k: getattr(self.params, k) for k in arch if k in self.params.model_fields_set},
                pre.config,
                pre,
                "train.vae",
            )
            init = (dict(pre.config), ray.put(load_state(pre.folder, pre.backbone)))
        result = _raytrain.fit(
            ctx,
            train_loop,
            {"params": self.params.model_dump(), "shards": data.shards(), "init": init},
            progress=("train_mse", self.params.max_steps, "steps"),
        )
        state = _raytrain.final_state(result)
        # the latent scale (LDM: latents scaled to unit variance) from training images, and the
        # reconstruction PSNR on held-out ones where given: up to 256 rows of each, read alone
        x = first_images(data, CHECK_ROWS)
        shown = x if held is None else first_images(held, CHECK_ROWS)
        psnr_on = "training" if held is None else "held_out"
        if pre is not None:
            from diffusers import AutoencoderKL

            vae = AutoencoderKL.from_config(pre.config)
        else:
            vae = build_vae(self.params.model_dump(), x.shape[1], x.shape[2])
        vae.load_state_dict(state["model"])
        vae.eval()
        with torch.no_grad():
            z = vae.encode(torch.from_numpy(x).float().div(127.5).sub(1.0)).latent_dist.mean
            batch = torch.from_numpy(shown).float().div(127.5).sub(1.0)
            z_shown = z if held is None else vae.encode(batch).latent_dist.mean
            rec = vae.decode(z_shown).sample.clamp(-1, 1)
        mse = float(torch.mean((rec - batch) ** 2))
        psnr = 10 * math.log10(4.0 / max(mse, 1e-10))
        scaling = float(1.0 / z.flatten().std())
        vae.register_to_config(scaling_factor=scaling)
        pairs = torch.cat([batch[:16], rec[:16]]).add(1).mul(127.5).round().byte()
        tiles = pairs.permute(0, 2, 3, 1).numpy()
        from PIL import Image

        from difforge.platform.show import grid

        mode = "L" if tiles.shape[-1] == 1 else "RGB"
        img = grid(
            [Image.fromarray(t.squeeze(-1) if mode == "L" else t, mode) for t in tiles], columns=16
        )
        ctx.log.log_image(img.resize((img.width * 3, img.height * 3), 0), "reconstructions.png")
        figure = "holdout_psnr" if held is not None else "final_train_psnr"
        ctx.log.log_metrics({figure: psnr, "scaling_factor": scaling})
        with tempfile.TemporaryDirectory() as d:
            vae.save_pretrained(d)
            with open(os.path.join(d, "difforge.json"), "w") as f:
                json.dump(
                    {
                        "kind": "vae",
                        "psnr": psnr,
                        "psnr_on": psnr_on,
                        "image_shape": list(x.shape[1:]),
                        **(pre.lineage() if pre else {}),
                    },
                    f,
                )
            ctx.publish_model(d, "vae", metrics={figure: psnr})
        del np
        table = pa.table(
            {
                C.ID: ["vae"],
                C.MODEL_URI: [ctx.artifact("model")],
                "kind": ["vae"],
                "psnr": [psnr],
                "psnr_on": [psnr_on],
                "scaling_factor": [scaling],
            }
        )
        return JobResult(
            table,
            metadata={"vae": {"uri": ctx.artifact("model"), "psnr": psnr, "psnr_on": psnr_on}},
        )
