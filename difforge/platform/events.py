"""What a run tells the world: the step events the executor emits, and the step log operators
write to.

The executor knows nothing of MLflow. It calls a `RunObserver` at each event of a run (the
pipeline starts, a step starts, is found cached, finishes, fails; the pipeline ends), and
`difforge.platform.tracking.MlflowObserver` turns these into MLflow runs. An observer hands
each starting step a `StepLog`: the one way an operator reaches the tracking store, through
its context (`ctx.log` in a job, the context given to `finalize`, and `config["log"]` inside a
training loop's workers, where it is the same object, pickled).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

# A run's plan and its steps (`difforge.platform.plan`), named loosely here: the plan imports
# the operators, whose contexts hand out step logs.
Plan = Any
PlannedStep = Any


@runtime_checkable
class StepLog(Protocol):
    """Where one step logs metrics, images and files (an MLflow run, or nowhere). Picklable,
    so training workers log to it too."""

    run_id: str | None

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...

    def log_new(self, metrics: dict[str, float], step: int) -> None:
        """Log `metrics` at `step` unless that step was logged before (a training run that
        resumes from a checkpoint replays steps: each is logged once)."""

    def log_progress(self, step: int, loss: Any) -> None:
        """A training loop's heartbeat, called by rank 0 at every step: `running_loss` at
        `step`, logged at most every few seconds, for the driver's progress line (checkpoint
        metrics can be minutes apart). `loss` is a float or a one-element tensor, read only
        when logged (a device tensor's read waits for the device)."""

    def log_image(self, image: Any, name: str) -> None: ...

    def log_image_at(self, image: Any, key: str, step: int) -> None:
        """An image of the series `key` at `step` (MLflow's run page steps through a series),
        unless that step has one already (a resumed training run replays steps)."""

    def log_text(self, text: str, name: str) -> None: ...

    def log_dict(self, data: dict[str, Any], name: str) -> None: ...

    def log_artifacts(self, local_dir: str, artifact_path: str | None = None) -> None: ...

    def set_tags(self, tags: dict[str, Any]) -> None: ...

    def metric_history(self, key: str) -> list[tuple[int, float]]:
        """(step, value) of a metric logged so far (for progress bars)."""

    def register_model(
        self,
        name: str,
        folder: str,
        kind: str = "diffusion",
        metrics: dict[str, float] | None = None,
        description: str | None = None,
    ) -> str | None:
        """Log the local `folder` (an MLflow model, or a plain model folder) as this step's
        logged model and register it as a new version of model `name`, tagged with its kind,
        figures and lineage, `description` its model card; return its `models:/name/version`
        reference (None where there is no registry)."""


class NullLog:
    """A step log that keeps nothing: recipes run outside a pipeline (tests, benchmarks)."""

    run_id = None

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass

    def log_new(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_progress(self, step: int, loss: Any) -> None:
        pass

    def log_image(self, image: Any, name: str) -> None:
        pass

    def log_image_at(self, image: Any, key: str, step: int) -> None:
        pass

    def log_text(self, text: str, name: str) -> None:
        pass

    def log_dict(self, data: dict[str, Any], name: str) -> None:
        pass

    def log_artifacts(self, local_dir: str, artifact_path: str | None = None) -> None:
        pass

    def set_tags(self, tags: dict[str, Any]) -> None:
        pass

    def metric_history(self, key: str) -> list[tuple[int, float]]:
        return []

    def register_model(
        self,
        name: str,
        folder: str,
        kind: str = "diffusion",
        metrics: dict[str, float] | None = None,
        description: str | None = None,
    ) -> str | None:
        return None


class RunObserver:
    """Receives a run's events, in order. Every method is optional; the default ignores it.

    `step_started` may return the step's log; the executor hands it to the operator."""

    def pipeline_started(self, plan: Plan, params: dict[str, Any], files: dict[str, str]) -> None:
        """`params`: the run's settings; `files`: small text files worth keeping with it."""

    def step_cached(self, step: PlannedStep, rows: int) -> str | None:
        """A step whose output was already committed; returns a run id, if any."""
        return None

    def step_started(self, step: PlannedStep, fused_with: list[str]) -> StepLog:
        return NullLog()

    def step_finished(
        self, step: PlannedStep, metrics: dict[str, float], manifest: dict[str, Any]
    ) -> None:
        """The step's output is committed; its metrics and manifest."""

    def step_ended(self, step: PlannedStep, status: str) -> None:
        """A step started but not finished: FAILED or KILLED."""

    def pipeline_ended(self, status: str, metrics: dict[str, float]) -> None: ...

    @property
    def run_id(self) -> str | None:
        """The pipeline's run, where there is one."""
        return None


class Observers(RunObserver):
    """Several observers as one: each hears every event, in order; the first (the tracking
    store) supplies each step's log and the run id."""

    def __init__(self, first: RunObserver, *others: RunObserver):
        self.all = (first, *others)

    def pipeline_started(self, plan: Plan, params: dict[str, Any], files: dict[str, str]) -> None:
        for o in self.all:
            o.pipeline_started(plan, params, files)

    def step_cached(self, step: PlannedStep, rows: int) -> str | None:
        return [o.step_cached(step, rows) for o in self.all][0]

    def step_started(self, step: PlannedStep, fused_with: list[str]) -> StepLog:
        return [o.step_started(step, fused_with) for o in self.all][0]

    def step_finished(
        self, step: PlannedStep, metrics: dict[str, float], manifest: dict[str, Any]
    ) -> None:
        for o in self.all:
            o.step_finished(step, metrics, manifest)

    def step_ended(self, step: PlannedStep, status: str) -> None:
        for o in self.all:
            o.step_ended(step, status)

    def pipeline_ended(self, status: str, metrics: dict[str, float]) -> None:
        for o in self.all:
            o.pipeline_ended(status, metrics)

    @property
    def run_id(self) -> str | None:
        return self.all[0].run_id
