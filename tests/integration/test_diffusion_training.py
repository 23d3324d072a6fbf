"""train.diffusion through Ray Train: two workers with ZeRO 2 in fp32 to a registered model, and
a LoRA fine-tune of that registered model whose worker is killed mid-run: the job survives from
its last checkpoint."""

from __future__ import annotations

import threading
import time

import psutil
import pytest
from mlflow.tracking import MlflowClient

import difforge
from tests.conftest import difforge_cli
from tests.unit.test_diffusion_recipe import TINY_UNET


def spec(tmp_path, max_steps: int, workers: int, name: str = "diffusion") -> dict:
    return {
        "name": name,
        "storage": str(tmp_path / "s"),
        "tracking": {"experiment": f"{name}-tests"},
        "steps": [
            {"id": "raw", "op": "ingest.digits"},
            {
                "id": "model",
                "op": "train.diffusion",
                "inputs": ["raw"],
                "params": {
                    "backbone": TINY_UNET,
                    "batch_size": 32,
                    "max_steps": max_steps,
                    "checkpoint_every": 10,
                    "warmup_steps": 2,
                    "cep": {"kind": "gaussian"},
                    "deepspeed": {"zero_stage": 2, "precision": "fp32"},
                },
                "resources": {"num_workers": workers, "num_cpus": 1},
            },
        ],
    }


@pytest.fixture(scope="module")
def trained(ray_session, tmp_path_factory):
    s = spec(tmp_path_factory.mktemp("trained"), max_steps=30, workers=2)
    s["steps"][1]["params"]["export_every"] = 10
    return difforge.run(s)


def test_two_workers_zero2_to_a_registered_model(trained):
    from diffusers import DDPMScheduler, UNet2DModel

    summary = trained
    out = difforge.open_dataset(summary.step("model").uri).to_arrow().to_pylist()[0]
    assert out["steps"] == 30
    uri = out["model_uri"]
    model = UNet2DModel.from_pretrained(f"{uri}/model")
    ema = UNet2DModel.from_pretrained(f"{uri}/ema")
    assert model.config.num_class_embeds == 11  # 10 classes and the null token
    assert sum(p.numel() for p in ema.parameters()) == sum(p.numel() for p in model.parameters())
    DDPMScheduler.from_pretrained(f"{uri}/scheduler")
    client = MlflowClient(summary.tracking_uri)
    run_id = summary.step("model").run_id
    history = client.get_metric_history(run_id, "loss")
    assert [m.step for m in history] == [10, 20, 30]
    for rank in (0, 1):  # where each worker's time went, per checkpoint interval
        waits = client.get_metric_history(run_id, f"data_wait_s/rank{rank}")
        computes = client.get_metric_history(run_id, f"compute_s/rank{rank}")
        assert [m.step for m in waits] == [m.step for m in computes] == [10, 20, 30]
        assert all(m.value >= 0 for m in waits) and all(m.value > 0 for m in computes)
    names = {a.path for a in client.list_artifacts(run_id)}
    assert "samples.png" in names  # the model is its logged model, not a run artifact
    registered = client.get_run(run_id).data.tags["difforge.registered_model"]
    assert registered.startswith("models:/diffusion-model/")
    version = client.get_model_version("diffusion-model", registered.rsplit("/", 1)[1])
    assert version.tags["step"] == "model" and version.run_id == run_id
    from difforge.diffusion.model_folder import load_model
    from difforge.models.resolve import pin

    model, info, scheduler_config, _ = load_model(registered)  # the name resolves to the folder
    assert info["num_classes"] == 10 and info["null_condition"] == 10
    # the sample grid, drawn by rank 0 from the weights it trained, shows the exported model:
    # a row of 8 per class, guidance 2, 25 DDIM steps, seeds 0-79
    import numpy as np
    import torch
    from PIL import Image

    from difforge.diffusion.sampling import sample_batch, to_pil
    from difforge.diffusion.schedules import make_scheduler
    from difforge.platform.show import grid

    labels = torch.arange(10).repeat_interleave(8)
    x = sample_batch(
        model,
        info["backbone"],
        make_scheduler(None, scheduler_config),
        tuple(info["sample_shape"]),
        list(range(80)),
        labels,
        [2.0] * 80,
        10,
        25,
    )
    canvas = grid(to_pil(x), columns=8)
    expected = np.asarray(canvas.resize((canvas.width * 3, canvas.height * 3), 0), np.int16)
    logged = np.asarray(Image.open(client.download_artifacts(run_id, "samples.png")), np.int16)
    assert logged.shape == expected.shape
    assert (np.abs(logged - expected) > 2).mean() < 0.01  # float sums in another thread count
    client.set_registered_model_alias("diffusion-model", "base", version.version)
    assert pin("models:/diffusion-model@base") == registered  # an alias, fixed to its version


def test_export_every_keeps_the_model_at_those_steps(trained, tmp_path):
    """Rank 0 of two exported the EMA weights every 10 steps: each is a model a sampler
    loads by its training step, and they differ as training went on."""
    import torch

    from difforge.cli import build_parser, cmd_sample
    from difforge.diffusion.model_folder import load_model
    from difforge.platform.errors import DifforgeError

    uri = difforge.open_dataset(trained.step("model").uri).to_arrow().to_pylist()[0]["model_uri"]
    final, info, _, _ = load_model(uri)
    assert info["snapshots"] == [10, 20, 30]
    at10, _, _, _ = load_model(uri, training_step=10)
    at30, _, _, _ = load_model(uri, training_step=30)
    weights = [dict(m.named_parameters()) for m in (at10, at30, final)]
    assert all(torch.equal(weights[1][k], weights[2][k]) for k in weights[2])  # 30 is the end
    assert not all(torch.equal(weights[0][k], weights[2][k]) for k in weights[2])
    with pytest.raises(DifforgeError, match="no snapshot at step 15"):
        load_model(uri, training_step=15)
    args = build_parser().parse_args(
        [
            "sample",
            uri,
            "--training-step",
            "20",
            "--n",
            "4",
            "--steps",
            "4",
            "--out",
            str(tmp_path / "s"),
        ]
    )
    assert cmd_sample(args) == 0
    assert len(list((tmp_path / "s").glob("*-class*.png"))) == 4


def train_workers() -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "RayTrainWorker" in cmd and "ray::" in cmd:
            found.append(p)
    return found


def test_lora_finetune_of_a_registered_model_resumes_after_a_killed_worker(trained, tmp_path):
    import torch

    from difforge.diffusion.model_folder import load_model

    registered = (
        MlflowClient(trained.tracking_uri)
        .get_run(trained.step("model").run_id)
        .data.tags["difforge.registered_model"]
    )
    fault = spec(tmp_path, 40, 2, name="fault")
    params = fault["steps"][1]["params"]
    del params["backbone"]  # taken from the weights
    params.update(
        init_from="models:/diffusion-model/latest",  # pinned to its version now
        finetune={"method": "lora", "rank": 4, "target_modules": ["conv1", "conv2"]},
        sample_every=10,
    )
    result: dict = {}

    def go() -> None:
        try:
            result["summary"] = difforge.run(fault)
        except Exception as exc:  # surfaced by the assertions below
            result["error"] = exc

    thread = threading.Thread(target=go)
    thread.start()
    work = tmp_path / "s" / "fault" / "model"
    deadline = time.time() + 300
    while time.time() < deadline and not list(work.glob("*/_work/*/ray-train/checkpoint_*")):
        time.sleep(0.5)
    assert list(work.glob("*/_work/*/ray-train/checkpoint_*")), "no checkpoint appeared"
    victims = train_workers()
    assert victims, "no training worker found"
    victims[-1].kill()  # SIGKILL one rank mid-run
    thread.join(timeout=600)
    assert "error" not in result, result.get("error")
    summary = result["summary"]
    out = difforge.open_dataset(summary.step("model").uri).to_arrow().to_pylist()[0]
    assert out["steps"] == 40  # exactly what was asked
    client = MlflowClient(summary.tracking_uri)
    run_id = summary.step("model").run_id
    steps = [m.step for m in client.get_metric_history(run_id, "loss")]
    assert steps == sorted(set(steps)) and steps[-1] == 40  # no step logged twice
    # the grid every 10 steps, as MLflow's image series: once per step, replayed steps too
    series = [a.path for a in client.list_artifacts(run_id, "images") if a.path.endswith(".png")]
    assert sorted(int(a.split("+step+")[1].split("+")[0]) for a in series) == [10, 20, 30, 40]
    (trainable,) = client.get_metric_history(run_id, "trainable_params")
    (total,) = client.get_metric_history(run_id, "total_params")
    assert 0 < trainable.value < total.value / 5

    # lineage: the fixed registry version and the weights' digest, in the folder and manifest
    model, info, _, _ = load_model(out["model_uri"])
    assert info["parent_model"] == registered and len(info["parent_weights_sha256"]) == 64
    assert (
        info["adapter"]["method"] == "lora"
        and info["adapter"]["trainable_params"] == trainable.value
    )
    manifest = difforge.open_dataset(summary.step("model").uri).manifest
    assert manifest.metadata["model"]["parent_model"] == registered
    # the adapter alone, put back onto the registered parent, is the merged model
    from_adapter, _, _, _ = load_model(out["model_uri"], "adapter")
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([10, 700]), torch.tensor([3, 10])
    with torch.no_grad():
        a, b = model(x, t, class_labels=y).sample, from_adapter(x, t, class_labels=y).sample
    assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("precision", ["fp16"])
def test_fp16_on_cpu_is_a_clear_error(ray_session, tmp_path, precision):
    s = spec(tmp_path, 10, 1, name="fp16")
    s["steps"][1]["params"]["deepspeed"]["precision"] = precision
    with pytest.raises(difforge.platform.errors.DifforgeError, match="fp16 is not supported"):
        difforge.run(s)


def test_a_backbone_argument_that_makes_no_network_is_named(ray_session, tmp_path):
    # checked on the driver while Ray Train starts its workers: the step fails with the
    # backbone's own complaint, not with a worker's error after Ray Train's retries
    s = spec(tmp_path, 10, 2, name="typo")
    s["steps"][1]["params"]["backbone"] = {**TINY_UNET, "layers_per_blok": 1}
    with pytest.raises(
        difforge.platform.errors.DifforgeError, match="^backbone UNet2DModel: .*'layers_per_blok'"
    ):
        difforge.run(s)


def test_a_backbone_check_failing_after_ray_train_started_stops_it(ray_session, tmp_path):
    # in a fresh `difforge run` the check imports diffusers for seconds: it fails after Ray
    # Train has started the run, which is stopped; the user reads the backbone's complaint
    import ray
    import yaml

    s = spec(tmp_path, 10, 2, name="typo-cli")
    s["steps"][1]["params"]["backbone"] = {**TINY_UNET, "block_out_channels": [16, 32, 64]}
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(s))
    out = difforge_cli("run", str(path), "--address", ray.get_runtime_context().gcs_address)
    assert out.returncode != 0
    said = out.stdout + out.stderr
    assert (
        "error: backbone UNet2DModel: Must provide the same number of `block_out_channels`" in said
    ), said[-3000:]
    assert "ActorDied" not in said
