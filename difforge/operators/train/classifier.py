"""`train.classifier`: a small CNN trained with Ray Train (plain torch DDP).

Its weights are the step's artifact; it later scores the class accuracy of generated samples
and extracts features for Fréchet distance.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from difforge.platform import columns as C
from difforge.platform.operator import JobOperator, JobResult
from difforge.platform.spec import Resources

if TYPE_CHECKING:
    import numpy as np

    from difforge.platform.context import JobContext


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(2, ge=1, description="passes over the training set")
    batch_size: int = Field(128, ge=1, description="global batch size (split across workers)")
    lr: float = Field(2e-3, gt=0, description="AdamW learning rate (the peak, with one-cycle)")
    lr_schedule: Literal["onecycle", "constant"] = Field(
        "onecycle", description="onecycle: warm up for 15% of the steps, then anneal to ~0"
    )
    weight_decay: float = Field(1e-4, ge=0)
    width: int = Field(32, ge=4, description="channels of the first conv layer")
    seed: int = 0
    holdout_fraction: float = Field(
        0.1, ge=0, lt=1, description="held out by id hash when no evaluation input is given"
    )


def _holdout(ids: list[str], fraction: float, seed: int) -> np.ndarray:
    import hashlib

    import numpy as np

    keys = [int(hashlib.sha256(f"{seed}:{i}".encode()).hexdigest()[:8], 16) for i in ids]
    return np.asarray(keys) < fraction * 0xFFFFFFFF


def train_loop(config: dict[str, Any]) -> None:
    """One Ray Train worker: DDP over ranks, a checkpoint per epoch, resumable."""
    import numpy as np
    import ray.train
    import ray.train.torch
    import torch
    import torch.nn.functional as F

    from difforge.models.classifier import SmallCNN, load_images
    from difforge.platform.raytrain import report, restore, unwrap

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(config["threads"])))
    p = config["params"]
    x, y, ids = load_images(config["train_files"])
    if config["eval_files"]:
        ex, ey, _ = load_images(config["eval_files"])
    else:
        held = _holdout(ids, p["holdout_fraction"], p["seed"])
        ex, ey, x, y = x[held], y[held], x[~held], y[~held]
    num_classes = int(config["num_classes"])
    torch.manual_seed(p["seed"])
    model = SmallCNN(x.shape[1], num_classes, p["width"])
    opt = torch.optim.AdamW(model.parameters(), lr=p["lr"], weight_decay=p["weight_decay"])
    per_rank = max(1, p["batch_size"] // world)
    steps = p["epochs"] * max(1, len(range(rank, len(x), world)) // per_rank)  # this rank's
    # one-cycle: the weights settle as the rate anneals (a constant rate leaves the held-out
    # accuracy jumping by 10-40 points from epoch to epoch with this BatchNorm CNN)
    sched = (torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=p["lr"], total_steps=steps,
                                                 pct_start=0.15)
             if p["lr_schedule"] == "onecycle" else None)  # fmt: skip
    start_epoch = 0
    state = restore()
    if state:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        if sched is not None and state.get("sched"):
            sched.load_state_dict(state["sched"])
        start_epoch = state["epoch"] + 1
    model = ray.train.torch.prepare_model(model)
    device = ray.train.torch.get_device()

    def to_tensor(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a).float().div_(127.5).sub_(1.0).to(device)

    def evaluate() -> float:
        net = unwrap(model)
        net.eval()
        correct = 0
        with torch.no_grad():
            for s in range(0, len(ex), 512):
                pred = net(to_tensor(ex[s : s + 512])).argmax(1).cpu().numpy()
                correct += int((pred == ey[s : s + 512]).sum())
        net.train()
        return correct / max(1, len(ex))

    step_log = config["log"]
    for epoch in range(start_epoch, p["epochs"]):
        order = np.random.default_rng([p["seed"], epoch]).permutation(len(x))[rank::world]
        total, count = 0.0, 0
        for s in range(0, len(order) - per_rank + 1, per_rank):
            idx = order[s : s + per_rank]
            loss = F.cross_entropy(model(to_tensor(x[idx])), torch.from_numpy(y[idx]).to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            total, count = total + loss.item(), count + 1
        accuracy = evaluate()
        metrics = {"epoch": epoch, "train_loss": total / max(1, count), "accuracy": accuracy}
        state = {"model": unwrap(model).state_dict(), "opt": opt.state_dict(), "epoch": epoch,
                 "sched": sched.state_dict() if sched is not None else None}  # fmt: skip
        report(metrics, state if rank == 0 else None)
        if rank == 0:
            # a restart replays epochs from its checkpoint; log_new never logs one twice
            step_log.log_new({"train_loss": metrics["train_loss"], "accuracy": accuracy}, epoch)


class Classifier(JobOperator):
    """A small CNN image classifier trained with Ray Train; saves its weights and accuracy."""

    name = "train.classifier"
    version = 2
    Params = Params
    inputs: ClassVar[tuple[int, int]] = (1, 2)
    reads = (C.ID, C.IMAGE, C.LABEL)
    resources = Resources(num_workers=1)
    gpus_when_available = 1.0

    @classmethod
    def output_columns(cls, params, input_columns):
        return {C.ID, C.MODEL_URI, "kind", "accuracy", "num_classes"}

    def run(self, ctx: JobContext) -> JobResult:
        import pyarrow as pa
        import torch

        from difforge.platform import raytrain as _raytrain

        train = ctx.inputs[0]
        labels = train.to_arrow(columns=[C.LABEL]).column(C.LABEL)
        classes = train.metadata.get("classes")
        num_classes = len(classes) if classes else int(pa.compute.max(labels).as_py()) + 1
        config = {
            "params": self.params.model_dump(),
            "train_files": train.file_uris(),
            "eval_files": ctx.inputs[1].file_uris() if len(ctx.inputs) > 1 else [],
            "num_classes": num_classes,
        }
        progress = ("accuracy", self.params.epochs - 1, "epochs")  # logged per epoch, from 0
        result = _raytrain.fit(ctx, train_loop, config, progress=progress)
        state = _raytrain.final_state(result)
        model_config = {
            "kind": "classifier",
            "architecture": "SmallCNN",
            "in_channels": int(state["model"]["body.0.weight"].shape[1]),
            "num_classes": num_classes,
            "width": self.params.width,
            "classes": classes,
            "accuracy": result.metrics["accuracy"],
        }
        with tempfile.TemporaryDirectory() as d:
            torch.save(state["model"], os.path.join(d, "model.pt"))
            with open(os.path.join(d, "config.json"), "w") as f:
                json.dump(model_config, f, indent=2)
            ctx.publish(d, "model")
        ctx.log.log_metrics({"final_accuracy": result.metrics["accuracy"]})
        table = pa.table(
            {
                C.ID: ["model"],
                C.MODEL_URI: [ctx.artifact("model")],
                "kind": ["classifier"],
                "accuracy": [float(result.metrics["accuracy"])],
                "num_classes": pa.array([num_classes], pa.int64()),
            }
        )
        return JobResult(table, metadata={"model": model_config})
