"""Fine-tuning from pretrained weights without Ray: what each method trains, that merged
exports compute what was trained, that adapters go back onto their parent, that a ZeRO-2
checkpoint with frozen parameters consolidates, and the errors a user can make."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import difforge
from difforge.diffusion.backbones import build_backbone
from difforge.diffusion.finetune import (
    GAMMA,
    adapter_state,
    apply_adapter,
    is_class_embedding,
    merged_state,
    prepare,
)
from difforge.diffusion.pretrained import architecture, load_into, pretrained
from difforge.diffusion.training import consolidated_state, train_locally
from difforge.operators.train.diffusion import Params, train
from difforge.platform.errors import DifforgeError, SpecError
from tests.unit.test_diffusion_recipe import TINY_UNET, digits_dataset

ATTN_UNET = {
    **TINY_UNET,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
}
TINY_DIT = {
    "type": "DiTTransformer2DModel",
    "num_layers": 2,
    "num_attention_heads": 2,
    "attention_head_dim": 8,
    "patch_size": 2,
    "norm_num_groups": 4,
}
SHAPES = {"UNet2DModel": (1, 8), "DiTTransformer2DModel": (4, 8)}
FT = {"rank": 4, "alpha": 4.0, "dropout": 0.0, "target_modules": None}


def build(cfg, classes=10):
    channels, size = SHAPES[cfg["type"]]
    torch.manual_seed(0)
    return build_backbone({"backbone": cfg}, size, channels, classes, None)[0]


def outputs(model, cfg):
    channels, size = SHAPES[cfg["type"]]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, channels, size, size, generator=g)
    with torch.no_grad():
        return model.eval()(x, torch.tensor([10, 600]), class_labels=torch.tensor([1, 3])).sample


@pytest.mark.parametrize("cfg", [ATTN_UNET, TINY_DIT], ids=["unet", "dit"])
@pytest.mark.parametrize("method", ["lora", "difffit", "bias"])
def test_each_method_trains_its_own_parameters_and_merges_exactly(cfg, method):
    model = build(cfg)
    parent = copy.deepcopy(model)
    trainable, total = prepare(model, cfg["type"], {"method": method, **FT})
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert 0 < trainable < total / 2
    if method == "lora":
        assert names and all("lora_" in n for n in names)
    elif method == "bias":
        assert names and all(n.endswith(".bias") for n in names)
    else:  # DiffFit: biases, norms, the class embedding and a scale per residual branch
        gammas = [n for n in names if n.endswith(GAMMA)]
        assert gammas and all(
            torch.equal(model.get_parameter(n), torch.ones_like(model.get_parameter(n)))
            for n in gammas
        )
        assert any(".to_out.0." in n for n in gammas)
        assert any(is_class_embedding(n) for n in names)
        assert not any(n.endswith(".weight") and ("to_q" in n or ".conv1." in n) for n in names)
    with torch.no_grad():  # as if trained: every trainable parameter moved
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    tuned = outputs(model, cfg)
    assert not torch.allclose(tuned, outputs(parent, cfg), atol=1e-4)
    merged = build(cfg)  # a plain diffusers network, no adapter layers
    merged.load_state_dict(merged_state(copy.deepcopy(model), method))
    assert torch.allclose(outputs(merged, cfg), tuned, atol=1e-5)
    apply_adapter(parent, cfg["type"], {"method": method, **FT}, adapter_state(model))
    assert torch.allclose(outputs(parent, cfg), tuned, atol=1e-6)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return digits_dataset(tmp_path_factory.mktemp("digits"))


def run(folder, data, init_state=None, **params):
    p = Params(
        backbone=ATTN_UNET,
        batch_size=32,
        warmup_steps=2,
        checkpoint_every=10,
        max_steps=10,
        **params,
    ).model_dump()
    return train_locally(
        {
            "params": p,
            "shards": data.shards(),
            "column": "image",
            "num_classes": 10,
            "threads": 2,
            "init_state": init_state,
        },
        str(folder),
        train,
    )


def test_zero2_checkpoints_with_frozen_parameters_consolidate(tmp_path, digits):
    run(tmp_path / "base", digits)
    base = consolidated_state(str(tmp_path / "base"))
    for method in ("lora", "bias"):
        io = run(tmp_path / method, digits, base, finetune={"method": method, **FT})
        assert io.history[-1]["step"] == 10
        state = consolidated_state(str(tmp_path / method))
        model = build(ATTN_UNET)
        prepare(model, "UNet2DModel", {"method": method, **FT})
        model.load_state_dict(state)  # strict: every frozen and trained parameter is there
        frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
        key = {"lora": lambda n: n.replace(".base_layer.", ".")}.get(method, lambda n: n)
        assert frozen and all(torch.equal(state[n], base[key(n)]) for n in frozen)
        trained = [n for n, p in model.named_parameters() if p.requires_grad]
        if method == "bias":
            assert any(not torch.equal(state[n], base[n]) for n in trained)


def test_a_pretrained_model_fixes_the_architecture_and_a_new_class_count_retrains(tmp_path):
    from diffusers import UNet2DModel

    five = build_backbone({"backbone": TINY_UNET}, 8, 1, 5, None)[0]
    five.save_pretrained(tmp_path / "net")
    pre = pretrained(str(tmp_path / "net"))
    assert pre.backbone == "UNet2DModel" and len(pre.sha256) == 64
    cfg = architecture({}, pre)  # nothing in the YAML: the weights' own
    assert cfg["block_out_channels"] == [8, 16] and "num_class_embeds" not in cfg
    with pytest.raises(
        DifforgeError, match=r"block_out_channels: \[8, 32\] in the YAML, \[8, 16\]"
    ):
        architecture({"block_out_channels": [8, 32]}, pre)
    with pytest.raises(DifforgeError, match="type: DiTTransformer2DModel in the YAML"):
        architecture({"type": "DiTTransformer2DModel"}, pre)
    ten = build_backbone({"backbone": cfg}, 8, 1, 10, None)[0]  # 10 classes, not 5
    state = UNet2DModel.from_pretrained(pre.folder).state_dict()
    assert load_into(ten, state)  # the class embedding was re-initialised
    prepare(ten, "UNet2DModel", {"method": "bias", **FT}, retrain_classes=True)
    assert ten.class_embedding.weight.requires_grad and ten.class_embedding.weight.shape[0] == 11
    assert torch.equal(ten.conv_in.weight, state["conv_in.weight"])
    same = build_backbone({"backbone": cfg}, 8, 1, 5, None)[0]
    assert not load_into(same, state)  # same classes: nothing re-initialised


@pytest.mark.parametrize("cfg", [ATTN_UNET, TINY_DIT], ids=["unet", "dit"])
def test_train_class_embedding_adds_the_class_rows_to_any_method(cfg):
    """Fine-tuning on classes the parent never saw under their labels: with
    train_class_embedding, LoRA and bias train the class embedding too (the adapter keeps it)."""
    for method in ("lora", "bias"):
        plain, with_classes = build(cfg), build(cfg)
        n0, _ = prepare(plain, cfg["type"], {"method": method, **FT})
        n1, _ = prepare(
            with_classes, cfg["type"], {"method": method, **FT, "train_class_embedding": True}
        )
        rows = [(n, p) for n, p in with_classes.named_parameters() if is_class_embedding(n)]
        assert rows and all(p.requires_grad for _, p in rows)
        assert not any(
            p.requires_grad for n, p in plain.named_parameters() if is_class_embedding(n)
        )
        assert n1 == n0 + sum(p.numel() for _, p in rows)
        assert set(adapter_state(with_classes)) >= {n for n, _ in rows}


def test_bad_starts_are_clear_errors_at_plan_time(tmp_path):
    spec = {
        "name": "ft",
        "storage": str(tmp_path),
        "steps": [
            {"id": "raw", "op": "ingest.digits"},
            {
                "id": "model",
                "op": "train.diffusion",
                "inputs": ["raw"],
                "params": {
                    "init_from": "someone/some-diffusion-model",
                    "finetune": {"method": "lora"},
                },
            },
        ],
    }
    with pytest.raises(SpecError, match="hub is offline .*hf download someone/some-diffusion"):
        difforge.plan(spec)
    spec["steps"][1]["params"]["init_from"] = str(tmp_path / "nothing")
    with pytest.raises(SpecError, match="nothing': no such folder"):
        difforge.plan(spec)
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    spec["steps"][1]["params"]["init_from"] = str(tmp_path / "vae")
    with pytest.raises(SpecError, match="a AutoencoderKL, not a UNet2DModel"):
        difforge.plan(spec)
