"""Consecutive stateless map steps run in one pass over the data, each still committed,
finalized and tracked as its own, with the same datasets as when each runs alone."""

from __future__ import annotations

import sys

import mlflow
import pyarrow as pa
import pytest
from pydantic import BaseModel, ConfigDict
from ray import cloudpickle

import difforge
from difforge.platform import registry
from difforge.platform.errors import StepFailed
from difforge.platform.events import RunObserver
from difforge.platform.fusion import passes
from difforge.platform.operator import MapOperator
from difforge.platform.settings import default_tracking_uri
from tests.integration.test_curate import make_bad_folder


class ExplodeParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    on: str = "good3.png"


class Explode(MapOperator):
    """Raises on one id (a bug in a user's operator)."""

    name = "test.explode"
    Params = ExplodeParams
    reads = ("id",)

    def process(self, batch: pa.Table) -> pa.Table:
        if self.params.on in batch.column("id").to_pylist():
            raise ValueError(f"cannot handle {self.params.on}")
        return batch


def spec(storage, folder, extra: list | None = None) -> dict:
    return {
        "name": "fused",
        "storage": str(storage),
        "tracking": {"experiment": "fusion-tests"},
        "steps": [
            {
                "id": "raw",
                "op": "ingest.images",
                "params": {"path": str(folder)},
                "resources": {"batch_size": 5},
            },
            {
                "id": "clean",
                "op": "curate.validate",
                "inputs": ["raw"],
                "params": {"max_pixels": 1_000_000, "max_aspect_ratio": 4},
                "resources": {"batch_size": 3},
            },
            {
                "id": "images",
                "op": "image.resize",
                "inputs": ["clean"],
                "params": {"size": 8, "method": "pad"},
                "resources": {"batch_size": 2},
            },
            *(extra or []),
        ],
    }


class Recorder(RunObserver):
    """An observer beside MLflow's: the run's events, in order."""

    def __init__(self):
        self.events: list[tuple] = []

    def pipeline_started(self, plan, params, files):
        self.events.append(("pipeline", plan.name, "resolved.json" in files))

    def step_cached(self, step, rows):
        self.events.append(("cached", step.id, rows))

    def step_started(self, step, fused_with):
        self.events.append(("started", step.id, len(fused_with)))
        return super().step_started(step, fused_with)

    def step_finished(self, step, metrics, manifest):
        self.events.append(("finished", step.id, metrics["rows_out"], manifest["num_rows"]))

    def step_ended(self, step, status):
        self.events.append(("ended", step.id, status))

    def pipeline_ended(self, status, metrics):
        self.events.append(("end", status))


def runs_by_step(summary) -> dict:
    client = mlflow.MlflowClient(summary.tracking_uri)
    return {s.step: client.get_run(s.run_id) for s in summary.steps}


def test_a_fused_pass_writes_what_separate_passes_write(ray_session, tmp_path):
    make_bad_folder(tmp_path / "bad")
    fused = difforge.run(spec(tmp_path / "a", tmp_path / "bad"))
    alone = difforge.run(spec(tmp_path / "b", tmp_path / "bad"), fuse=False)

    runs = runs_by_step(fused)
    assert {r.data.tags.get("difforge.pass") for r in runs.values()} == {"raw+clean+images"}
    assert "difforge.pass" not in runs_by_step(alone)["images"].data.tags
    assert runs["clean"].data.metrics["rejected_truncated"] == 2  # each step's own metrics
    assert runs["images"].data.metrics["rows_in"] == fused.step("clean").rows_out
    for step in ("raw", "clean", "clean/rejects", "images", "images/rejects"):
        sid, _, side = step.partition("/")
        uri_a, uri_b = fused.step(sid).uri, alone.step(sid).uri
        a = difforge.open_dataset(f"{uri_a}/{side}" if side else uri_a).to_arrow()
        b = difforge.open_dataset(f"{uri_b}/{side}" if side else uri_b).to_arrow()
        assert a.equals(b), f"{step} differs between a fused pass and separate passes"
    assert difforge.open_dataset(fused.step("images").uri).num_rows == 8
    # batches of 5, then 3, then 2 rows: the later steps see slices of the earlier ones'
    files = difforge.open_dataset(fused.step("images").uri).manifest.files
    assert max(f.rows for f in files) == 2

    rec = Recorder()
    again = difforge.run(spec(tmp_path / "a", tmp_path / "bad"), observers=[rec])
    assert all(s.cached for s in again.steps)
    rows = {s.step: s.rows_out for s in fused.steps}
    assert rec.events == [
        ("pipeline", "fused", True),
        *[("cached", sid, rows[sid]) for sid in ("raw", "clean", "images")],
        ("end", "FINISHED"),
    ]


def test_a_failing_step_in_a_pass_is_named_and_nothing_is_committed(ray_session, tmp_path):
    make_bad_folder(tmp_path / "bad")
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    registry.register(Explode)
    boom = {"id": "boom", "op": "test.explode", "inputs": ["images"]}
    rec = Recorder()
    try:
        with pytest.raises(StepFailed) as err:
            difforge.run(spec(tmp_path / "s", tmp_path / "bad", [boom]), observers=[rec])
        steps = ("raw", "clean", "images", "boom")
        assert rec.events == [
            ("pipeline", "fused", True),
            *[("started", sid, 4) for sid in steps],
            *[("ended", sid, "FAILED") for sid in steps],
            ("end", "FAILED"),
        ]
        message = str(err.value)
        assert message.startswith("step 'boom' (test.explode) (in one pass with raw, clean, ")
        assert "ValueError: cannot handle good3.png" in message
        client = mlflow.MlflowClient(default_tracking_uri())
        exp = client.get_experiment_by_name("fusion-tests")
        failed = client.search_runs([exp.experiment_id], "attributes.status = 'FAILED'")
        steps = {r.data.tags.get("difforge.step") for r in failed}
        assert steps >= {"raw", "clean", "images", "boom"}
        for sid in ("raw", "clean", "images"):
            assert not list((tmp_path / "s").glob(f"fused/{sid}/*/_manifest.json"))

        fixed = {**boom, "params": {"on": "nothing"}}
        summary = difforge.run(spec(tmp_path / "s", tmp_path / "bad", [fixed]))
        assert summary.step("boom").rows_out == 8
    finally:
        registry.unregister("test.explode")


def test_which_steps_share_a_pass(tmp_path):
    """Sources and stateless maps chain; a second consumer, a model-holding (actor) step, a
    job, a step with other inputs or other CPUs, and anything cached each start a pass."""
    steps = [
        {"id": "raw", "op": "ingest.digits"},
        {"id": "clean", "op": "curate.validate", "inputs": ["raw"]},
        {"id": "images", "op": "image.resize", "inputs": ["clean"], "params": {"size": 16}},
        {"id": "small", "op": "image.resize", "inputs": ["clean"], "params": {"size": 4}},
        {
            "id": "noisy",
            "op": "corrupt.labels",
            "inputs": ["images"],
            "params": {"corruption_ratio": 0.1},
        },
        {
            "id": "wide",
            "op": "image.resize",
            "inputs": ["noisy"],
            "params": {"size": 20},
            "resources": {"num_cpus": 2},
        },
        {"id": "vae", "op": "train.vae", "inputs": ["noisy"], "params": {"max_steps": 1}},
        {"id": "latents", "op": "encode.vae", "inputs": ["noisy", "vae"]},
        {
            "id": "rejected",
            "op": "image.resize",
            "inputs": ["clean.rejects"],
            "params": {"size": 4},
        },
    ]
    plan = difforge.plan({"name": "p", "storage": str(tmp_path), "steps": steps})
    groups = [[s.id for s in g] for g in passes(plan.steps)]
    assert groups == [
        ["raw", "clean", "images", "noisy"],
        ["small"],
        ["wide"],
        ["vae"],
        ["latents"],
        ["rejected"],
    ]
    assert [[s.id] for s in plan.steps] == [[s.id for s in g] for g in passes(plan.steps, False)]
