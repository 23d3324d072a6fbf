"""`train.diffusion`: a class- or text-conditional diffusers model trained with DeepSpeed in
every Ray Train worker. One recipe, read top to bottom:

  data -> backbone -> DeepSpeed engine -> resume -> loop (noise, CEP, CFG drop, loss, step,
  EMA, checkpoint, samples) -> consolidated save_pretrained folder.

Condition Embedding Perturbation (Chen et al., "Slight Corruption in Pre-training Data Makes
Better Diffusion Models", eq. 8): during training only, the condition embedding c becomes
c + delta, with delta ~ U(-gamma/sqrt(d), gamma/sqrt(d)) (uniform) or N(0, (gamma/sqrt(d))^2 I)
(gaussian), d the embedding dimension. Sampling never perturbs.
"""

from __future__ import annotations

import copy
import json
import math
import os
import tempfile
import time
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from difforge.platform import columns as C
from difforge.platform.errors import DifforgeError
from difforge.platform.operator import JobOperator, JobResult
from difforge.platform.spec import Resources

if TYPE_CHECKING:
    from difforge.platform.context import JobContext

BACKBONES = ("UNet2DModel", "UNet2DConditionModel", "DiTTransformer2DModel")


class Backbone(BaseModel):
    """A diffusers backbone by name; other keys are its constructor's arguments."""

    model_config = ConfigDict(extra="allow")

    type: Literal["UNet2DModel", "UNet2DConditionModel", "DiTTransformer2DModel"] = "UNet2DModel"


class CEP(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["none", "gaussian", "uniform"] = "none"
    gamma: float = Field(1.0, ge=0, description="perturbation scale (the paper's gamma)")


class DeepSpeedConfig(BaseModel):
    """Merged over sane defaults; anything else DeepSpeed accepts goes in `extra`."""

    model_config = ConfigDict(extra="forbid")

    zero_stage: Literal[0, 1, 2, 3] = 2
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 on GPUs, fp32 on CPUs (bf16 is emulated there)"
    )
    extra: dict[str, Any] = Field(default_factory=dict, description="raw DeepSpeed config keys")


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")

    backbone: Backbone = Field(default_factory=Backbone)
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"
    num_train_timesteps: int = Field(1000, ge=1)
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "squaredcos_cap_v2"
    cond_drop_prob: float = Field(0.1, ge=0, lt=1, description="classifier-free guidance dropout")
    cep: CEP = Field(default_factory=CEP)
    ema_decay: float | None = Field(0.999, gt=0, lt=1, description="null: no EMA")
    lr: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(100, ge=0)
    lr_schedule: Literal["constant", "cosine"] = "constant"
    grad_clip: float | None = Field(1.0, gt=0)
    grad_accum: int = Field(1, ge=1)
    batch_size: int = Field(64, ge=1, description="global batch size per optimizer step")
    max_steps: int = Field(1000, ge=1, description="optimizer steps, exactly")
    checkpoint_every: int = Field(250, ge=1)
    seed: int = 0
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)

    @model_validator(mode="after")
    def _check(self) -> Params:
        if self.ema_decay is not None and self.deepspeed.zero_stage == 3:
            raise ValueError("ema_decay needs full parameters on each rank: use zero_stage <= 2 "
                             "with EMA, or set ema_decay: null")  # fmt: skip
        return self


# -- pieces of the recipe ------------------------------------------------------------------


def cep_delta(shape: tuple[int, ...], kind: str, gamma: float, generator=None, device="cpu"):
    """Chen et al. eq. 8: the perturbation added to a condition embedding of dimension d."""
    import torch

    d = shape[-1]
    scale = gamma / math.sqrt(d)
    if kind == "uniform":
        return (torch.rand(shape, generator=generator, device=device) * 2 - 1) * scale
    if kind == "gaussian":
        return torch.randn(shape, generator=generator, device=device) * scale
    return torch.zeros(shape, device=device)


class CEPHook:
    """A forward hook on the module that produces the condition embedding: adds delta while
    the model is training, nothing at evaluation (sampling never perturbs)."""

    def __init__(self, kind: str, gamma: float):
        self.kind, self.gamma = kind, gamma

    def __call__(self, module, inputs, output):
        if not module.training or self.kind == "none":
            return output
        return output + cep_delta(tuple(output.shape), self.kind, self.gamma,
                                  device=output.device).to(output.dtype)  # fmt: skip


def build_backbone(p: dict[str, Any], sample_size: int, channels: int, num_classes: int,
                   cond_dim: int | None):  # fmt: skip
    """The diffusers model named in `backbone`, with its condition input sized for the data.
    Class-conditional models get num_classes + 1 class embeddings: the last is the null token
    of classifier-free guidance."""
    import diffusers

    cfg = dict(p["backbone"])
    kind = cfg.pop("type")
    cls = getattr(diffusers, kind)
    cfg.setdefault("sample_size", sample_size)
    cfg.setdefault("in_channels", channels)
    cfg.setdefault("out_channels", channels)
    try:
        if kind == "UNet2DModel":
            if num_classes:
                cfg.setdefault("num_class_embeds", num_classes + 1)
            model = cls(**cfg)
            cond_module = model.class_embedding
        elif kind == "UNet2DConditionModel":
            if cond_dim is None:
                raise DifforgeError("UNet2DConditionModel needs a `cond_embedding` column")
            cfg.setdefault("cross_attention_dim", cond_dim)
            model = cls(**cfg)
            cond_module = None  # the embedding is an input: perturbed directly
        else:
            cfg.pop("out_channels")
            cfg.setdefault("num_embeds_ada_norm", num_classes)
            model = cls(**cfg)
            cond_module = model.transformer_blocks[0].norm1.emb.class_embedder.embedding_table
    except TypeError as exc:
        raise DifforgeError(f"backbone {kind}: {exc}") from None
    return model, cond_module


def forward(model, kind: str, x, t, labels, cond):
    if kind == "UNet2DModel":
        return model(x, t, class_labels=labels).sample
    if kind == "UNet2DConditionModel":
        return model(x, t, encoder_hidden_states=cond).sample
    return model(x, t, class_labels=labels).sample


def make_noise_scheduler(p: dict[str, Any], column: str):
    """The DDPM noise schedule. Clipping predicted x0 to [-1, 1] suits pixels only: latents
    have unit variance, and clipping them wrecks the samples."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=p["num_train_timesteps"],
                         beta_schedule=p["beta_schedule"], prediction_type=p["prediction_type"],
                         clip_sample=column == C.IMAGE)  # fmt: skip


def deepspeed_config(p: dict[str, Any], micro_batch: int, world: int, on_gpu: bool) -> dict:
    ds = p["deepspeed"]
    precision = ds["precision"]
    if precision == "auto":
        precision = "bf16" if on_gpu else "fp32"
    if precision == "fp16" and not on_gpu:
        raise DifforgeError("deepspeed.precision fp16 is not supported on CPUs; use fp32 (or "
                            "bf16, which CPUs without AVX-512 BF16 emulate slowly)")  # fmt: skip
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": p["grad_accum"],
        "train_batch_size": micro_batch * p["grad_accum"] * world,
        "zero_optimization": {"stage": ds["zero_stage"]},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if p["grad_clip"]:
        config["gradient_clipping"] = p["grad_clip"]
    if precision == "bf16":
        config["bf16"] = {"enabled": True}
    elif precision == "fp16":
        config["fp16"] = {"enabled": True}
    config.update(ds["extra"])
    return config


def lr_lambda(p: dict[str, Any]):
    def f(step: int) -> float:
        if step < p["warmup_steps"]:
            return (step + 1) / p["warmup_steps"]
        if p["lr_schedule"] == "cosine":
            done = (step - p["warmup_steps"]) / max(1, p["max_steps"] - p["warmup_steps"])
            return 0.5 * (1 + math.cos(math.pi * min(1.0, done)))
        return 1.0

    return f


def import_deepspeed():
    """DeepSpeed with the CPU pitfalls handled (FACTS.md): the accelerator chosen before the
    import, and the shared-memory comm op (a 3-4 minute JIT compile) skipped; gloo is used."""
    import sys

    import torch

    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    import deepspeed
    import deepspeed.comm.torch  # noqa: F401

    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    return deepspeed


def load_data(files: list[str], column: str):
    """x0 as float32 [N, C, H, W] in the model's space, labels, and condition embeddings."""
    import numpy as np
    import pyarrow.parquet as pq

    from difforge.platform.datasets import url_to_fs
    from difforge.platform.imaging import to_array
    from difforge.platform.tensors import to_numpy

    xs, labels, conds = [], [], []
    for uri in files:
        fs, path = url_to_fs(uri)
        schema = pq.read_schema(path, filesystem=fs)
        cols = [c for c in (column, C.LABEL, C.COND_EMBEDDING) if c in schema.names]
        t = pq.read_table(path, filesystem=fs, columns=cols)
        if column == C.LATENT:
            xs.append(to_numpy(t.column(C.LATENT)).astype(np.float32))
        else:
            arr = np.stack([to_array(b) for b in t.column(C.IMAGE).to_pylist()])
            arr = arr[:, None] if arr.ndim == 3 else arr.transpose(0, 3, 1, 2)
            xs.append(arr.astype(np.float32) / 127.5 - 1.0)
        if C.LABEL in t.column_names:
            labels.append(t.column(C.LABEL).to_numpy().astype(np.int64))
        if C.COND_EMBEDDING in t.column_names:
            conds.append(to_numpy(t.column(C.COND_EMBEDDING)).astype(np.float32))
    x = np.concatenate(xs)
    return (
        x,
        (np.concatenate(labels) if labels else None),
        (np.concatenate(conds) if conds else None),
    )


def to_pil(x, vae=None):
    """Model outputs in [-1, 1] (decoded through the VAE for latents) as PIL images."""
    import torch
    from PIL import Image

    if vae is not None:
        with torch.no_grad():
            x = vae.decode(x / vae.config.scaling_factor).sample
    arr = x.clamp(-1, 1).add(1).mul(127.5).round().byte().cpu().numpy()
    if arr.shape[1] == 1:
        return [Image.fromarray(a[0], "L") for a in arr]
    return [Image.fromarray(a.transpose(1, 2, 0), "RGB") for a in arr]


def train(config: dict[str, Any], rank: int, world: int, io) -> None:
    """The recipe. `io` restores and saves checkpoints and reports metrics (Ray Train, or a
    plain folder when run without Ray)."""
    import numpy as np
    import torch

    deepspeed = import_deepspeed()
    p = config["params"]
    torch.set_num_threads(max(1, int(config.get("threads", 1))))
    on_gpu = torch.cuda.is_available() and config.get("use_gpu", False)
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if on_gpu else "cpu"

    # data
    x, labels, cond = load_data(config["files"], config["column"])
    num_classes = config["num_classes"] if labels is not None else 0
    kind = p["backbone"]["type"]

    # backbone and noise schedule
    torch.manual_seed(p["seed"])
    model, cond_module = build_backbone(p, x.shape[-1], x.shape[1], num_classes,
                                        cond.shape[-1] if cond is not None else None)  # fmt: skip
    if cond_module is not None:
        cond_module.register_forward_hook(CEPHook(p["cep"]["kind"], p["cep"]["gamma"]))
    noise_scheduler = make_noise_scheduler(p, config["column"])
    ema = copy.deepcopy(model).eval().requires_grad_(False) if p["ema_decay"] else None

    # DeepSpeed engine: a torch AdamW (DeepSpeed's fused Adam would JIT-compile for minutes)
    micro = max(1, p["batch_size"] // (world * p["grad_accum"]))
    optimizer = torch.optim.AdamW(model.parameters(), lr=p["lr"], weight_decay=p["weight_decay"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(p))
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler,
        config=deepspeed_config(p, micro, world, on_gpu),
    )  # fmt: skip
    dtype = torch.bfloat16 if engine.bfloat16_enabled() else torch.float32

    # resume: the optimizer step count comes back with the weights
    step = io.restore(engine, ema)
    tracker = config["tracker"]
    alphas = noise_scheduler.alphas_cumprod.to(device)
    losses: list[float] = []
    # throughput since this run's first optimizer step (start-up excluded)
    first_step_at = window_start = None
    window_steps = 0
    while step < p["max_steps"]:
        for micro_step in range(p["grad_accum"]):
            # every draw is a function of (seed, step, micro step, rank): a resumed run
            # continues the same sequence
            g = np.random.default_rng([p["seed"], step, micro_step, rank])
            idx = g.integers(0, len(x), micro)
            x0 = torch.from_numpy(x[idx]).to(device)
            tg = torch.Generator().manual_seed(int(g.integers(2**62)))
            noise = torch.randn(x0.shape, generator=tg).to(device)
            t = torch.randint(0, p["num_train_timesteps"], (micro,), generator=tg).to(device)
            xt = noise_scheduler.add_noise(x0, noise, t)
            drop = torch.rand(micro, generator=tg).to(device) < p["cond_drop_prob"]
            y = c = None
            if labels is not None:
                y = torch.from_numpy(labels[idx]).to(device).masked_fill(drop, num_classes)
            if cond is not None:
                c = torch.from_numpy(cond[idx]).to(device)
                c = c + cep_delta(tuple(c.shape), p["cep"]["kind"], p["cep"]["gamma"], tg).to(
                    device
                )
                c = c.masked_fill(drop[:, None, None] if c.ndim == 3 else drop[:, None], 0.0)
            target = noise if p["prediction_type"] == "epsilon" else (
                alphas[t].sqrt()[:, None, None, None] * noise
                - (1 - alphas[t]).sqrt()[:, None, None, None] * x0)  # fmt: skip
            out = forward(engine, kind, xt.to(dtype), t, y, c.to(dtype) if c is not None else None)
            loss = torch.nn.functional.mse_loss(out.float(), target)
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        step += 1
        now = time.time()
        if first_step_at is None:
            first_step_at = window_start = now
        else:
            window_steps += 1
        if ema is not None:
            with torch.no_grad():
                # warmed-up decay: early on the average must not be dominated by the random
                # initial weights (0.999^1500 of them would still be 22% of it)
                d = min(p["ema_decay"], (1 + step) / (10 + step))
                for pe, pm in zip(ema.parameters(), engine.module.parameters(), strict=True):
                    pe.mul_(d).add_(pm.detach().float(), alpha=1 - d)
        if step % p["checkpoint_every"] == 0 or step == p["max_steps"]:
            rate = window_steps * p["batch_size"] / max(1e-9, now - window_start)
            metrics = {"step": step, "loss": float(np.mean(losses)),
                       "lr": scheduler.get_last_lr()[0], "samples_per_s": rate,
                       "first_step_at": first_step_at}  # fmt: skip
            io.save(engine, ema, step, metrics)
            if rank == 0:
                # a restart after a failure replays steps; log_new never logs one twice
                tracker.log_new({"loss": metrics["loss"], "lr": metrics["lr"],
                                 "samples_per_s": rate}, step=step)  # fmt: skip
            losses = []


class RayTrainIO:
    """Checkpoints through Ray Train: each rank saves its DeepSpeed shard, Ray merges them into
    one checkpoint folder under the step's work folder."""

    def __init__(self, rank: int, config: dict[str, Any]):
        self.rank, self.config = rank, config

    def restore(self, engine, ema) -> int:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if not ckpt:
            return 0
        with ckpt.as_directory() as d:
            engine.load_checkpoint(d, tag="state")
            if ema is not None and os.path.exists(os.path.join(d, "ema.pt")):
                import torch

                ema.load_state_dict(torch.load(os.path.join(d, "ema.pt"), weights_only=True))
            with open(os.path.join(d, "progress.json")) as f:
                return json.load(f)["step"]

    def save(self, engine, ema, step: int, metrics: dict[str, Any]) -> None:
        import ray.train
        import torch

        with tempfile.TemporaryDirectory() as d:
            engine.save_checkpoint(d, tag="state")
            if self.rank == 0:
                with open(os.path.join(d, "progress.json"), "w") as f:
                    json.dump({"step": step}, f)
                if ema is not None:
                    torch.save(ema.state_dict(), os.path.join(d, "ema.pt"))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


class FolderIO:
    """Checkpoints in a local folder: the recipe run in one process, without Ray (tests,
    debugging, and the baseline of benchmarks/train.py under torchrun)."""

    def __init__(self, folder: str, rank: int = 0):
        self.folder, self.rank = folder, rank
        self.history: list[dict[str, Any]] = []

    def restore(self, engine, ema) -> int:
        progress = os.path.join(self.folder, "progress.json")
        if not os.path.exists(progress):
            return 0
        engine.load_checkpoint(self.folder, tag="state")
        if ema is not None:
            import torch

            ema.load_state_dict(torch.load(os.path.join(self.folder, "ema.pt"), weights_only=True))
        with open(progress) as f:
            return json.load(f)["step"]

    def save(self, engine, ema, step: int, metrics: dict[str, Any]) -> None:
        import torch

        engine.save_checkpoint(self.folder, tag="state")
        if self.rank == 0:
            if ema is not None:
                torch.save(ema.state_dict(), os.path.join(self.folder, "ema.pt"))
            with open(os.path.join(self.folder, "progress.json"), "w") as f:
                json.dump({"step": step}, f)
        self.history.append(metrics)


class NullTracker:
    """Where a recipe run without a pipeline (tests, benchmarks) logs: nowhere."""

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass

    log_new = log_metrics

    def log_image(self, image: Any, name: str) -> None:
        pass


def train_locally(config: dict[str, Any], folder: str, recipe=None) -> FolderIO:
    """Run the recipe (`train`, or another with its signature, such as distillation's) in this
    process as rank 0 of 1 (DeepSpeed's single-rank set-up)."""
    import socket

    import torch.distributed as dist

    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
                     "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}.items():  # fmt: skip
            os.environ.setdefault(k, v)
        dist.init_process_group("gloo", rank=0, world_size=1)
    io = FolderIO(folder)
    (recipe or train)(
        {"tracker": NullTracker(), **config}, dist.get_rank(), dist.get_world_size(), io
    )
    return io


def ray_train_loop(config: dict[str, Any]) -> None:
    import ray.train

    ctx = ray.train.get_context()
    train(
        config, ctx.get_world_rank(), ctx.get_world_size(), RayTrainIO(ctx.get_world_rank(), config)
    )


class DiffusionTraining(JobOperator):
    """Trains a class- or text-conditional diffusers model with DeepSpeed under Ray Train."""

    name = "train.diffusion"
    version = 1
    Params = Params
    reads = (C.ID,)
    resources = Resources(num_workers=1, num_cpus=1, num_gpus="auto")
    gpus_when_available = 1.0
    inputs: ClassVar[tuple[int, int]] = (1, 1)

    @classmethod
    def required_columns(cls, params: Params) -> set[str]:
        if params.backbone.type == "UNet2DConditionModel":
            return {C.ID, C.COND_EMBEDDING}
        return {C.ID, C.LABEL}

    @classmethod
    def output_columns(cls, params, input_columns):
        return {C.ID, C.MODEL_URI, "kind", "final_loss", "steps"}

    def run(self, ctx: JobContext) -> JobResult:
        import pyarrow as pa

        from difforge.operators.train import _raytrain

        data = ctx.inputs[0]
        column = C.LATENT if C.LATENT in data.manifest.column_names else C.IMAGE
        if column not in data.manifest.column_names:
            raise DifforgeError("train.diffusion needs an `image` or a `latent` column")
        classes = data.metadata.get("classes")
        num_classes = len(classes) if classes else 0
        if C.LABEL in data.manifest.column_names and not num_classes:
            labels = data.to_arrow(columns=[C.LABEL]).column(C.LABEL)
            num_classes = int(pa.compute.max(labels).as_py()) + 1
        # refuse what can never run before starting any worker (fp16 on a CPU, say)
        deepspeed_config(self.params.model_dump(), 1, 1, ctx.resources.num_gpus > 0)
        config = {
            "params": self.params.model_dump(),
            "files": data.file_uris(),
            "column": column,
            "num_classes": num_classes,
            "use_gpu": ctx.resources.num_gpus > 0,
        }
        result = _raytrain.fit(ctx, ray_train_loop, config)
        model_uri, info = export(self.params.model_dump(), result.checkpoint, data, config, ctx)
        table = pa.table(
            {
                C.ID: ["model"],
                C.MODEL_URI: [model_uri],
                "kind": ["diffusion"],
                "final_loss": [float(result.metrics["loss"])],
                "steps": pa.array([int(result.metrics["step"])], pa.int64()),
            }
        )
        return JobResult(table, metadata={"model": info})


def export(p: dict, checkpoint, data, config: dict, ctx: JobContext) -> tuple[str, dict]:
    """Consolidated fp32 weights (and EMA) as a diffusers folder with the noise scheduler's
    config, the training input's VAE recorded, a sample grid logged, and the model registered
    in MLflow's registry with its lineage."""
    import torch

    from difforge.operators.sample.diffusion import make_scheduler, sample_batch
    from difforge.platform.show import grid

    import_deepspeed()
    num_classes = config["num_classes"]
    x_shape = _shape_of(data, config["column"])
    cond_dim = None
    if p["backbone"]["type"] == "UNet2DConditionModel":
        cond_dim = int(data.manifest.schema().field(C.COND_EMBEDDING).type.shape[-1])
    model, _ = build_backbone(p, x_shape[-1], x_shape[0], num_classes, cond_dim)
    with checkpoint.as_directory() as d:
        model.load_state_dict(consolidated_state(d))
        ema_state = (torch.load(os.path.join(d, "ema.pt"), weights_only=True)
                     if os.path.exists(os.path.join(d, "ema.pt")) else None)  # fmt: skip
    noise_scheduler = make_noise_scheduler(p, config["column"])
    vae_info = data.metadata.get("vae")
    info = {
        "kind": "diffusion",
        "backbone": p["backbone"]["type"],
        "column": config["column"],
        "num_classes": num_classes,
        "classes": data.metadata.get("classes"),
        "sample_shape": list(x_shape),
        "vae": vae_info,
        "prediction_type": p["prediction_type"],
        "cep": p["cep"],
        "corruption": data.metadata.get("corruption"),
    }
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(os.path.join(d, "model"))
        if ema_state is not None:
            ema = copy.deepcopy(model)
            ema.load_state_dict(ema_state)
            ema.save_pretrained(os.path.join(d, "ema"))
            model = ema.eval()
        noise_scheduler.save_pretrained(os.path.join(d, "scheduler"))
        with open(os.path.join(d, "difforge.json"), "w") as f:
            json.dump(info, f, indent=2)
        ctx.publish(d, "model")
    # a sample grid: one row per class, fixed seeds
    model.eval()
    vae = None
    if vae_info:
        from diffusers import AutoencoderKL

        from difforge.operators.encode.vae import local_copy

        vae = AutoencoderKL.from_pretrained(local_copy(vae_info["uri"])).eval()
    per = 8
    if num_classes:
        classes = min(num_classes, 10)
        labels = torch.arange(classes).repeat_interleave(per)
        imgs = sample_batch(model, p["backbone"]["type"],
                            make_scheduler("ddim", noise_scheduler.config), x_shape,
                            list(range(len(labels))), labels, [2.0] * len(labels),
                            num_classes, 25)  # fmt: skip
        tiles = to_pil(imgs, vae)
        ctx.tracker.log_image(grid(tiles, columns=per).resize(
            (per * (tiles[0].width + 2) * 3, classes * (tiles[0].height + 2) * 3), 0),
            "samples.png")  # fmt: skip
    _register(ctx, info)
    return ctx.artifact("model"), info


def consolidated_state(folder: str, tag: str = "state") -> dict[str, Any]:
    """Full fp32 weights from a DeepSpeed checkpoint: gathered from ZeRO partitions, or, with
    ZeRO off (stage 0), the module state DeepSpeed saved whole."""
    import torch

    states = os.path.join(folder, tag, "mp_rank_00_model_states.pt")
    saved = torch.load(states, map_location="cpu", weights_only=False)
    if saved.get("ds_config", {}).get("zero_optimization", {}).get("stage", 0) == 0:
        return {k: v.float() for k, v in saved["module"].items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(folder, tag=tag)


def _shape_of(data, column: str) -> tuple[int, ...]:
    if column == C.LATENT:
        return tuple(data.manifest.schema().field(C.LATENT).type.shape)
    row = next(data.iter_batches(columns=[C.IMAGE], batch_size=1)).to_pylist()[0]
    from difforge.platform.imaging import to_array

    arr = to_array(row[C.IMAGE])
    return (1, *arr.shape) if arr.ndim == 2 else (arr.shape[2], arr.shape[0], arr.shape[1])


def _register(ctx: JobContext, info: dict) -> None:
    """Register the logged model folder in the MLflow Model Registry with its lineage."""
    client = ctx.tracker.client
    name = f"{ctx.pipeline}-{ctx.step}"
    try:
        client.create_registered_model(name)
    except Exception:
        pass  # already there
    run = client.get_run(ctx.tracker.run_id)
    version = client.create_model_version(
        name, f"{run.info.artifact_uri}/model", run_id=ctx.tracker.run_id,
        tags={"pipeline": ctx.pipeline, "step": ctx.step,
              "inputs": run.data.tags.get("difforge.inputs", "")},
    )  # fmt: skip
    ctx.tracker.set_tags({"difforge.registered_model": f"models:/{name}/{version.version}"})
