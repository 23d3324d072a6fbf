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

import contextlib
import copy
import functools
import logging
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, model_validator

from difforge.diffusion.backbones import (
    CEP,
    Backbone,
    CEPHook,
    RepaParams,
    build_backbone,
    cep_delta,
    forward,
)
from difforge.diffusion.data import DEFAULT_SHUFFLE_MB, ShardStream, ShuffleMB
from difforge.diffusion.finetune import Finetune, adapter_state, merged_state, prepare
from difforge.diffusion.model_folder import ModelInfo, snapshot_folder, write_model_folder
from difforge.diffusion.sampling import to_pil
from difforge.diffusion.schedules import FLOW, flow_times, make_noise_scheduler
from difforge.diffusion.training import (
    DeepSpeedConfig,
    RayTrainIO,
    consolidated_state,
    deepspeed_config,
    import_deepspeed,
    log_interval,
    lr_lambda,
    to_device,
)
from difforge.platform import columns as C
from difforge.platform.errors import DifforgeError
from difforge.platform.operator import Columns, JobOperator, JobResult
from difforge.platform.resources import Resources

log = logging.getLogger("difforge")

if TYPE_CHECKING:
    from difforge.platform.context import JobContext


class Timesteps(BaseModel):
    """How training draws t on a flow's path (Esser et al. 2024, sec. 3.1)."""

    model_config = ConfigDict(extra="forbid")

    density: Literal["uniform", "logit_normal"] = "uniform"
    mean: float = Field(0.0, description="logit_normal: the mean m of u, t = sigmoid(u)")
    std: float = Field(1.0, gt=0, description="logit_normal: the spread s of u")


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")

    backbone: Backbone = Field(default_factory=Backbone)
    init_from: str | None = Field(
        None,
        description="start from these weights: a model folder (local or s3://), "
        "models:/NAME/VERSION (or @ALIAS), or a hub id; the backbone may then be omitted. An "
        "earlier model step of the pipeline is given as a second input instead",
    )
    finetune: Finetune = Field(default_factory=Finetune)
    objective: Literal["epsilon", "v_prediction", "flow_matching"] = Field(
        "epsilon",
        validation_alias=AliasChoices("objective", "prediction_type"),
        description="what the network learns: the noise (epsilon) or v (Salimans & Ho) on a "
        "DDPM schedule, or the velocity noise - x0 of a rectified flow (flow_matching)",
    )
    timesteps: Timesteps = Field(
        default_factory=Timesteps, description="flow_matching: the density training draws t from"
    )
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
    export_every: int | None = Field(
        None,
        ge=1,
        description="also export the weights every N steps (EMA where kept), to "
        "sample quality against training steps: sample.diffusion's `step`",
    )
    sample_every: int | None = Field(
        None,
        ge=1,
        description="also draw the sample grid every N steps, as the image series "
        "`samples` (MLflow's run page steps through it); the final grid is always drawn "
        "(samples.png)",
    )
    seed: int = 0
    shuffle_mb: ShuffleMB = DEFAULT_SHUFFLE_MB
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    repa: RepaParams | None = Field(
        None,
        description="REPA (Yu et al.): align a block's hidden state, through an MLP "
        "projector, with an encoder's features of the clean image (a column of the input)",
    )

    @model_validator(mode="after")
    def _check(self) -> Params:
        if self.timesteps.density != "uniform" and self.objective != FLOW:
            raise ValueError(
                "timesteps.density applies to objective flow_matching (DDPM "
                "objectives draw t uniformly)"
            )
        if self.export_every and self.deepspeed.zero_stage == 3:
            raise ValueError("export_every needs full parameters on rank 0: use zero_stage <= 2")
        if self.ema_decay is not None and self.deepspeed.zero_stage == 3:
            raise ValueError(
                "ema_decay needs full parameters on each rank: use zero_stage <= 2 "
                "with EMA, or set ema_decay: null"
            )
        return self


# -- pieces of the recipe ------------------------------------------------------------------


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
    if on_gpu:  # fixed shapes every step: let cuDNN pick its fastest convolutions once
        torch.backends.cudnn.benchmark = True

    # data: this rank's stream of micro batches, in an order fixed by the seed
    micro = max(1, p["batch_size"] // (world * p["grad_accum"]))
    repa = p.get("repa")
    data = ShardStream(
        config["shards"],
        config["column"],
        p["seed"],
        micro,
        rank,
        world,
        p["shuffle_mb"] << 20,
        aux=repa["features"] if repa else None,
    )
    num_classes = config["num_classes"] if data.has_labels else 0
    kind = p["backbone"]["type"]

    # backbone and noise schedule
    torch.manual_seed(p["seed"])
    cond_dim = data.cond_shape[-1] if data.cond_shape else None
    model, cond_module = build_backbone(
        p, data.sample_shape[-1], data.sample_shape[0], num_classes, cond_dim
    )
    retrain_classes = False
    if config.get("init_state") is not None:  # pretrained weights (a Ray object, or a dict)
        from difforge.diffusion.pretrained import load_into

        state = config["init_state"]
        retrain_classes = load_into(model, state if isinstance(state, dict) else _get(state))
    trainable, total = prepare(model, kind, p["finetune"], retrain_classes)
    if rank == 0:
        config["log"].log_new({"trainable_params": trainable, "total_params": total}, step=0)
    cep_hook = CEPHook(p["cep"]["kind"], p["cep"]["gamma"])
    if cond_module is not None:
        cond_module.register_forward_hook(cep_hook)
    noise_scheduler = make_noise_scheduler(p, config["column"])
    # the average lives where the network trains (it is updated every step)
    ema = copy.deepcopy(model).eval().requires_grad_(False).to(device) if p["ema_decay"] else None
    if repa:  # the projector trains with the network, in its engine and checkpoints
        from difforge.diffusion.repa import Aligned

        model = Aligned(model, kind, repa, data.aux_shape[0])

    # DeepSpeed engine: a torch AdamW (DeepSpeed's fused Adam would JIT-compile for minutes)
    # only what trains goes to the optimizer (and into ZeRO's partitions)
    optimizer = torch.optim.AdamW(
        [q for q in model.parameters() if q.requires_grad],
        lr=p["lr"],
        weight_decay=p["weight_decay"],
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(p))
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(p, micro, world, on_gpu),
    )
    dtype = torch.bfloat16 if engine.bfloat16_enabled() else torch.float32

    # resume: the optimizer step count comes back with the weights
    step = io.restore(engine, ema)
    step_log = config["log"]
    flow = p["objective"] == FLOW
    alphas = None if flow else noise_scheduler.alphas_cumprod.to(device)
    null_c = None
    if config.get("null_cond") is not None:
        null_c = torch.tensor(config["null_cond"]).to(device)
    # losses stay on the device until logged: no host sync per step, so the host prepares the
    # next batch while the device computes (copies from pinned memory, without blocking)
    losses: list = []
    align_losses: list = []  # REPA's alignment term, logged on its own

    put = functools.partial(to_device, device=device)
    network = model.net if repa else model  # without REPA's projector
    ema_params = list(ema.parameters()) if ema is not None else []
    net_params = list(network.parameters())

    def draw():  # the sample grid, drawn where the model trains (a GPU on a cluster: the
        # driver may have none), from the weights in memory. Every rank calls it: under ZeRO 3
        # they gather the weights for rank 0, the one that draws and returns the image
        shown = ema if ema is not None else network
        whole = contextlib.nullcontext()
        if ema is None and engine.zero_optimization_stage() == 3:
            whole = deepspeed.zero.GatheredParameters(list(shown.parameters()))
        with whole:
            if rank != 0:
                return None
            was = shown.training
            try:
                return _draw_grid(config, shown.eval(), device, next(shown.parameters()).dtype)
            except Exception as exc:  # noqa: BLE001 - a view of the model never fails its training
                log.warning(
                    "no sample grid at training step %d: %s: %s", step, type(exc).__name__, exc
                )
                return None
            finally:
                shown.train(was)

    grids = config.get("grid") is not None
    # throughput since this run's first optimizer step (start-up and grids excluded)
    first_step_at = window_start = None
    window_steps = 0
    while step < p["max_steps"]:
        for micro_step in range(p["grad_accum"]):
            # the rows and every draw are functions of (seed, step, micro step, rank): a
            # resumed run continues the same sequence
            g = np.random.default_rng([p["seed"], step, micro_step, rank])
            batch = data.batch(step * p["grad_accum"] + micro_step)
            x0 = put(batch.x0)
            tg = torch.Generator().manual_seed(int(g.integers(2**62)))
            noise = put(torch.randn(x0.shape, generator=tg))
            if flow:  # x_t = (1 - t) x0 + t noise; the network sees t scaled to [0, T)
                tf = put(flow_times(micro, p["timesteps"], tg))
                xt = x0 + tf[:, None, None, None] * (noise - x0)
                t = tf * p["num_train_timesteps"]
            else:
                t = put(torch.randint(0, p["num_train_timesteps"], (micro,), generator=tg))
                xt = noise_scheduler.add_noise(x0, noise, t)
            drop = put(torch.rand(micro, generator=tg)) < p["cond_drop_prob"]
            y = c = None
            if batch.labels is not None:
                y = put(batch.labels).masked_fill(drop, num_classes)
            if batch.cond is not None:
                c = put(batch.cond)
                if p["cep"]["kind"] != "none":
                    c = c + put(cep_delta(tuple(c.shape), p["cep"]["kind"], p["cep"]["gamma"], tg))
                # dropped to the encoder's own empty prompt: the null the sampler guides against
                null = null_c if null_c is not None else torch.zeros_like(c[0])
                c = torch.where(drop[:, None, None] if c.ndim == 3 else drop[:, None], null, c)
            target = _target(p["objective"], x0, noise, alphas, t)
            cep_hook.generator = tg  # CEP on class embeddings draws from this step's generator
            out = forward(engine, kind, xt.to(dtype), t, y, c.to(dtype) if c is not None else None)
            loss = torch.nn.functional.mse_loss(out.float(), target)
            losses.append(loss.detach())  # the diffusion loss alone, with or without REPA
            if repa:  # eq. 9: L + lambda L_REPA (weight 0: the projector alone learns)
                probe = repa["weight"] == 0
                align = engine.module.alignment_loss(put(batch.aux), probe)
                align_losses.append(align.detach())
                loss = loss + (1.0 if probe else repa["weight"]) * align
            engine.backward(loss)
            engine.step()
        step += 1
        if rank == 0:
            step_log.log_progress(step, losses[-1])
        checkpoint = step % p["checkpoint_every"] == 0 or step == p["max_steps"]
        if on_gpu and (first_step_at is None or checkpoint):
            torch.cuda.synchronize(device)  # the clock reads finished work, not queued work
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
                # in place, no float copy of the network (a bf16 one is added to fp32 as is)
                torch._foreach_mul_(ema_params, d)
                torch._foreach_add_(ema_params, net_params, alpha=1 - d)
        if p["export_every"] and step % p["export_every"] == 0 and rank == 0:
            _snapshot(config["snapshots_uri"], step, ema if ema is not None else network)
        if grids and p["sample_every"] and step % p["sample_every"] == 0 and step < p["max_steps"]:
            began = time.time()  # before this step's checkpoint: a replayed step draws again
            image = draw()
            if image is not None:
                step_log.log_image_at(image, "samples", step)  # once per step
            window_start += time.time() - began
        if checkpoint:
            rate = window_steps * p["batch_size"] / max(1e-9, now - window_start)
            metrics = {
                "step": step,
                "loss": float(np.mean([x.item() for x in losses])),
                "lr": scheduler.get_last_lr()[0],
                "samples_per_s": rate,
                "first_step_at": first_step_at,
            }
            if align_losses:
                metrics["repa_loss"] = float(np.mean([x.item() for x in align_losses]))
            io.save(engine, ema, step, metrics)
            logged = {"loss": metrics["loss"], "lr": metrics["lr"], "samples_per_s": rate}
            if align_losses:
                logged["repa_loss"] = metrics["repa_loss"]
            log_interval(step_log, step, data, rank, logged)
            losses, align_losses = [], []
    # the trained model's grid (a run restored at its last step draws it again)
    if grids:
        image = draw()
        if image is not None:
            step_log.log_image(image, "samples.png")
            if p["sample_every"]:  # the series ends with the final model
                step_log.log_image_at(image, "samples", step)


def _grid_plan(p: dict, data, text, num_classes: int) -> dict | None:
    """What the grid at the end of training shows: a row of 8 per class (up to 10 classes), or
    for a text model a row per training caption (up to 8), embedded here by the text encoder
    the driver has loaded already, or 8 rows of an unconditional model's samples; None for a
    text model with no captions to show."""
    import torch

    if p["backbone"]["type"] != "UNet2DConditionModel":
        return {"classes": min(num_classes, 10)}  # 0: unconditional
    encoder, null = text
    if encoder is None or C.CAPTION not in data.manifest.column_names:
        return None
    prompts: list[str] = []
    for batch in data.iter_batches(columns=[C.CAPTION], batch_size=1024):
        prompts += [
            t for t in dict.fromkeys(batch.column(C.CAPTION).to_pylist()) if t and t not in prompts
        ]
        if len(prompts) >= 8:
            break
    if not prompts:
        return None
    from difforge.diffusion.sampling import prompt_conditions

    cond, uncond = prompt_conditions((encoder, torch.as_tensor(null)), prompts[:8])
    return {"prompts": prompts[:8], "cond": cond.numpy(), "uncond": uncond.numpy()}


def _draw_grid(config: dict[str, Any], model, device, dtype):
    """`config["grid"]` drawn (fixed seeds, guidance 2 where conditional, 25 DDIM steps, 8 per
    row) with the model on its device, latents decoded through the data's VAE there: a PIL
    image."""
    import torch

    from difforge.diffusion.sampling import sample_batch
    from difforge.diffusion.schedules import make_scheduler, saved_config
    from difforge.platform.show import captioned, grid

    p, plan, per = config["params"], config["grid"], 8
    kind = p["backbone"]["type"]
    scheduler = make_scheduler(None, saved_config(make_noise_scheduler(p, config["column"])))
    # n samples at guidance w: a row of `per` per prompt or class, or `per` unconditional rows
    labels = null = None
    extra: dict = {}
    if "prompts" in plan:  # guided against the null (or negative) condition in `uncond`
        extra = {k: torch.as_tensor(plan[k]).repeat_interleave(per, 0) for k in ("cond", "uncond")}
        n, w = len(extra["cond"]), 2.0
    elif plan["classes"]:  # guided against the null class
        labels = torch.arange(plan["classes"]).repeat_interleave(per).to(device)
        null, n, w = config["num_classes"], len(labels), 2.0
    else:  # unconditional: 8 rows, nothing to guide by
        n, w = per * per, 1.0
    x = sample_batch(
        model,
        kind,
        scheduler,
        tuple(config["sample_shape"]),
        list(range(n)),
        labels,
        [w] * n,
        null,
        25,
        device=device,
        dtype=dtype,
        **extra,
    )
    tiles = to_pil(x, _vae(config["vae_uri"], device) if config.get("vae_uri") else None)
    if "prompts" in plan:
        rows = [
            (t, grid(tiles[i * per : (i + 1) * per], columns=per))
            for i, t in enumerate(plan["prompts"])
        ]
        return captioned(rows)
    canvas = grid(tiles, columns=per)
    return canvas.resize((canvas.width * 3, canvas.height * 3), 0)


@functools.lru_cache(maxsize=1)
def _vae(uri: str, device):
    """The data's VAE on `device`, loaded by a worker's first grid."""
    from diffusers import AutoencoderKL

    from difforge.models.resolve import local_copy

    return AutoencoderKL.from_pretrained(local_copy(uri)).eval().to(device)


def _snapshot(uri: str, step: int, model) -> None:
    """The weights at `step`, as safetensors in the step's work folder (export makes them
    model folders); a replayed step after a restart writes the same file again."""
    from safetensors.torch import save

    from difforge.platform.datasets import join, url_to_fs

    fs, path = url_to_fs(join(uri, f"step-{step:07d}.safetensors"))
    state = {k: v.detach().float().contiguous().cpu() for k, v in model.state_dict().items()}
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    fs.pipe_file(path, save(state))


def _target(objective: str, x0, noise, alphas, t):
    """What the network is trained to output: the noise; v = sqrt(a) noise - sqrt(1 - a) x0
    (Salimans & Ho 2022, sec. 4); or a rectified flow's velocity d x_t / dt = noise - x0 (Esser
    et al. 2024, sec. 2-3.1: the conditional flow matching loss)."""
    if objective == "epsilon":
        return noise
    if objective == FLOW:
        return noise - x0
    a = alphas[t][:, None, None, None]
    return a.sqrt() * noise - (1 - a).sqrt() * x0


def _get(ref):
    import ray

    return ray.get(ref)


def ray_train_loop(config: dict[str, Any]) -> None:
    import ray.train

    ctx = ray.train.get_context()
    train(
        config, ctx.get_world_rank(), ctx.get_world_size(), RayTrainIO(ctx.get_world_rank(), config)
    )


class DiffusionTraining(JobOperator):
    """Trains a class- or text-conditional diffusers model with DeepSpeed under Ray Train."""

    name = "train.diffusion"
    report_metrics = ("trainable_params",)
    # 2: CEP on class embeddings draws from each step's generator (resumable)
    # 3: the input is streamed, each example once per epoch (was drawn with replacement)
    # 4: init_from and finetune; trainable and total parameter counts logged
    # 5: objective (flow_matching beside epsilon and v_prediction) and timesteps
    # 6: repa; finetune.train_class_embedding
    # 7: sample_every (the grid drawn by the training loop)
    version = 7
    Params = Params
    resources = Resources(num_workers=1, num_gpus="auto")
    gpus_when_available = 1.0
    # the data, and optionally a model step to start from
    inputs: ClassVar[tuple[int, int]] = (1, 2)

    def external_state(self) -> dict[str, str] | None:
        """A pretrained start named in the YAML: its fixed version and weights digest."""
        if self.params.init_from is None:
            return None
        from difforge.diffusion.pretrained import pretrained

        self._start = pretrained(self.params.init_from)  # what runs is what was fingerprinted
        return self._start.lineage()

    def columns(self) -> Columns:
        p = self.params
        condition = C.COND_EMBEDDING if p.backbone.type == "UNet2DConditionModel" else C.LABEL
        reads = {C.ID, condition, *([p.repa.features] if p.repa else [])}
        written = {C.ID, C.MODEL_URI, "kind", "final_loss", "steps"}
        return Columns(reads=reads, writes=written, keeps_input=False)

    def run(self, ctx: JobContext) -> JobResult:
        import pyarrow as pa

        from difforge.platform import raytrain as _raytrain
        from difforge.platform.datasets import join
        from difforge.platform.summaries import class_count

        data = ctx.inputs[0]
        column = C.LATENT if C.LATENT in data.manifest.column_names else C.IMAGE
        if column not in data.manifest.column_names:
            raise DifforgeError("train.diffusion needs an `image` or a `latent` column")
        num_classes = class_count(data)
        # refuse what can never run before starting any worker (fp16 on a CPU, say)
        deepspeed_config(self.params.model_dump(), 1, 1, ctx.resources.num_gpus > 0)
        params = self.params.model_dump()
        x_shape = _shape_of(data, column)  # one sample's shape, read once
        pre = self._pretrained(ctx)
        state = None
        if pre is not None:
            from difforge.diffusion.pretrained import architecture, check_shape, load_state

            params["backbone"] = architecture(
                self.params.backbone.model_dump(
                    include=self.params.backbone.model_fields_set
                    | set(self.params.backbone.model_extra or {})
                ),
                pre,
            )
            check_shape(params["backbone"], x_shape, pre.ref)
            state = load_state(pre.folder, pre.backbone)
        elif self.params.finetune.method != "full":
            raise DifforgeError(
                f"finetune.method {self.params.finetune.method} needs pretrained "
                "weights: set init_from, or give a model step as second input"
            )
        encoder = null_cond = None  # a text model's: loaded once, for training's null and the grid
        if params["backbone"]["type"] == "UNet2DConditionModel":
            encoder, null_cond = _text_null(data)
        # the parameter count builds the network on the meta device: it is also the check
        # that the backbone's arguments make a network. Its imports (diffusers, seconds) run on
        # the driver while Ray Train starts the workers; a failure stops them (raytrain.fit)
        import torch  # noqa: F401 - imported here, before the thread and Ray Train both need it

        def count() -> bool:  # whether the class embedding is re-initialised
            trainable, total, retrain = _count(params, data, x_shape, num_classes, state)
            log.info(
                "step %s: %s, %s of %s parameters train (%.2f%%)%s",
                ctx.step,
                params["finetune"]["method"] if pre else "from scratch",
                f"{trainable:,}",
                f"{total:,}",
                100 * trainable / total,
                f", from {pre.ref}" if pre else "",
            )
            return retrain

        pool = ThreadPoolExecutor(1, thread_name_prefix=f"{ctx.step}-count")
        counted = pool.submit(count)
        pool.shutdown(wait=False)
        if state is not None:
            import ray

            state = ray.put(state)  # read once from the object store by every worker
        config = {
            "params": params,
            "init_state": state,
            "pretrained": pre.lineage() if pre else None,
            "null_cond": null_cond,
            "shards": data.shards(),
            "column": column,
            "sample_shape": x_shape,
            "snapshots_uri": join(ctx.work_uri, "snapshots"),
            "num_classes": num_classes,
            "use_gpu": ctx.resources.num_gpus > 0,
            "grid": _grid_plan(params, data, (encoder, null_cond), num_classes),
            "vae_uri": (data.metadata.get("vae") or {}).get("uri"),
        }
        progress = ("loss", self.params.max_steps, "steps")
        result = _raytrain.fit(ctx, ray_train_loop, config, progress=progress, alongside=counted)
        model_uri, info = export(params, result.checkpoint, data, config, ctx, counted.result())
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

    def _pretrained(self, ctx: JobContext):
        """The pretrained start: a model step given as second input, or `init_from`."""
        from difforge.diffusion.pretrained import pretrained

        if len(ctx.inputs) > 1:
            if self.params.init_from:
                raise DifforgeError("init_from and a second input both name a start: keep one")
            from difforge.models.resolve import model_of

            return pretrained(model_of(ctx.inputs[1])[C.MODEL_URI])
        if not self.params.init_from:
            return None
        return getattr(self, "_start", None) or pretrained(self.params.init_from)


def _text_null(data):
    """(encoder, null): the data's text encoder and the condition a dropped caption becomes,
    its embedding of the empty prompt (no encoder and zeros for data whose encoder is not
    recorded)."""
    import numpy as np

    settings = data.metadata.get("text_encoder")
    if not settings:
        shape = data.manifest.schema().field(C.COND_EMBEDDING).type.shape
        return None, np.zeros(shape, np.float32)
    from difforge.models.text import TextEncoder

    encoder = TextEncoder(settings)
    return encoder, encoder.embed([""])[0]


def _count(p: dict, data, x_shape, num_classes: int, state) -> tuple[int, int, bool]:
    """Trainable and total parameters of the backbone training builds, counted on the meta
    device (no memory, no weights), and whether its class embedding is re-initialised."""
    import torch

    from difforge.diffusion.pretrained import fresh_class_keys

    with torch.device("meta"):
        model, _ = build_backbone(p, x_shape[-1], x_shape[0], num_classes, _cond_dim(p, data))
        retrain = state is not None and bool(fresh_class_keys(model, state))
        return (*prepare(model, p["backbone"]["type"], p["finetune"], retrain), retrain)


def _cond_dim(p: dict, data) -> int | None:
    if p["backbone"]["type"] != "UNet2DConditionModel":
        return None
    return int(data.manifest.schema().field(C.COND_EMBEDDING).type.shape[-1])


def export(
    p: dict, checkpoint, data, config: dict, ctx: JobContext, retrain_classes: bool
) -> tuple[str, dict]:
    """Consolidated fp32 weights (and EMA) as a diffusers folder with the noise scheduler's
    config and the training input's VAE recorded, registered in MLflow's registry with its
    lineage (the sample grid was drawn by the training loop)."""
    import torch

    from difforge.diffusion.repa import backbone_state

    import_deepspeed()
    num_classes = config["num_classes"]
    x_shape = config["sample_shape"]
    kind, ft = p["backbone"]["type"], p["finetune"]
    cond_dim = _cond_dim(p, data)

    def build():
        return build_backbone(p, x_shape[-1], x_shape[0], num_classes, cond_dim)[0]

    trained = build()  # as trained: with its adapter layers, if any
    trainable, total = prepare(trained, kind, ft, retrain_classes)
    with checkpoint.as_directory() as d:
        trained.load_state_dict(backbone_state(consolidated_state(d)))  # REPA's projector dropped
        ema_state = (
            torch.load(os.path.join(d, "ema.pt"), map_location="cpu", weights_only=True)
            if os.path.exists(os.path.join(d, "ema.pt"))
            else None
        )
    ema_trained = None
    if ema_state is not None:
        ema_trained = copy.deepcopy(trained)
        ema_trained.load_state_dict(ema_state)
    adapter = None
    if ft["method"] != "full":  # the adapter alone (of the weights samplers load by default)
        adapter = adapter_state(ema_trained if ema_trained is not None else trained)

    def plain(m):  # the merged model: a plain diffusers network
        if ft["method"] == "full":
            return m
        out = build()
        out.load_state_dict(merged_state(m, ft["method"]))
        return out

    model = plain(trained)
    snapshots = _read_snapshots(config["snapshots_uri"]) if p["export_every"] else {}
    pre = config.get("pretrained") or {}
    noise_scheduler = make_noise_scheduler(p, config["column"])
    vae_info = data.metadata.get("vae")
    text = p["backbone"]["type"] == "UNet2DConditionModel"
    model_info = ModelInfo(
        backbone=p["backbone"]["type"],
        column=config["column"],
        num_classes=num_classes,
        classes=data.metadata.get("classes"),
        sample_shape=list(x_shape),
        vae=vae_info,
        prediction_type="velocity" if p["objective"] == FLOW else p["objective"],
        objective="flow_matching" if p["objective"] == FLOW else "ddpm",
        timesteps=p["timesteps"] if p["objective"] == FLOW else None,
        conditioning="text" if text else ("class" if num_classes else "none"),
        null_condition=num_classes if num_classes and not text else None,
        text_encoder=data.metadata.get("text_encoder") if text else None,
        cep=p["cep"],
        corruption=data.metadata.get("corruption"),
        parent_model=pre.get("init_from"),
        parent_weights_sha256=pre.get("init_weights_sha256"),
        snapshots=sorted(snapshots) or None,
        adapter=None
        if adapter is None
        else {
            **ft,
            "retrain_classes": retrain_classes,
            "trainable_params": trainable,
            "total_params": total,
        },
    )
    info = model_info.model_dump(mode="json")
    ema = plain(ema_trained) if ema_trained is not None else None
    extras = None
    if config.get("null_cond") is not None:
        extras = {"null_condition": {"embedding": torch.as_tensor(config["null_cond"])}}
    with tempfile.TemporaryDirectory() as d:
        write_model_folder(d, model_info, model, noise_scheduler, ema, extras, adapter)
        for at, state in sorted(snapshots.items()):  # as samplers load them: merged
            snap = copy.deepcopy(trained)
            snap.load_state_dict(state)
            plain(snap).save_pretrained(os.path.join(d, snapshot_folder(at)))
        # committed with the dataset, and an MLflow model in the registry, with its lineage
        from difforge.diffusion.serving import register

        register(ctx, d, info, "adapter" if adapter is not None else "diffusion")
    return ctx.artifact("model"), info


def _read_snapshots(uri: str) -> dict[int, dict]:
    """{step: state} of the weights training exported every `export_every` steps."""
    from safetensors.torch import load

    from difforge.platform.datasets import url_to_fs

    fs, path = url_to_fs(uri)
    if not fs.exists(path):
        return {}
    out = {}
    for f in fs.ls(path, detail=False):
        name = f.rsplit("/", 1)[-1]
        if name.startswith("step-") and name.endswith(".safetensors"):
            out[int(name[5:-12])] = load(fs.cat_file(f))
    return out


def _shape_of(data, column: str) -> tuple[int, ...]:
    if column == C.LATENT:
        return tuple(data.manifest.schema().field(C.LATENT).type.shape)
    row = next(data.iter_batches(columns=[C.IMAGE], batch_size=1)).to_pylist()[0]
    from difforge.platform.imaging import to_array

    arr = to_array(row[C.IMAGE])
    return (1, *arr.shape) if arr.ndim == 2 else (arr.shape[2], arr.shape[0], arr.shape[1])
