"""`train.classifier`: a small CNN trained with Ray Train (plain torch DDP).

Its weights are the step's artifact; it later scores the class accuracy of generated samples
and extracts features for Fréchet distance.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from difforge.diffusion.data import DEFAULT_SHUFFLE_MB, ShuffleMB, with_kept_rows
from difforge.platform import columns as C
from difforge.platform.errors import DifforgeError
from difforge.platform.operator import Columns, JobOperator, JobResult
from difforge.platform.resources import Resources

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
    eval_rows: int = Field(10_000, ge=1, description="evaluation rows scored after each epoch")
    shuffle_mb: ShuffleMB = DEFAULT_SHUFFLE_MB


def held_out(ids: list[str], fraction: float, seed: int) -> np.ndarray:
    """Which rows (by id hash) are held out for evaluation when no evaluation input is given."""
    from difforge.platform.ids import id_fraction

    return id_fraction(ids, fraction, str(seed))


def trained_on(ids: list[str], fraction: float, seed: int) -> np.ndarray:
    return ~held_out(ids, fraction, seed)


def train_loop(config: dict[str, Any]) -> None:
    """One Ray Train worker: DDP over ranks, the input streamed (each image once per epoch, in
    an order fixed by the seed), evaluated and checkpointed after each epoch, resumable."""
    import ray.train
    import ray.train.torch
    import torch
    import torch.nn.functional as F

    from difforge.diffusion.data import ShardStream, read_batches
    from difforge.diffusion.training import log_interval
    from difforge.models.classifier import SmallCNN
    from difforge.platform.raytrain import report, restore, unwrap

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(config["threads"])))
    p = config["params"]
    keep, eval_keep = config["keep"], config["eval_keep"]
    per_rank = max(1, p["batch_size"] // world)
    data = ShardStream(
        config["shards"],
        C.IMAGE,
        p["seed"],
        per_rank,
        rank,
        world,
        p["shuffle_mb"] << 20,
        keep=keep,
    )
    steps_per_epoch = max(1, len(data) // (per_rank * world))
    steps = p["epochs"] * steps_per_epoch
    num_classes = int(config["num_classes"])
    torch.manual_seed(p["seed"])
    model = SmallCNN(data.sample_shape[0], num_classes, p["width"])
    opt = torch.optim.AdamW(model.parameters(), lr=p["lr"], weight_decay=p["weight_decay"])
    # one-cycle: the weights settle as the rate anneals (a constant rate leaves the held-out
    # accuracy jumping by 10-40 points from epoch to epoch with this BatchNorm CNN)
    sched = (
        torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=p["lr"], total_steps=steps, pct_start=0.15)
        if p["lr_schedule"] == "onecycle"
        else None
    )
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

    def evaluate() -> tuple[float, int]:
        """Accuracy on at most `eval_rows` evaluation rows, read a shard at a time."""
        net = unwrap(model)
        net.eval()
        correct = seen = 0
        with torch.no_grad():
            for b in read_batches(config["eval_shards"], C.IMAGE, p["eval_rows"], eval_keep):
                for s in range(0, len(b.x0), 512):
                    logits = net(torch.from_numpy(b.x0[s : s + 512]).to(device))
                    correct += int((logits.argmax(1).cpu().numpy() == b.labels[s : s + 512]).sum())
                seen += len(b.x0)
        net.train()
        return correct / max(1, seen), seen

    step_log = config["log"]
    for epoch in range(start_epoch, p["epochs"]):
        total = 0.0
        for step in range(epoch * steps_per_epoch, (epoch + 1) * steps_per_epoch):
            batch = data.batch(step)
            x = torch.from_numpy(batch.x0).to(device)
            loss = F.cross_entropy(model(x), torch.from_numpy(batch.labels).to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            total += loss.item()
        accuracy, seen = evaluate()
        metrics = {
            "epoch": epoch,
            "train_loss": total / steps_per_epoch,
            "accuracy": accuracy,
            "eval_rows": seen,
        }
        state = {
            "model": unwrap(model).state_dict(),
            "opt": opt.state_dict(),
            "epoch": epoch,
            "sched": sched.state_dict() if sched is not None else None,
        }
        report(metrics, state if rank == 0 else None)
        log_interval(
            step_log, epoch, data, rank, {"train_loss": metrics["train_loss"], "accuracy": accuracy}
        )


class Classifier(JobOperator):
    """A small CNN image classifier trained with Ray Train; saves its weights and accuracy."""

    name = "train.classifier"
    report_metrics = ("accuracy",)
    # 3: the input is streamed, each image once per epoch; evaluation on at most eval_rows
    # 4: weights saved as safetensors; registered in MLflow's model registry
    version = 4
    Params = Params
    inputs: ClassVar[tuple[int, int]] = (1, 2)
    resources = Resources(num_workers=1)
    gpus_when_available = 1.0

    def columns(self) -> Columns:
        written = {C.ID, C.MODEL_URI, "kind", "accuracy", "num_classes"}
        return Columns(reads={C.ID, C.IMAGE, C.LABEL}, writes=written, keeps_input=False)

    def run(self, ctx: JobContext) -> JobResult:
        import pyarrow as pa
        from safetensors.torch import save_file

        from difforge.platform import raytrain as _raytrain
        from difforge.platform.summaries import class_count

        train = ctx.inputs[0]
        classes = train.metadata.get("classes")
        num_classes = class_count(train)
        p = self.params
        shards, keep, eval_keep = train.shards(), None, None
        if len(ctx.inputs) > 1:
            eval_shards = ctx.inputs[1].shards()
        elif p.holdout_fraction > 0:
            keep = functools.partial(trained_on, fraction=p.holdout_fraction, seed=p.seed)
            eval_keep = functools.partial(held_out, fraction=p.holdout_fraction, seed=p.seed)
            eval_shards, shards = shards, with_kept_rows(shards, keep)
        else:
            raise DifforgeError(
                "train.classifier: give an evaluation input or a holdout_fraction above 0"
            )
        config = {
            "params": p.model_dump(),
            "shards": shards,
            "keep": keep,
            "eval_shards": eval_shards,
            "eval_keep": eval_keep,
            "num_classes": num_classes,
        }
        # logged at each epoch's index (from 0): epoch e done means e + 1 of `epochs`
        progress = ("accuracy", self.params.epochs, "epochs", 0)
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
            save_file(
                {k: v.contiguous() for k, v in state["model"].items()},
                os.path.join(d, "model.safetensors"),
            )
            with open(os.path.join(d, "config.json"), "w") as f:
                json.dump(model_config, f, indent=2)
            ctx.log.log_metrics({"final_accuracy": result.metrics["accuracy"]})
            ctx.publish_model(d, "classifier", metrics={"accuracy": result.metrics["accuracy"]})
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
