"""Text-to-image from captions to scores, offline: captions from a template over the digits'
classes and pixels, a small text encoder built from their words, `encode.text`, a
`UNet2DConditionModel` that drops captions to that encoder's empty prompt, sampled from
held-out prompts that keep the class they name (deterministic per seed, guided against the
null or a negative prompt) and scored by a user's CLIP model (`evaluate.clip_score`, here a tiny
one built offline); `difforge sample --prompt`."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

import difforge
from difforge.cli import build_parser, cmd_sample
from difforge.platform.errors import DifforgeError
from tests.tiny_models import tiny_clip

TINY_TEXT_UNET = {
    "type": "UNet2DConditionModel",
    "block_out_channels": [16, 32],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "attention_head_dim": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
}


def test_text_to_image_pipeline(ray_session, tmp_path, capsys):
    from difforge.diffusion.model_folder import load_model, text_conditioning
    from difforge.diffusion.sampling import prompt_conditions, sample_batch
    from difforge.diffusion.schedules import make_scheduler

    spec = {
        "name": "t2i",
        "storage": str(tmp_path / "s"),
        "tracking": {"experiment": "t2i-tests"},
        "steps": [
            {"id": "raw", "op": "ingest.digits", "params": {"split": "train"}},
            {"id": "held_out", "op": "ingest.digits", "params": {"split": "test", "limit": 12}},
            {
                "id": "captions",
                "op": "caption.template",
                "inputs": ["raw"],
                "params": {"template": "a {size} {brightness} digit {class}"},
            },
            {
                "id": "prompts",
                "op": "caption.template",
                "inputs": ["held_out"],
                "params": {"template": "a {size} {brightness} digit {class}"},
            },
            {
                "id": "encoder",
                "op": "build.text_encoder",
                "inputs": ["captions"],
                "params": {"hidden_size": 16, "layers": 1, "heads": 2},
            },
            {
                "id": "embedded",
                "op": "encode.text",
                "inputs": ["captions", "encoder"],
                "params": {"max_length": 8},
            },
            {
                "id": "model",
                "op": "train.diffusion",
                "inputs": ["embedded"],
                "params": {
                    "backbone": TINY_TEXT_UNET,
                    "batch_size": 32,
                    "max_steps": 20,
                    "checkpoint_every": 20,
                    "warmup_steps": 2,
                },
            },
            {
                "id": "plan",
                "op": "sample.plan",
                "inputs": ["model", "prompts"],
                "params": {"guidance_scales": [2.0], "rows_per_shard": 6},
            },
            {
                "id": "samples",
                "op": "sample.diffusion",
                "inputs": ["plan"],
                "params": {"num_inference_steps": 4},
                "resources": {"batch_size": 6},
            },
            {
                "id": "clip",
                "op": "evaluate.clip_score",
                "inputs": ["samples"],
                "params": {"model": tiny_clip(tmp_path / "clip", image_size=16)},
                "resources": {"batch_size": 5},
            },
        ],
    }
    summary = difforge.run(spec)
    captions = difforge.open_dataset(summary.step("captions").uri).to_arrow().to_pylist()
    assert all(c["caption"].endswith(f"digit {c['label']}") for c in captions)
    assert len({c["caption"] for c in captions}) > 10  # the pixels' attributes vary

    out = difforge.open_dataset(summary.step("model").uri).to_arrow().to_pylist()[0]
    model, info, config, _ = load_model(out["model_uri"])
    assert info["conditioning"] == "text" and info["text_encoder"]["max_length"] == 8
    encoder, null = text_conditioning(out["model_uri"])
    assert torch.allclose(null, torch.from_numpy(encoder.embed([""])[0]))  # training's null

    samples = difforge.open_dataset(summary.step("samples").uri).to_arrow()
    held = difforge.open_dataset(summary.step("prompts").uri).to_arrow()
    assert samples.num_rows == 12
    assert sorted(samples.column("prompt").to_pylist()) == sorted(
        held.column("caption").to_pylist()
    )
    # each sample keeps the class its prompt names: evaluate.fid's class_accuracy scores that
    assert samples.column("label").to_pylist() == held.column("label").to_pylist()
    client = MlflowClient(summary.tracking_uri)
    for step in ("model", "samples"):  # training's grid: a row per training caption, under it
        assert "samples.png" in {a.path for a in client.list_artifacts(summary.step(step).run_id)}

    # CLIP score per sample, against its own prompt: 100 cos(image, text), clipped at 0, as a
    # direct computation with the same model gives it; the mean logged
    scored = difforge.open_dataset(summary.step("clip").uri).to_arrow()
    assert scored.column("id").to_pylist() == samples.column("id").to_pylist()
    assert "image" not in scored.column_names
    expected = _clip_scores(tmp_path / "clip", samples)
    got = np.asarray(scored.column("clip_score").to_pylist())
    assert np.allclose(got, expected, atol=1e-3) and (got > 0).any()
    logged = client.get_run(summary.step("clip").run_id).data.metrics["clip_score"]
    assert logged == pytest.approx(float(got.mean()), abs=1e-4)

    # deterministic per seed, whatever the batch; a negative prompt changes what it guides from
    sched = make_scheduler("ddim", config)
    prompts = ["a small bright digit 3", "a large dark digit 7"]
    text = (encoder, null)

    def draw(ps, seeds, negatives=None):
        cond, uncond = prompt_conditions(text, ps, negatives)
        return sample_batch(
            model,
            info["backbone"],
            sched,
            tuple(info["sample_shape"]),
            seeds,
            torch.zeros(len(ps), dtype=torch.long),
            [2.0] * len(ps),
            None,
            4,
            cond=cond,
            uncond=uncond,
        )

    pair = draw(prompts, [5, 6])
    assert torch.allclose(draw(prompts[1:], [6])[0], pair[1], atol=1e-5)
    assert not torch.equal(draw(prompts, [5, 6], ["a large dark digit 3", None])[0], pair[0])

    # `difforge sample --prompt`, in this process (the command's own code, without start-up)
    code = cmd_sample(
        build_parser().parse_args(
            [
                "sample",
                out["model_uri"],
                "--prompt",
                prompts[0],
                "--prompt",
                prompts[1],
                "--n",
                "4",
                "--steps",
                "4",
                "--out",
                str(tmp_path / "cli"),
            ]
        )
    )
    assert code == 0 and "2 prompt(s)" in capsys.readouterr().out
    assert len(list((tmp_path / "cli").glob("0000*.png"))) == 4
    with pytest.raises(DifforgeError, match="text-conditional: give one"):
        cmd_sample(build_parser().parse_args(["sample", out["model_uri"]]))
    assert np.asarray(draw(prompts[:1], [5])).shape == (1, 1, 8, 8)


def _clip_scores(folder, samples) -> np.ndarray:
    """max(100 cos(E_image, E_text), 0) by transformers' CLIP directly, for each sample."""
    from transformers import CLIPModel, CLIPProcessor

    from difforge.platform.imaging import decode

    model, processor = (
        CLIPModel.from_pretrained(folder).eval(),
        CLIPProcessor.from_pretrained(folder),
    )
    images = [decode(b).convert("RGB") for b in samples.column("image").to_pylist()]
    inputs = processor(
        text=samples.column("prompt").to_pylist(), images=images, return_tensors="pt", padding=True
    )
    with torch.no_grad():
        out = model(**inputs)
    cos = torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds)
    return (100 * cos).clamp(min=0).numpy()
