"""The pieces of a training recipe: the DeepSpeed config and import (with the CPU pitfalls
handled), the learning-rate schedule, checkpoint I/O through Ray Train or a plain folder,
consolidated weights from a DeepSpeed checkpoint, and running a recipe in one process."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
from io import StringIO
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from difforge.platform.errors import DifforgeError
from difforge.platform.events import NullLog


class DeepSpeedConfig(BaseModel):
    """Merged over sane defaults; anything else DeepSpeed accepts goes in `extra`."""

    model_config = ConfigDict(extra="forbid")

    zero_stage: Literal[0, 1, 2, 3] = 2
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 on GPUs, fp32 on CPUs (bf16 is emulated there)"
    )
    extra: dict[str, Any] = Field(default_factory=dict, description="raw DeepSpeed config keys")


def deepspeed_config(p: dict[str, Any], micro_batch: int, world: int, on_gpu: bool) -> dict:
    ds = p["deepspeed"]
    precision = ds["precision"]
    if precision == "auto":
        precision = "bf16" if on_gpu else "fp32"
    if precision == "fp16" and not on_gpu:
        raise DifforgeError(
            "deepspeed.precision fp16 is not supported on CPUs; use fp32 (or "
            "bf16, which CPUs without AVX-512 BF16 emulate slowly)"
        )
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

    if not os.environ.get("DS_ACCELERATOR", "").strip():  # unset or empty (DeepSpeed refuses "")
        os.environ["DS_ACCELERATOR"] = "cuda" if torch.cuda.is_available() else "cpu"
    import deepspeed
    import deepspeed.comm.torch  # noqa: F401

    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    return deepspeed


def consolidated_state(folder: str, tag: str = "state") -> dict[str, Any]:
    """Full fp32 weights from a DeepSpeed checkpoint: gathered from ZeRO partitions, or, with
    ZeRO off (stage 0), the module state DeepSpeed saved whole."""
    import torch

    states = os.path.join(folder, tag, "mp_rank_00_model_states.pt")
    saved = torch.load(states, map_location="cpu", weights_only=False)
    if saved.get("ds_config", {}).get("zero_optimization", {}).get("stage", 0) == 0:
        return {k: v.float() for k, v in saved["module"].items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    # DeepSpeed prints what it reconstructs: to the log, not the console
    out = StringIO()
    with contextlib.redirect_stdout(out):
        state = get_fp32_state_dict_from_zero_checkpoint(folder, tag=tag)
    logging.getLogger("deepspeed").info("%s", out.getvalue().strip())
    return state


def to_device(x, device):
    """A numpy array or CPU tensor on `device`. On a GPU it is copied from pinned memory without
    blocking the host: a recipe that reads no result back each step prepares the next batch
    while the device still computes this one."""
    import numpy as np
    import torch

    t = torch.from_numpy(x) if isinstance(x, np.ndarray) else x
    if torch.device(device).type == "cpu":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def log_interval(step_log, step: int, data, rank: int, metrics: dict[str, float]) -> None:
    """At a checkpoint: every rank's data-wait and compute seconds since the last one and rank
    0's `metrics`, logged by rank 0 alone (the other ranks' timings are gathered to it): one
    writer to the tracking store however many workers train. A restart replays steps from its
    checkpoint; log_new never logs one twice. Every rank calls it, at the same steps."""
    import torch.distributed as dist

    timing = data.timing()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        parts = [None] * dist.get_world_size() if rank == 0 else None
        dist.gather_object(timing, parts, dst=0)
        timing = {k: v for part in parts or [] for k, v in part.items()}
    if rank == 0:
        step_log.log_new({**timing, **metrics}, step)


def cpu_state(module) -> dict[str, Any]:
    """A module's state on the CPU: what a checkpoint holds, loadable where no GPU is."""
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}


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

                ema.load_state_dict(
                    torch.load(os.path.join(d, "ema.pt"), map_location="cpu", weights_only=True)
                )
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
                    torch.save(cpu_state(ema), os.path.join(d, "ema.pt"))
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

            ema.load_state_dict(
                torch.load(
                    os.path.join(self.folder, "ema.pt"), map_location="cpu", weights_only=True
                )
            )
        with open(progress) as f:
            return json.load(f)["step"]

    def save(self, engine, ema, step: int, metrics: dict[str, Any]) -> None:
        import torch

        engine.save_checkpoint(self.folder, tag="state")
        if self.rank == 0:
            if ema is not None:
                torch.save(cpu_state(ema), os.path.join(self.folder, "ema.pt"))
            with open(os.path.join(self.folder, "progress.json"), "w") as f:
                json.dump({"step": step}, f)
        self.history.append(metrics)


def single_process_group(on_gpu: bool = False) -> None:
    """This process as rank 0 of 1 (DeepSpeed's single-rank set-up): NCCL on a GPU, gloo on
    CPUs. Nothing when a process group exists already."""
    import torch
    import torch.distributed as dist

    from difforge.platform.runtime import free_port

    if dist.is_initialized():
        return
    # set, not defaulted: a port inherited from the parent's environment is the parent's own
    # process group's (bound there: EADDRINUSE here)
    os.environ.update(
        {
            "RANK": "0",
            "LOCAL_RANK": "0",
            "WORLD_SIZE": "1",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(free_port()),
        }
    )
    if on_gpu:
        torch.cuda.set_device(0)
    dist.init_process_group("nccl" if on_gpu else "gloo", rank=0, world_size=1)


def train_locally(config: dict[str, Any], folder: str, recipe) -> FolderIO:
    """Run the recipe (`train.diffusion`'s, or another with its signature, such as distillation's) in this
    process as rank 0 of 1."""
    import torch
    import torch.distributed as dist

    single_process_group(torch.cuda.is_available() and config.get("use_gpu", False))
    io = FolderIO(folder)
    recipe({"log": NullLog(), **config}, dist.get_rank(), dist.get_world_size(), io)
    return io
