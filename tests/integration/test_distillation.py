"""Distillation through Ray Train, in pipelines, of the v-prediction teacher the digits
pipelines share (conftest's DIGITS_STEPS): guided then progressive, into a 2-step student that
takes w; consistency, into a student with guidance built in. Each is then sampled by
`sample.diffusion` with its own step count and by `difforge sample`."""

from __future__ import annotations

import pandas as pd
from mlflow.tracking import MlflowClient

import difforge
from difforge.diffusion.model_folder import model_info
from tests.conftest import difforge_cli, digits_pipeline, load_pyfunc


def test_guided_distillation_pipeline(ray_session, digits_storage, tmp_path):
    spec = digits_pipeline(
        digits_storage,
        "distill-tests",
        [
            {
                "id": "student",
                "op": "distill.guided",
                "inputs": ["teacher", "raw", "clf", "test"],
                "params": {
                    "teacher_steps": 4,
                    "rounds": 1,
                    "guide_steps": 40,
                    "steps_per_round": 40,
                    "batch_size": 32,
                    "checkpoint_every": 20,
                    "w_min": 0.0,
                    "w_max": 3.0,
                    "eval_images": 100,
                },
            },
            {
                "id": "distilled_plan",
                "op": "sample.plan",
                "inputs": ["student"],
                "params": {"num_images": 20, "guidance_scales": [1.0, 3.0]},
            },  # 20 at each w
            {
                "id": "distilled_samples",
                "op": "sample.diffusion",
                "inputs": ["distilled_plan"],
                "resources": {"batch_size": 10},
            },
        ],
    )
    summary = difforge.run(spec)
    out = difforge.open_dataset(summary.step("student").uri).to_arrow().to_pylist()[0]
    assert out["steps"] == 80 and out["num_inference_steps"] == 2
    samples = difforge.open_dataset(summary.step("distilled_samples").uri).to_arrow()
    assert samples.num_rows == 40 and set(samples.column("guidance_scale").to_pylist()) == {
        1.0,
        3.0,
    }
    client = MlflowClient(summary.tracking_uri)
    run_id = summary.step("student").run_id
    history = client.get_metric_history(run_id, "loss")
    assert [m.step for m in history] == [20, 40, 60, 80]  # each step once
    names = {a.path for a in client.list_artifacts(run_id)}
    # a grid and a Fréchet distance after each phase: guidance folded in (4 steps), then halved
    assert {"samples_2_steps.png", "round_0_4_steps.png", "round_1_2_steps.png"} <= names
    # registered as an MLflow model that draws in its own 2 steps at the w asked for
    ref = client.get_run(run_id).data.tags["difforge.registered_model"]
    asked = pd.DataFrame({"class_label": [1, 1], "seed": [0, 0], "guidance": [0.0, 3.0]})
    drawn = load_pyfunc(summary.tracking_uri, ref).predict(asked)
    assert drawn.image[0] != drawn.image[1]  # w is an input of a guided student
    fd = client.get_metric_history(run_id, "fd")
    assert [m.step for m in fd] == [40, 80] and all(m.value > 0 for m in fd)
    sampled = difforge_cli(
        "sample", out["model_uri"], "--n", "4", "--guidance", "2.5", "--out", str(tmp_path / "cli")
    )
    assert sampled.returncode == 0, sampled.stderr
    assert "2 ddim steps" in sampled.stdout  # the student's own step count


def test_consistency_distillation_pipeline(ray_session, digits_storage, tmp_path):
    """distill.consistency on the shared teacher with guidance built in: a registered model
    folder that `sample.diffusion` and `difforge sample` draw from with its own LCM sampler,
    step count and guidance scale (the plan's scales are not applied a second time)."""
    spec = digits_pipeline(
        digits_storage,
        "distill-tests",
        [
            {
                "id": "consistency",
                "op": "distill.consistency",
                "inputs": ["teacher", "raw"],
                "params": {
                    "steps": 20,
                    "ode_steps": 10,
                    "num_inference_steps": 2,
                    "batch_size": 32,
                    "checkpoint_every": 10,
                    "guidance_scale": 2.0,
                },
            },
            {
                "id": "cm_plan",
                "op": "sample.plan",
                "inputs": ["consistency"],
                "params": {"num_images": 10, "guidance_scales": [3.0]},
            },
            {"id": "cm_samples", "op": "sample.diffusion", "inputs": ["cm_plan"]},
        ],
    )
    summary = difforge.run(spec)
    out = difforge.open_dataset(summary.step("consistency").uri).to_arrow().to_pylist()[0]
    assert out["steps"] == 20 and out["num_inference_steps"] == 2
    info = model_info(out["model_uri"])
    assert info["guidance_scale"] == 2.0 and info["distillation"]["method"] == "distill.consistency"
    samples = difforge.open_dataset(summary.step("cm_samples").uri).to_arrow()
    assert samples.num_rows == 10
    assert set(samples.column("guidance_scale").to_pylist()) == {2.0}  # what they were drawn at
    client = MlflowClient(summary.tracking_uri)
    run_id = summary.step("consistency").run_id
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [10, 20]
    assert {"samples_2_steps.png", "round_0_2_steps.png"} <= {
        a.path for a in client.list_artifacts(run_id)
    }
    assert client.search_model_versions("name='digits-consistency'")
    sampled = difforge_cli("sample", out["model_uri"], "--n", "4", "--out", str(tmp_path / "cli"))
    assert sampled.returncode == 0, sampled.stderr
    assert "2 lcm steps, guidance 2.0 (built into the model)" in sampled.stdout
