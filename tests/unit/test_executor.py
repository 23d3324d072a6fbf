"""The executor without Ray: job steps run on the driver, a fake runtime stands for the cluster
and a recording observer hears the run's events (events.py), beside MLflow's tracking."""

from __future__ import annotations

from typing import ClassVar

import pyarrow as pa
import pytest

import difforge
from difforge.platform import registry
from difforge.platform.capacity import Capacity
from difforge.platform.errors import StepFailed
from difforge.platform.events import NullLog, RunObserver
from difforge.platform.executor import run
from difforge.platform.operator import JobOperator, JobResult


class Make(JobOperator):
    """Five rows, made on the driver."""

    name = "unit.make"
    inputs: ClassVar[tuple[int, int]] = (0, 0)

    def run(self, ctx):
        return JobResult(table=pa.table({"id": [f"r{i}" for i in range(5)]}))


class Fail(JobOperator):
    name = "unit.fail"

    def run(self, ctx):
        raise RuntimeError("boom in the job")


@pytest.fixture(autouse=True, scope="module")
def operators():
    for op in (Make, Fail):
        registry.register(op)
    yield
    for op in (Make, Fail):
        registry.unregister(op.name)


class FakeRuntime:
    """A cluster of one 2-CPU node, as the executor asks of RayRuntime; records its calls."""

    def __init__(self):
        self.calls: list[str] = []

    def ensure(self) -> Capacity:
        self.calls.append("ensure")
        return Capacity(cpus=2.0, node_cpus=2.0)

    def check_storage(self, storage: str) -> None:
        self.calls.append("check_storage")

    def wait_for_nodes(self, step, bundles, cap) -> None:
        self.calls.append(f"wait_for_nodes {step}")

    def release_nodes(self) -> None:
        self.calls.append("release_nodes")

    def shutdown(self) -> None:
        self.calls.append("shutdown")


class Recorder(RunObserver):
    def __init__(self):
        self.events: list[tuple] = []

    def pipeline_started(self, plan, params, files) -> None:
        self.events.append(("pipeline_started", plan.name))

    def step_cached(self, step, rows):
        self.events.append(("step_cached", step.id, rows))

    def step_started(self, step, fused_with):
        self.events.append(("step_started", step.id))
        return NullLog()

    def step_finished(self, step, metrics, manifest) -> None:
        self.events.append(("step_finished", step.id, metrics["rows_out"], manifest["num_rows"]))

    def step_ended(self, step, status) -> None:
        self.events.append(("step_ended", step.id, status))

    def pipeline_ended(self, status, metrics) -> None:
        self.events.append(("pipeline_ended", status, metrics["steps_cached"]))


def pipeline(tmp_path, steps: str) -> str:
    return (
        f"name: unit\nstorage: {tmp_path / 'data'}\n"
        f"tracking: {{uri: 'sqlite:///{tmp_path / 'mlflow.db'}'}}\nsteps:\n{steps}"
    )


MAKE = "  - {id: made, op: unit.make}\n"


def test_a_step_runs_through_the_runtime_and_is_heard_from_start_to_commit(tmp_path):
    runtime, heard = FakeRuntime(), Recorder()
    summary = run(pipeline(tmp_path, MAKE), runtime=runtime, observers=[heard])
    assert heard.events == [
        ("pipeline_started", "unit"),
        ("step_started", "made"),
        ("step_finished", "made", 5, 5),
        ("pipeline_ended", "FINISHED", 0),
    ]
    # asked for the cluster, its storage checked, the step's nodes asked for and let go; a
    # runtime handed in is the caller's to shut down
    assert runtime.calls == ["ensure", "check_storage", "ensure", "wait_for_nodes made"] + [
        "release_nodes"
    ]
    assert summary.status == "FINISHED" and summary.step("made").rows_out == 5
    assert difforge.open_dataset(summary.step("made").uri).num_rows == 5


def test_a_cached_run_never_asks_for_the_cluster(tmp_path):
    run(pipeline(tmp_path, MAKE), runtime=FakeRuntime())
    runtime, heard = FakeRuntime(), Recorder()
    summary = run(pipeline(tmp_path, MAKE), runtime=runtime, observers=[heard])
    assert runtime.calls == []
    assert heard.events == [
        ("pipeline_started", "unit"),
        ("step_cached", "made", 5),
        ("pipeline_ended", "FINISHED", 1),
    ]
    assert summary.step("made").cached


def test_a_failing_step_is_heard_failed_and_nothing_of_it_is_committed(tmp_path):
    steps = MAKE + "  - {id: broken, op: unit.fail, inputs: [made]}\n"
    runtime, heard = FakeRuntime(), Recorder()
    with pytest.raises(StepFailed, match=r"step 'broken' \(unit.fail\) failed: .*boom in the job"):
        run(pipeline(tmp_path, steps), runtime=runtime, observers=[heard])
    assert heard.events[-3:] == [
        ("step_started", "broken"),
        ("step_ended", "broken", "FAILED"),
        ("pipeline_ended", "FAILED", 0),
    ]
    assert runtime.calls[-1] == "release_nodes"  # let go, failed or not
    plan = difforge.plan(pipeline(tmp_path, steps))
    assert plan.step("made").cached and not plan.step("broken").cached
