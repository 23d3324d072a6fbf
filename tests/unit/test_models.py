"""The shared model layer: every model reference resolves to a folder or says what to do, and
the model folder format has one writer and one reader that refuses what it does not know.
A registered diffusion model is an MLflow model whose `predict` draws images; versions
registered before it was still resolve. (The quickstart's, a latent model served over HTTP,
is in tests/integration/test_pipelines.py.)"""

from __future__ import annotations

import json

import pytest

from difforge.diffusion.model_folder import (
    FORMAT_VERSION,
    ModelInfo,
    load_model,
    read_info,
    write_model_folder,
)
from difforge.models.resolve import resolve
from difforge.platform.errors import DifforgeError
from tests.conftest import load_pyfunc


def test_references_resolve_or_say_what_to_do(tmp_path, monkeypatch):
    assert resolve(str(tmp_path)) == str(tmp_path)
    with pytest.raises(DifforgeError, match="VAE '/nowhere/vae': no such folder"):
        resolve("/nowhere/vae", "VAE")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DifforgeError, match="hub is offline .*--local-dir DIR"):
        resolve("stabilityai/sd-vae-ft-mse", "VAE")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert resolve("stabilityai/sd-vae-ft-mse") == "stabilityai/sd-vae-ft-mse"  # for the hub


def tiny_unet():
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        num_class_embeds=11,
        down_block_types=("DownBlock2D",) * 2,
        up_block_types=("UpBlock2D",) * 2,
    )


def test_the_model_folder_round_trips_and_refuses_newer_formats(tmp_path):
    from diffusers import DDPMScheduler

    unet = tiny_unet()
    info = ModelInfo(
        backbone="UNet2DModel", sample_shape=[1, 8, 8], num_classes=10, null_condition=10
    )
    write_model_folder(str(tmp_path), info, unet, DDPMScheduler())
    assert read_info(str(tmp_path)).null_condition == 10
    written = json.loads((tmp_path / "difforge.json").read_text())
    assert written["format_version"] == FORMAT_VERSION
    assert {"objective", "conditioning", "text_encoder", "adapter", "parent_model"} <= set(written)
    model, loaded, scheduler_config, vae = load_model(str(tmp_path))
    assert loaded["num_classes"] == 10 and vae is None
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in unet.parameters())
    (tmp_path / "difforge.json").write_text(json.dumps({**written, "format_version": 99}))
    with pytest.raises(DifforgeError, match="model folder format 99; .* upgrade difforge"):
        read_info(str(tmp_path))
    with pytest.raises(DifforgeError, match="not a difforge model folder"):
        load_model(str(tmp_path / "model"))


def test_a_registered_model_draws_images_and_old_versions_still_resolve(tmp_path, monkeypatch):
    """What train.diffusion registers, an MLflow model of the folder, loads with
    `mlflow.pyfunc` and draws one PNG per row, each image a function of its seed; it, a
    version registered the earlier way (the folder itself as the run's artifact) and one
    registered as MLflow's own registration does (`models:/<logged model id>`) resolve to the
    model folder."""
    import base64
    import io

    import pandas as pd
    from diffusers import DDPMScheduler
    from mlflow import MlflowClient
    from PIL import Image

    from difforge.diffusion.serving import save_mlflow_model, usage
    from difforge.models.resolve import set_registry
    from difforge.platform.tracking import StepTracker

    folder = tmp_path / "folder"
    info = ModelInfo(
        backbone="UNet2DModel", sample_shape=[1, 8, 8], num_classes=10, null_condition=10
    )
    write_model_folder(str(folder), info, tiny_unet(), DDPMScheduler())
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("m", artifact_location=(tmp_path / "a").as_uri())
    run = client.create_run(experiment, tags={"difforge.step": "model"})
    client.log_artifacts(run.info.run_id, str(folder), "model")  # as releases before this did
    client.create_registered_model("old-and-new")
    source = f"{run.info.artifact_uri}/model"
    client.create_model_version("old-and-new", source, run_id=run.info.run_id)
    served = save_mlflow_model(str(folder), str(tmp_path / "served"), info.model_dump())
    ref = StepTracker(uri, run.info.run_id).register_model(
        "old-and-new", served, "diffusion", {"fid": 1.5}, usage(info.model_dump())
    )
    assert ref == "models:/old-and-new/2"
    card = client.get_model_version("old-and-new", "2").description
    assert "step `model`" in card and "fid 1.5" in card
    assert 'load_model("models:/old-and-new/2")' in card
    (logged,) = client.get_run(run.info.run_id).outputs.model_outputs
    model = client.get_logged_model(logged.model_id)
    assert model.source_run_id == run.info.run_id and model.model_type == "diffusion"
    # MLflow's own way: the logged model by its id (its store looks it up in the default one)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client.create_model_version("old-and-new", f"models:/{logged.model_id}")
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    set_registry(uri)
    try:
        for version in ("1", "2", "3"):
            found = resolve(f"models:/old-and-new/{version}")
            assert read_info(found).num_classes == 10, version
        pyfunc = load_pyfunc(uri, ref)
    finally:
        set_registry(None)
    asked = pd.DataFrame({"class_label": [3, 3, 7], "seed": [0, 0, 1], "steps": [2, 2, 3]})
    out = pyfunc.predict(asked)
    assert list(out.columns) == ["image", "seed"] and out.seed.tolist() == [0, 0, 1]
    images = [Image.open(io.BytesIO(base64.b64decode(b))) for b in out.image]
    assert [im.size for im in images] == [(8, 8)] * 3
    assert out.image[0] == out.image[1] != out.image[2]  # a seed draws the same image
    with pytest.raises(Exception, match="class 12: the model has 10 classes"):
        pyfunc.predict(pd.DataFrame({"class_label": [12]}))
