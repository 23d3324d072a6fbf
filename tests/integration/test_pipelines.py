"""Pipelines end to end on a real local Ray, real MLflow, real Fashion-MNIST."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

import difforge
from difforge.platform.datasets import open_dataset
from tests.conftest import (
    BIN,
    QUICKSTART,
    difforge_cli,
    free_port,
    load_pyfunc,
    wait_for,
)


def test_quickstart_runs_every_step(quickstart):
    _, _, summary = quickstart
    assert summary.status == "FINISHED"
    rows = {s.step: s.rows_out for s in summary.steps}
    assert rows == {
        "raw": 1200,
        "raw_test": 300,
        "clean": 1200,
        "unique": 1200,
        "images": 1200,
        "noisy": 1200,
        "test_images": 300,
        "vae": 1,
        "latents": 1200,
        "classifier": 1,
        "model": 1,
        "plan": 40,
        "samples": 40,
        "quality": 1,
    }
    assert not any(s.cached for s in summary.steps)
    images = open_dataset(summary.step("images").uri)
    assert images.metadata["classes"][0] == "T-shirt/top"
    row = images.to_arrow().slice(0, 1).to_pylist()[0]
    assert (row["width"], row["height"], row["mode"], row["format"]) == (32, 32, "L", "png")
    ids = images.to_arrow(columns=["id"]).column("id").to_pylist()
    assert len(set(ids)) == 1200  # each row once, stable ids
    vae = open_dataset(summary.step("vae").uri).to_arrow().to_pylist()[0]
    assert vae["psnr_on"] == "held_out" and vae["psnr"] > 10  # measured on the test split


def test_quickstart_classifier_learns(quickstart):
    from difforge.models.classifier import load_classifier

    _, _, summary = quickstart
    model = open_dataset(summary.step("classifier").uri).to_arrow().to_pylist()[0]
    assert model["accuracy"] > 0.5  # chance is 0.1
    net, config = load_classifier(model["model_uri"])
    assert config["num_classes"] == 10 and config["classes"][9] == "Ankle boot"


def test_quickstart_is_tracked_in_mlflow(quickstart):
    _, _, summary = quickstart
    client = MlflowClient(summary.tracking_uri)
    parent = client.get_run(summary.run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.params["pipeline"] == '"quickstart"'
    assert "raw.params.limit=1200" in parent.data.params["overrides"]
    names = {a.path for a in client.list_artifacts(summary.run_id)}
    assert {"pipeline.yaml", "resolved.json"} <= names
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{summary.run_id}'"
    )
    by_step = {r.data.tags["difforge.step"]: r for r in children}
    assert set(by_step) == {
        "raw",
        "raw_test",
        "clean",
        "unique",
        "images",
        "noisy",
        "test_images",
        "vae",
        "latents",
        "classifier",
        "model",
        "plan",
        "samples",
        "quality",
    }
    images = by_step["images"]
    assert images.data.metrics["rows_in"] == 1200 and images.data.metrics["rows_out"] == 1200
    assert images.data.metrics["rows_per_s"] > 0
    assert images.data.params["size"] == "32"
    assert images.data.tags["difforge.fingerprint"] == summary.step("images").uri.rsplit("/")[-1]
    assert "manifest.json" in {a.path for a in client.list_artifacts(images.info.run_id)}
    clf = by_step["classifier"]
    history = client.get_metric_history(clf.info.run_id, "accuracy")
    assert [m.step for m in history] == [0, 1]  # one point per epoch, none twice
    (logged,) = client.get_run(clf.info.run_id).outputs.model_outputs  # its logged model
    assert client.get_logged_model(logged.model_id).model_type == "classifier"
    # the diffusion model's grid, drawn by its training worker: 10 rows of 8 samples decoded
    # through the VAE to 32 x 32 images (4 x 8 x 8 latents would tile 32 x 8), 3x, 2 px apart
    from PIL import Image

    drawn = Image.open(client.download_artifacts(by_step["model"].info.run_id, "samples.png"))
    assert drawn.size == (3 * (8 * 34 + 2), 3 * (10 * 34 + 2))
    assert np.asarray(drawn.convert("L")).std() > 10  # not a blank canvas
    # each step records the Ray nodes its work ran on (here: the one local node), in its
    # manifest and its MLflow run: a map pass, a training job, an evaluation job
    import ray

    node = ray.get_runtime_context().get_node_id()
    for step in ("images", "classifier", "model", "samples", "quality"):
        assert open_dataset(summary.step(step).uri).manifest.producer["nodes"] == [node], step
        assert by_step[step].data.tags["difforge.nodes"] == node


def test_identical_rerun_is_fully_cached(quickstart):
    _, overrides, first = quickstart
    again = difforge.run(QUICKSTART, overrides)
    assert all(s.cached for s in again.steps)
    assert [s.uri for s in again.steps] == [s.uri for s in first.steps]


def test_cached_rerun_does_not_start_ray(quickstart):
    _, overrides, _ = quickstart
    code = (
        "import sys, difforge; "
        f"s = difforge.run({QUICKSTART!r}, {overrides!r}); "
        "print('CACHED', all(x.cached for x in s.steps), 'RAY', 'ray' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "CACHED True RAY False" in out.stdout, out.stderr[-4000:]


def test_the_console_ends_with_the_result_and_the_runs_page(quickstart):
    """A rerun from the command line (all cached) ends, after its step table, with what the
    evaluation step declares (`report_metrics`: those of the run that computed it) and the
    pipeline run's page in the MLflow UI."""
    _, overrides, first = quickstart
    done = difforge_cli("run", QUICKSTART, *(f"--set={o}" for o in overrides))
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    (result,) = [x for x in lines if x.startswith("result: ")]
    client = MlflowClient(first.tracking_uri)
    computed = client.get_run(first.step("quality").run_id).data.metrics
    shown = dict(item.rsplit(" ", 1) for item in result.removeprefix("result: ").split(", "))
    assert list(shown) == [f"quality.{m}" for m in ("fid", "precision", "recall", "class_accuracy")]
    for name, value in shown.items():
        assert float(value) == pytest.approx(computed[name.split(".")[1]], rel=1e-3)
    (browse,) = [x for x in lines if x.startswith("browse it: ")]
    run_id = next(x for x in lines if x.startswith("done in")).split("MLflow run ")[1].split()[0]
    exp_id = client.get_run(run_id).info.experiment_id
    assert (
        browse
        == f"browse it: difforge ui, then http://127.0.0.1:5000/#/experiments/{exp_id}/runs/{run_id}"
        "?workflowType=machine_learning"
    )
    assert (
        lines.index(browse)
        > lines.index(result)
        > max(i for i, x in enumerate(lines) if x.startswith("quality "))
    )  # after the table


def test_changed_param_recomputes_exactly_what_depends_on_it(quickstart):
    _, overrides, first = quickstart
    changed = [*overrides, "noisy.params.seed=1"]
    plan = difforge.plan(QUICKSTART, changed)
    redo = {s.id for s in plan.steps if not s.cached}
    # the VAE and the classifier never see the labels
    assert redo == {"noisy", "latents", "model", "plan", "samples", "quality"}
    summary = difforge.run(QUICKSTART, changed, until="noisy")
    assert [s.step for s in summary.steps if not s.cached] == ["noisy"]
    assert summary.step("noisy").uri != first.step("noisy").uri


def test_force_recomputes_a_step_and_its_downstream(quickstart):
    _, overrides, first = quickstart
    plan = difforge.plan(QUICKSTART, overrides, force=["test_images"])
    # the test split feeds the VAE's held-out check and the classifier's, and the evaluation
    assert {s.id for s in plan.steps if not s.cached} == {
        "test_images",
        "vae",
        "latents",
        "classifier",
        "model",
        "plan",
        "samples",
        "quality",
    }
    summary = difforge.run(QUICKSTART, overrides, until="test_images", force=["test_images"])
    assert summary.step("test_images").cached is False
    assert summary.step("test_images").uri == first.step("test_images").uri  # same fingerprint
    assert open_dataset(summary.step("test_images").uri).num_rows == 300


def test_show_prints_manifest_and_writes_a_grid(quickstart, tmp_path):
    _, _, summary = quickstart
    grid = tmp_path / "grid.png"
    out = difforge_cli("show", summary.step("images").uri, "--grid", str(grid))
    assert out.returncode == 0, out.stderr
    assert "rows     1200" in out.stdout and "image: binary" in out.stdout
    assert '"label": ' in out.stdout
    from PIL import Image

    assert Image.open(grid).size[0] >= 256


def test_open_dataset_as_ray_dataset(quickstart):
    _, _, summary = quickstart
    ds = difforge.open_dataset(summary.step("test_images").uri).to_ray()
    assert ds.count() == 300


def test_run_summary_table_and_manifest(quickstart):
    _, _, summary = quickstart
    table = summary.table()
    assert "rows in" in table and "classifier" in table
    manifest = json.loads(
        (__import__("pathlib").Path(summary.step("raw").uri) / "_manifest.json").read_text()
    )
    assert manifest["producer"]["op"] == "ingest.fashion_mnist"
    assert manifest["num_rows"] == 1200 and manifest["difforge_version"] == difforge.__version__


def test_the_registered_model_draws_offline_and_answers_http(quickstart):
    """The quickstart's model, registered as an MLflow model that carries its VAE: loaded with
    `mlflow.pyfunc` (the hub offline) it draws 32 x 32 images decoded from its 4 x 8 x 8
    latents; `mlflow models serve --env-manager local` answers a request with them, and a
    class it does not have with an error saying so."""
    import base64
    import io
    import os
    import signal

    import pandas as pd
    import requests
    from PIL import Image

    _, _, summary = quickstart
    client = MlflowClient(summary.tracking_uri)
    ref = client.get_run(summary.step("model").run_id).data.tags["difforge.registered_model"]
    name, version = ref.removeprefix("models:/").split("/")
    card = client.get_model_version(name, version).description
    latents = json.loads(client.get_run(summary.step("model").run_id).data.tags["difforge.inputs"])
    read = f"`latents` (fingerprint `{latents['latents']}`, `{summary.step('latents').uri}`)"
    assert read in card and "`max_steps=10`" in card  # what it read, where; its recipe
    model = load_pyfunc(summary.tracking_uri, ref)
    assert model.unwrap_python_model().generator.vae is not None  # its own copy of the VAE
    out = model.predict(pd.DataFrame({"class_label": [0, 9], "seed": [0, 1], "steps": [2, 2]}))
    assert [Image.open(io.BytesIO(base64.b64decode(b))).size for b in out.image] == [(32, 32)] * 2
    port = free_port()
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": summary.tracking_uri,
        "PATH": f"{BIN}:{os.environ['PATH']}",
    }
    served = subprocess.Popen(
        [str(BIN / "mlflow"), "models", "serve", "-m", ref, "--env-manager", "local"]
        + ["-h", "127.0.0.1", "-p", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(
            lambda: served.poll() is None and requests.get(f"{url}/ping", timeout=1).ok,
            60,
            "mlflow models serve",
        )
        asked = {"dataframe_records": [{"class_label": 3, "seed": 0, "steps": 2, "guidance": 3}]}
        answer = requests.post(f"{url}/invocations", json=asked, timeout=60)
        assert answer.status_code == 200, answer.text[-2000:]
        (row,) = answer.json()["predictions"]
        assert Image.open(io.BytesIO(base64.b64decode(row["image"]))).size == (32, 32)
        bad = requests.post(
            f"{url}/invocations", json={"dataframe_records": [{"class_label": 12}]}, timeout=60
        )
        assert bad.status_code == 400 and "class 12: the model has 10 classes" in bad.text
    finally:
        os.killpg(served.pid, signal.SIGTERM)
        served.wait(timeout=30)
