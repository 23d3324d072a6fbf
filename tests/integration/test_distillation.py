"""Guided then progressive distillation through Ray Train, in a pipeline: the v-prediction teacher
the digits pipelines share (conftest's DIGITS_STEPS), distilled into a 2-step student that takes w, then sampled by
`sample.diffusion` with its own step count and by `difforge sample`."""

from __future__ import annotations

from mlflow.tracking import MlflowClient

import difforge
from tests.conftest import difforge_cli, digits_pipeline


def test_guided_distillation_pipeline(ray_session, digits_storage, tmp_path):
    spec = digits_pipeline(digits_storage, "distill-tests", [
        {"id": "student", "op": "distill.guided", "inputs": ["teacher", "raw", "clf", "test"],
         "params": {"teacher_steps": 4, "rounds": 1, "guide_steps": 40,
                    "steps_per_round": 40, "batch_size": 32, "checkpoint_every": 20,
                    "w_min": 0.0, "w_max": 3.0, "eval_images": 100}},
        {"id": "distilled_plan", "op": "sample.plan", "inputs": ["student"],
         "params": {"num_images": 20, "guidance_scales": [1.0, 3.0]}},  # 20 at each w
        {"id": "distilled_samples", "op": "sample.diffusion", "inputs": ["distilled_plan"],
         "resources": {"batch_size": 10}},
    ])  # fmt: skip
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
    assert {"samples_2_steps.png", "round_0_4_steps.png", "round_1_2_steps.png", "model"} <= names
    fd = client.get_metric_history(run_id, "fd")
    assert [m.step for m in fd] == [40, 80] and all(m.value > 0 for m in fd)
    sampled = difforge_cli("sample", out["model_uri"], "--n", "4", "--guidance", "2.5",
                           "--out", str(tmp_path / "cli"))  # fmt: skip
    assert sampled.returncode == 0, sampled.stderr
    assert "2 ddim steps" in sampled.stdout  # the student's own step count
