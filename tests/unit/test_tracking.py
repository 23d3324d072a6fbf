"""MlflowObserver alone (tracking.py): a run's events, as the executor would send them, become
MLflow runs on a local store; no Ray, no step computed."""

from __future__ import annotations

import json
import time

import pyarrow as pa
import pytest
from mlflow.tracking import MlflowClient

from difforge.platform.outputs import write_dataset
from difforge.platform.plan import build_plan
from difforge.platform.spec import load_spec
from difforge.platform.tracking import MlflowObserver
from difforge.platform.watchdog import HEARTBEAT, HOST

STEPS = """
  - {id: raw, op: ingest.digits, params: {limit: 10}}
  - {id: clean, op: curate.validate, inputs: [raw]}
"""


@pytest.fixture
def plan(tmp_path):
    text = f"name: tracked\nstorage: {tmp_path / 'data'}\nsteps:\n{STEPS}"
    return build_plan(load_spec(text), check_cache=False)


def observer(tmp_path, **tags) -> tuple[MlflowObserver, MlflowClient]:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return MlflowObserver(uri, "tracked", tags), MlflowClient(uri)


def test_a_pipeline_and_its_steps_become_nested_runs_with_their_lineage(tmp_path, plan):
    seen, client = observer(tmp_path, **{"difforge.job_id": "job-1"})
    raw, clean = plan.steps
    write_dataset(raw.uri, pa.table({"id": ["a", "b"], "label": [1, 2]}), raw.fingerprint)
    seen.pipeline_started(plan, {"pipeline": "tracked"}, {"resolved.json": "{}"})
    seen.step_cached(raw, 10)
    log = seen.step_started(clean, ["clean"])
    log.log_metrics({"kept": 9.0})
    seen.step_finished(clean, {"rows_out": 9}, {"num_rows": 9, "producer": {"nodes": ["n1"]}})
    seen.pipeline_ended("FINISHED", {"seconds": 1.0, "steps_cached": 1})

    parent = client.get_run(seen.run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["difforge.job_id"] == "job-1"  # the caller's tags
    assert clean.fingerprint in parent.data.params["fingerprint.clean"]
    assert parent.data.metrics["steps_cached"] == 1
    steps = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{seen.run_id}'"
    )
    by_step = {r.data.tags["difforge.step"]: r for r in steps}
    assert by_step["raw"].data.tags["difforge.cached"] == "true"
    assert by_step["raw"].data.metrics["rows_out"] == 10
    done = by_step["clean"]
    assert done.info.status == "FINISHED" and done.data.metrics["kept"] == 9.0
    assert raw.fingerprint in done.data.tags["difforge.inputs"]  # lineage: what it read
    assert done.data.tags["difforge.uri"] == clean.uri and done.data.tags["difforge.nodes"] == "n1"
    # the dataset it read, in MLflow's Datasets panel: the upstream step's output
    (read,) = client.get_run(done.info.run_id).inputs.dataset_inputs
    assert (read.dataset.name, read.dataset.digest) == ("raw", raw.fingerprint)
    assert json.loads(read.dataset.source)["uri"] == raw.uri
    assert json.loads(read.dataset.profile)["num_rows"] == 2
    assert {c["name"]: c["type"] for c in json.loads(read.dataset.schema)["mlflow_colspec"]} == {
        "id": "string",
        "label": "long",
    }
    assert [(t.key, t.value) for t in read.tags] == [("mlflow.data.context", "input")]
    # what MLflow's UI shows: the experiment opens on its runs; each run says what it is
    # (description) and where it came from (source, commit)
    experiment = client.get_experiment(parent.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert parent.data.tags["mlflow.note.content"].startswith("difforge pipeline `tracked`")
    note = done.data.tags["mlflow.note.content"]
    assert note.startswith("`curate.validate` v") and "Reads raw;" in note
    for run in (parent, done):
        assert run.data.tags["mlflow.source.name"] == "tracked"  # no file: the pipeline's name
        assert run.data.tags["mlflow.source.type"] == "JOB"  # a submitted job's (job_id tag)


def test_an_input_committed_later_in_the_same_pass_shows_when_the_step_ends(tmp_path, plan):
    """Fused steps start together: the input of the second is committed only when the first's
    part of the pass commits. It shows in the Datasets panel once the step has ended."""
    seen, client = observer(tmp_path)
    raw, clean = plan.steps
    seen.pipeline_started(plan, {}, {})
    seen.step_started(raw, ["raw", "clean"])
    log = seen.step_started(clean, ["raw", "clean"])
    assert client.get_run(log.run_id).inputs.dataset_inputs == []  # raw is not committed yet
    write_dataset(raw.uri, pa.table({"id": ["a"], "label": [1]}), raw.fingerprint)
    seen.step_finished(raw, {"rows_out": 1}, {"num_rows": 1})
    seen.step_finished(clean, {"rows_out": 1}, {"num_rows": 1})
    (read,) = client.get_run(log.run_id).inputs.dataset_inputs
    assert (read.dataset.name, read.dataset.digest) == ("raw", raw.fingerprint)


def test_a_failed_step_and_a_killed_pipeline_end_as_such(tmp_path, plan):
    seen, client = observer(tmp_path)
    seen.pipeline_started(plan, {}, {})
    seen.step_started(plan.steps[0], ["raw"])
    seen.step_ended(plan.steps[0], "FAILED")
    seen.pipeline_ended("KILLED", {"seconds": 0.5, "steps_cached": 0})
    runs = client.search_runs([client.get_run(seen.run_id).info.experiment_id])
    assert sorted(r.info.status for r in runs) == ["FAILED", "KILLED"]


def test_the_next_run_ends_a_run_whose_driver_fell_silent(tmp_path, plan):
    first, client = observer(tmp_path)
    first.pipeline_started(plan, {}, {})
    first.step_started(plan.steps[0], ["raw"])
    first.heartbeat.stop()  # its driver gone, on another host, long ago
    client.set_tag(first.run_id, HOST, "elsewhere")
    client.set_tag(first.run_id, HEARTBEAT, f"{time.time() - 3600:.0f}")
    second, _ = observer(tmp_path)
    second.pipeline_started(plan, {}, {})
    gone = client.get_run(first.run_id)
    assert gone.info.status == "FAILED"
    assert "heartbeat stopped" in gone.data.tags["difforge.ended_by"]
    runs = client.search_runs(
        [gone.info.experiment_id], f"tags.mlflow.parentRunId = '{first.run_id}'"
    )
    assert [r.info.status for r in runs] == ["FAILED"]  # its step too
    assert client.get_run(second.run_id).info.status == "RUNNING"  # the live one untouched
    second.pipeline_ended("FINISHED", {"seconds": 0.1, "steps_cached": 0})
