"""What an operator sees while it runs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from difforge.platform.datasets import Dataset, join, url_to_fs
from difforge.platform.outputs import MAIN, Output

if TYPE_CHECKING:
    from difforge.platform.events import StepLog
    from difforge.platform.resources import Fitted


def torch_device(num_gpus: float, dtype: str = "auto") -> tuple[str, Any]:
    """(device, torch dtype) for a model a Ray worker holds: CUDA where it was given a GPU,
    else the CPU, with torch using as many threads as Ray gave it CPUs (OMP_NUM_THREADS);
    dtype "auto" is bfloat16 on a GPU, float32 on a CPU."""
    import os

    import torch

    device = "cuda" if num_gpus and torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = "bfloat16" if device == "cuda" else "float32"
    threads = os.environ.get("OMP_NUM_THREADS")
    if device == "cpu" and threads:
        torch.set_num_threads(int(threads))
    return device, getattr(torch, dtype)


@dataclass
class MapContext:
    """Given to `MapOperator.setup` on each actor: the step, its other inputs, its work folder."""

    step: str
    inputs: list[str]  # URIs of all inputs; the first is the one being mapped
    work_uri: str
    num_gpus: float = 0.0
    #: the first input's metadata when an earlier step of the same pass is still writing it
    pending_metadata: dict[str, Any] | None = None

    def input(self, index: int) -> Dataset:
        """A committed input. In a pass of fused steps the first input is still being written:
        its metadata is `metadata(0)`; an operator that reads its whole input in `setup` sets
        `reads_whole_input = True` and is never fused with the step before it."""
        if index == 0 and self.pending_metadata is not None:
            from difforge.platform.errors import DifforgeError

            raise DifforgeError(
                f"step '{self.step}': its first input is written in this same pass, so "
                "ctx.input(0) cannot be read in setup; use ctx.metadata(0) for its metadata, or "
                "set `reads_whole_input = True` on the operator to run it in a pass of its own"
            )
        return Dataset(self.inputs[index])

    def torch_device(self, dtype: str = "auto") -> tuple[str, Any]:
        """`torch_device` for this actor's GPUs."""
        return torch_device(self.num_gpus, dtype)

    def metadata(self, index: int = 0) -> dict[str, Any]:
        """An input's manifest metadata (class names, corruption, encoders ...)."""
        if index == 0 and self.pending_metadata is not None:
            return self.pending_metadata
        return self.input(index).metadata


@dataclass
class FinalizeContext:
    """Given to `Operator.finalize`: the step, and its log (metrics, images, files)."""

    step: str
    pipeline: str
    log: StepLog

    @property
    def tracker(self) -> StepLog:
        return _former("tracker", self.log)

    def __getattr__(self, name: str) -> Any:
        # a `finalize(outcome, tracker)` of the former contract called the log's methods on it
        if name.startswith("log_") or name in ("set_tags", "run_id"):
            return _former(name, getattr(self.log, name))
        raise AttributeError(name)


@dataclass
class JobContext:
    """Given to `JobOperator.run` on the driver."""

    step: str
    pipeline: str
    inputs: list[Dataset]
    work_uri: str  # kept across failed runs: checkpoints live here
    resources: Fitted
    #: where the step logs metrics, images and files (its MLflow run)
    log: StepLog
    #: this attempt's main and side outputs: write shards with `write`, return their entries
    outputs: dict[str, Output] = field(default_factory=dict)
    storage: str = ""  # the pipeline's storage root (shared caches live under it)
    extra: dict[str, Any] = field(default_factory=dict)

    def local_work_dir(self) -> str | None:
        """The work folder as a local path, when storage is local (None on S3)."""
        fs, path = url_to_fs(self.work_uri)
        proto = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        return path if proto in ("file", "local") else None

    @property
    def artifact_uri(self) -> str:
        """Inside this attempt's main output: committed with the dataset."""
        return self.outputs[MAIN].artifact()

    def artifact(self, *parts: str) -> str:
        return join(self.artifact_uri, *parts)

    def publish(self, local_dir: str, name: str) -> str:
        """Copy a local folder into this step's committed artifacts and log it to MLflow."""
        uri = self._commit_with_data(local_dir, name)
        self.log.log_artifacts(local_dir, name)
        return uri

    def _commit_with_data(self, local_dir: str, name: str) -> str:
        """Copy a local folder into this step's committed artifacts, as `name`."""
        uri = self.artifact(name)
        fs, path = url_to_fs(uri)
        fs.put(local_dir.rstrip("/") + "/", path, recursive=True)
        return uri

    def publish_model(
        self,
        folder: str,
        kind: str,
        metrics: dict[str, float] | None = None,
        mlflow_model: str | None = None,
        usage: str | None = None,
    ) -> str:
        """Copy a local model folder into this step's committed artifacts (`model/`, what the
        step's `model_uri` names) and register it in MLflow as `<pipeline>-<step>`: as the
        step's logged model `mlflow_model` (an MLflow model of the folder) where the operator
        made one, else the folder itself. `usage`: how to use it, for its model card
        (`{ref}` is replaced by its `models:/` reference)."""
        uri = self._commit_with_data(folder, "model")
        self.log.register_model(
            f"{self.pipeline}-{self.step}", mlflow_model or folder, kind, metrics, usage
        )
        return uri

    @property
    def tracker(self) -> StepLog:
        return _former("tracker", self.log)


def _former(name: str, value: Any) -> Any:
    """`value`, reached by a former spelling of the context (`ctx.tracker`, `ctx.log_metrics`):
    a DeprecationWarning says to use `ctx.log`."""
    import warnings

    warnings.warn(
        f"ctx.{name} is the former spelling of ctx.log{'' if name == 'tracker' else '.' + name};"
        " it works until difforge 0.3",
        DeprecationWarning,
        stacklevel=3,
    )
    return value
