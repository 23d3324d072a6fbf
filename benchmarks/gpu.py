"""GPU benchmark of two compute paths, for a machine with a CUDA GPU (Ray not needed).

    python benchmarks/gpu.py                # a CUDA GPU: all three parts below
    python benchmarks/gpu.py --only train   # one part: peak, encode, train, diagnose, compile
    python benchmarks/gpu.py --smoke        # anywhere: tiny models and sizes, checks the script

- `peak`: an 8192^3 bf16 matrix product (the ceiling the MFU figures are also quoted against,
  beside the datasheet's dense bf16 peak).
- `encode`: what an `encode.vae` actor does per batch, without Ray (`EncodeVAE.process` on an
  Arrow batch of PNG bytes: decode on the CPU, copy, encode, latents back as a tensor column),
  and `vae.encode` alone on a batch already on the GPU. Stable Diffusion's autoencoder
  configuration, random weights, random 256x256 PNGs. Target (issue 3): 1,000 images/s on one
  H100.
- `train`: `train.diffusion`'s recipe (`operators/train/diffusion.train`: the committed
  Parquet input streamed by `ShardStream`, DeepSpeed ZeRO 2 in bf16, EMA, gradient clipping)
  run in this process without Ray, on Stable Diffusion 2's UNet configuration (865M
  parameters, cross-attention on 77x1024 text embeddings) over 32x32x4 latents, at the
  largest power-of-two batch that the measured memory per sample says fits. Checkpoints are
  not written (the compute path is measured, not the disk). Beside it, the same network's
  forward, backward and a fused AdamW step in plain PyTorch (bf16 autocast): the ceiling the
  recipe can approach. MFU = model FLOPs per sample (forward + backward, counted by
  `torch.utils.flop_counter` at a small batch) x samples/s / peak. Target (issue 14): >= 35% of
  the GPU's dense bf16 peak. Beside the recipe as configured: without EMA, with ZeRO off, and
  with fp32 weights under DeepSpeed's bf16 torch autocast (the plain step's precision).
- `diagnose` (not in the default three): the recipe's kernels by device time
  (torch.profiler, 6 steady steps) and its `aten::copy_` calls by input shapes and dtypes.
- `compile` (not in the default three; minutes of compilation: a device call of its own): the
  plain step under torch.compile against eager.

Writes benchmarks/results/gpu.json (not with --smoke), and $OUT/gpu.json where OUT is set.
Models have random weights: speed does not depend on them.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# dense bf16 matrix rate of the SXM parts by NVIDIA's datasheets (without sparsity), TFLOP/s
DATASHEET_BF16 = {"H100": 989.4, "H200": 989.4, "A100": 312.0}

SD_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "scaling_factor": 0.18215,
}
TINY_VAE = {
    **SD_VAE,
    "block_out_channels": [32, 32],
    "norm_num_groups": 8,
    "down_block_types": ["DownEncoderBlock2D"] * 2,
    "up_block_types": ["UpDecoderBlock2D"] * 2,
}

# stabilityai/stable-diffusion-2-base's unet/config.json (sample size and channels come from
# the data; cross_attention_dim from the condition column)
SD2_UNET = {
    "type": "UNet2DConditionModel",
    "block_out_channels": [320, 640, 1280, 1280],
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "attention_head_dim": [5, 10, 20, 20],
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "use_linear_projection": True,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
}
TINY_UNET = {
    **SD2_UNET,
    "block_out_channels": [32, 64],
    "attention_head_dim": [2, 4],
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "layers_per_block": 1,
    "norm_num_groups": 8,
}


def _network(smoke: bool) -> tuple[dict, int, int, int]:
    """The UNet measured and its inputs: (backbone, latent size, text tokens, text width)."""
    return (TINY_UNET, 8, 8, 32) if smoke else (SD2_UNET, 32, 77, 1024)


def png_batch(n: int, size: int, seed: int = 0) -> list[bytes]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (size, size, 3), np.uint8)).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak(smoke: bool) -> dict:
    import torch

    n = 1024 if smoke else 8192
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    a, b = (torch.randn(n, n, device=dev, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    sync()
    reps = 2 if smoke else 20
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync()
    tflops = 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12
    print(f"peak: {n}^3 bf16 matrix product, random data: {tflops:.0f} TFLOP/s")
    return {"matmul_tflops": round(tflops, 1), "matmul_n": n}


def encode(smoke: bool, batch: int, batches: int) -> dict:
    import pyarrow as pa
    import torch
    from diffusers import AutoencoderKL

    from difforge.operators.encode.vae import EncodeVAE, Params
    from difforge.platform.context import MapContext

    cuda = torch.cuda.is_available()
    size, batch, batches = (32, 4, 2) if smoke else (256, batch, batches)
    folder = tempfile.mkdtemp(prefix="difforge-gpu-vae-")
    AutoencoderKL(**(TINY_VAE if smoke else SD_VAE)).save_pretrained(folder)

    op = EncodeVAE(Params(pretrained=folder))
    op.setup(MapContext(step="latents", inputs=[], work_uri=folder, num_gpus=1.0 if cuda else 0))
    pngs = png_batch(batch, size)
    table = pa.table({"id": [f"img/{i}" for i in range(batch)], "image": pa.array(pngs)})
    for _ in range(3):  # warm-up: cuDNN autotuning, allocator
        op.process(table)
    sync()
    t0 = time.perf_counter()
    for _ in range(batches):
        out = op.process(table)
    sync()
    operator = batch * batches / (time.perf_counter() - t0)
    shape = out.column("latent").type.shape

    x = torch.randn(batch, 3, size, size, device=op.device, dtype=op.dtype)
    with torch.no_grad():
        for _ in range(3):
            z = op.vae.encode(x).latent_dist.mean
        sync()
        t0 = time.perf_counter()
        for _ in range(batches):
            z = op.vae.encode(x).latent_dist.mean
        sync()
    model = batch * batches / (time.perf_counter() - t0)
    print(
        f"encode: {op.dtype}, {size}x{size}, batch {batch}, latents {shape} "
        f"({tuple(z.shape[1:])} from the model)"
    )
    print(
        f"encode: operator (EncodeVAE.process, PNG decode included): {operator:.0f} images/s; "
        f"model alone: {model:.0f} images/s; target 1,000 images/s on one H100"
    )
    return {
        "dtype": str(op.dtype),
        "size": size,
        "batch": batch,
        "batches": batches,
        "operator_images_per_s": round(operator),
        "model_images_per_s": round(model),
    }


class _Metrics:
    """The recipe's step log and checkpoint I/O, keeping the metrics and writing nothing;
    `on_step` is called after each training step (the profiler's clock)."""

    run_id = None

    def __init__(self, on_step=None):
        self.logged: list[dict] = []
        self.history: list[dict] = []
        self.on_step = on_step

    def log_new(self, metrics, step):
        self.logged.append({"step": step, **metrics})

    def log_progress(self, step, loss):
        if self.on_step is not None:
            self.on_step()

    def log_image(self, image, name):
        pass

    def log_image_at(self, image, key, step):
        pass

    def restore(self, engine, ema) -> int:
        return 0

    def save(self, engine, ema, step, metrics) -> None:
        self.history.append(metrics)


def _train_flops(model, batch: int, cond_dim: int, tokens: int, size: int) -> float:
    """Model FLOPs of one sample's forward and backward (matrix products, convolutions and
    attention, as torch's flop counter counts them)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    dev = next(model.parameters()).device
    dt = next(model.parameters()).dtype
    x = torch.randn(batch, 4, size, size, device=dev, dtype=dt)
    c = torch.randn(batch, tokens, cond_dim, device=dev, dtype=dt)
    t = torch.randint(0, 1000, (batch,), device=dev)
    counter = FlopCounterMode(display=False)
    with counter:
        model(x, t, encoder_hidden_states=c).sample.float().pow(2).mean().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / batch


def _activation_bytes(model, batch: int, cond_dim: int, tokens: int, size: int) -> float:
    """Peak memory per sample of a bf16 forward and backward, above the weights."""
    import torch

    dev = next(model.parameters()).device
    x = torch.randn(batch, 4, size, size, device=dev, dtype=torch.bfloat16)
    c = torch.randn(batch, tokens, cond_dim, device=dev, dtype=torch.bfloat16)
    t = torch.randint(0, 1000, (batch,), device=dev)
    sync()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    model(x, t, encoder_hidden_states=c).sample.float().pow(2).mean().backward()
    sync()
    per = (torch.cuda.max_memory_allocated() - base) / batch
    model.zero_grad(set_to_none=True)
    return per


def _plain_step_rate(
    model,
    batch: int,
    cond_dim: int,
    tokens: int,
    size: int,
    steps: int,
    channels_last: bool = False,
) -> float:
    """Samples/s of forward, backward and a fused AdamW step in plain PyTorch, bf16 autocast
    over fp32 weights (no DeepSpeed, no data path): the ceiling for the recipe."""
    import torch

    dev = next(model.parameters()).device
    cuda = dev.type == "cuda"
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda)
    x = torch.randn(batch, 4, size, size, device=dev).to(memory_format=fmt)
    c = torch.randn(batch, tokens, cond_dim, device=dev)
    t = torch.randint(0, 1000, (batch,), device=dev)

    def step():
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda):
            loss = (model(x, t, encoder_hidden_states=c).sample.float() - x).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return batch * steps / (time.perf_counter() - t0)


def _latent_dataset(
    folder: str, rows: int, size: int, tokens: int, cond_dim: int, per_shard: int
) -> list[dict]:
    """Parquet shards of random latents and text embeddings, in the recipe's input form."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from difforge.platform.tensors import to_column

    rng = np.random.default_rng(0)
    shards = []
    for i, start in enumerate(range(0, rows, per_shard)):
        n = min(per_shard, rows - start)
        path = os.path.join(folder, f"part-{i:05d}.parquet")
        pq.write_table(
            pa.table(
                {
                    "id": [f"row/{start + j}" for j in range(n)],
                    "latent": to_column(rng.standard_normal((n, 4, size, size), np.float32)),
                    "cond_embedding": to_column(
                        rng.standard_normal((n, tokens, cond_dim), np.float32)
                    ),
                }
            ),
            path,
        )
        shards.append({"file": path, "bytes": os.path.getsize(path), "sha256": "", "rows": n})
    return shards


def train(
    smoke: bool,
    batch: int | None,
    steps: int,
    peak_tflops: float | None,
    variants: bool = True,
    on_step=None,
) -> dict:
    import torch

    from difforge.diffusion.backbones import build_backbone
    from difforge.diffusion.training import single_process_group
    from difforge.operators.train.diffusion import Params
    from difforge.operators.train.diffusion import train as recipe

    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    backbone, size, tokens, cond_dim = _network(smoke)
    p = Params(
        backbone=backbone,
        batch_size=batch or 4,
        max_steps=steps,
        checkpoint_every=steps,
        warmup_steps=1,
    ).model_dump()

    # one instance in bf16 for the FLOP count and the memory per sample
    torch.manual_seed(0)
    model, _ = build_backbone(p, size, 4, 0, cond_dim)
    params_n = sum(q.numel() for q in model.parameters())
    model = model.to(dev, torch.bfloat16 if cuda else torch.float32).train()
    flops = _train_flops(model, 2, cond_dim, tokens, size)
    print(
        f"train: {params_n / 1e6:.0f}M parameters; {flops / 1e9:.1f} GFLOP per sample "
        "(forward + backward)"
    )
    if batch is None:
        if cuda:
            act = _activation_bytes(model, 16, cond_dim, tokens, size)
            total = torch.cuda.get_device_properties(0).total_memory
            # weights bf16 + grads + fp32 master, Adam moments, EMA, DeepSpeed buckets: ~24 B
            room = 0.8 * total - 24 * params_n
            batch = 1 << max(0, int(room // act).bit_length() - 1)
            batch = min(batch, 1024)
            print(
                f"train: {act / 2**20:.0f} MiB of activations per sample; batch {batch} "
                f"(the largest power of two in 80% of {total / 2**30:.0f} GiB)"
            )
        else:
            batch = 4
    model = model.float()
    if cuda:
        torch.backends.cudnn.benchmark = True  # as the recipe sets on GPUs
    plain = plain_cl = float("nan")
    if variants:
        plain = _plain_step_rate(model, batch, cond_dim, tokens, size, 2 if smoke else 10)
        print(f"train: plain PyTorch step (bf16 autocast, fused AdamW): {plain:.1f} samples/s")
        plain_cl = _plain_step_rate(model, batch, cond_dim, tokens, size, 2 if smoke else 10, True)
        print(f"train: the same, channels_last: {plain_cl:.1f} samples/s")
    del model
    if cuda:
        torch.cuda.empty_cache()

    # the recipe, rank 0 of 1, on shards written to a local folder
    work = tempfile.mkdtemp(prefix="difforge-gpu-train-")
    rows = max(2 * batch, 64)
    shards = _latent_dataset(work, rows, size, tokens, cond_dim, max(8, rows // 8))
    p["batch_size"] = batch
    single_process_group(cuda)

    def run(params: dict) -> _Metrics:
        sink = _Metrics(on_step)
        recipe(
            {
                "params": params,
                "shards": shards,
                "column": "latent",
                "num_classes": 0,
                "use_gpu": cuda,
                "threads": 4,
                "log": sink,
            },
            0,
            1,
            sink,
        )
        if cuda:
            import gc

            gc.collect()
            torch.cuda.empty_cache()
        return sink

    while True:  # the estimate of what fits can be off by DeepSpeed's buffers: halve, retry
        t0 = time.perf_counter()
        try:
            sink = run(p)
            break
        except torch.cuda.OutOfMemoryError:
            if batch <= 8:
                raise
            batch //= 2
            p["batch_size"] = batch
            print(f"train: out of memory; again at batch {batch}")
    wall = time.perf_counter() - t0
    # what the recipe's options cost: the same run without EMA, with ZeRO off (stage 0), and
    # with fp32 weights under DeepSpeed's torch autocast in bf16 (the plain step's precision)
    measured: dict = {}
    short = {"max_steps": max(3, steps // 2), "checkpoint_every": max(3, steps // 2)}
    autocast = {
        "precision": "fp32",
        "extra": {"torch_autocast": {"enabled": True, "dtype": "bfloat16"}},
    }
    for name, change in {
        "no_ema": {"ema_decay": None},
        "zero_stage_0": {"deepspeed": {**p["deepspeed"], "zero_stage": 0}},
        "fp32_weights_bf16_autocast": {"deepspeed": {**p["deepspeed"], **autocast}},
    }.items():
        if not variants:
            break
        try:
            measured[name] = round(run({**p, **short, **change}).history[-1]["samples_per_s"], 1)
        except Exception as exc:  # noqa: BLE001 - reported beside the main figure
            measured[name] = f"{type(exc).__name__}: {exc}"
        print(f"train: recipe, {name}: {measured[name]} samples/s")
    m = sink.history[-1]
    rate = m["samples_per_s"]
    timing = next(x for x in reversed(sink.logged) if "data_wait_s/rank0" in x)
    wait, compute = timing["data_wait_s/rank0"], timing["compute_s/rank0"]
    name = torch.cuda.get_device_name(0) if cuda else "cpu"
    sheet = next((v for k, v in DATASHEET_BF16.items() if k in name), None)
    out = {
        "backbone": "SD 2 UNet (stable-diffusion-2-base config)" if not smoke else "tiny",
        "parameters": params_n,
        "latent": [4, size, size],
        "cond": [tokens, cond_dim],
        "batch": batch,
        "steps": steps,
        "gflop_per_sample": round(flops / 1e9, 2),
        "recipe_samples_per_s": round(rate, 1),
        "plain_samples_per_s": round(plain, 1),
        "plain_channels_last_samples_per_s": round(plain_cl, 1),
        "recipe_variants_samples_per_s": measured,
        "recipe_vs_plain": round(rate / plain, 3),
        "recipe_wall_s": round(wall, 1),
        "data_wait_s": round(wait, 2),
        "compute_s": round(compute, 2),
        "final_loss": round(m["loss"], 4),
    }
    print(
        f"train: recipe {rate:.1f} samples/s at batch {batch} ({rate / plain:.2f}x plain "
        f"PyTorch); waited {wait:.1f} s for data, computed {compute:.1f} s; whole call "
        f"{wall:.0f} s for {steps} steps"
    )
    achieved = flops * rate / 1e12
    out["achieved_tflops"] = round(achieved, 1)
    if sheet:
        out["datasheet_bf16_tflops"] = sheet
        out["mfu"] = round(achieved / sheet, 3)
        out["mfu_plain"] = round(flops * plain / 1e12 / sheet, 3)
        print(
            f"train: {achieved:.0f} TFLOP/s = MFU {achieved / sheet:.1%} of {sheet} (datasheet "
            f"dense bf16; plain PyTorch {out['mfu_plain']:.1%}); target 35%"
        )
    if peak_tflops:
        out["of_measured_matmul"] = round(achieved / peak_tflops, 3)
    return out


def diagnose(smoke: bool, batch: int | None) -> dict:
    """Where the recipe's time goes: its kernels by device time (torch.profiler over a short
    run), and its copies (`aten::copy_`) by input shapes and dtypes, to tell the casts of the
    weights (their shapes) from those of activations (the batch's)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    batch = batch or (4 if smoke else 256)
    out: dict = {"batch": batch}
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    # steady steps only: start-up, the first steps (cuDNN's autotuning with benchmark on, lazy
    # kernel loading) and a warm-up step are left out of the profile
    steps, skip = (2, 1) if smoke else (6, 3)
    run = skip + 1 + steps + 1  # skipped, warm-up, profiled, and one to close the window
    window = torch.profiler.schedule(wait=skip, warmup=1, active=steps, repeat=1)
    with profile(activities=acts, record_shapes=True, schedule=window) as prof:
        t0 = time.perf_counter()
        train(smoke, batch, run, None, variants=False, on_step=prof.step)
        wall = time.perf_counter() - t0
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    by_op = prof.key_averages()
    table = by_op.table(sort_by=key, row_limit=25)
    copies: dict[str, list] = {}  # (shapes, dtypes): [time, calls]
    for e in prof.events():
        if e.name == "aten::copy_":
            seen = copies.setdefault(f"{e.input_shapes} {e.input_dtypes}", [0.0, 0])
            seen[0] += getattr(e, key)
            seen[1] += 1
    total = sum(getattr(e, key) for e in by_op) or 1
    ranked = sorted(copies.items(), key=lambda kv: kv[1][0], reverse=True)
    lines = [f"{t / total:7.2%}  {n:6d} calls  {what}" for what, (t, n) in ranked[:20]]
    copy_share = sum(t for t, _ in copies.values()) / total
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "profile.txt").write_text(table)
        Path(os.environ["OUT"], "copies.txt").write_text("\n".join(lines) + "\n")
    print(table[:6000])
    print(
        f"diagnose: aten::copy_ {copy_share:.1%} of the time; the largest by input shapes "
        "and dtypes (share, calls, [destination, source, non_blocking] twice):"
    )
    print("\n".join(lines[:12]))
    busy = total / 1e6
    # the optimizer steps the profile holds (torch records each under `Optimizer.step#...`)
    stepped = sum(1 for e in prof.events() if e.name.startswith("Optimizer.step#"))
    out.update(
        run_s=round(wall, 1),
        profiled_steps=stepped,
        device_busy_s=round(busy, 1),
        copy_share=round(copy_share, 3),
        copies_by_shape=lines[:12],
    )
    print(
        f"diagnose: {stepped} steady steps profiled (of a {run}-step run of {wall:.1f} s), "
        f"device busy {busy:.1f} s in them"
    )
    return out


def compiled(smoke: bool, batch: int | None) -> dict:
    """The plain step with torch.compile against eager, on the same network and batch: is the
    target reachable on this network at all? (Compiling the SD 2 UNet took over 200 s on the
    H200: give this part a device call of its own.)"""
    import torch

    from difforge.diffusion.backbones import build_backbone
    from difforge.operators.train.diffusion import Params

    cuda = torch.cuda.is_available()
    backbone, size, tokens, cond_dim = _network(smoke)
    batch = batch or (4 if smoke else 256)
    p = Params(backbone=backbone).model_dump()
    torch.manual_seed(0)
    model, _ = build_backbone(p, size, 4, 0, cond_dim)
    model = model.to("cuda" if cuda else "cpu").train()
    n = 2 if smoke else 10
    eager = _plain_step_rate(model, batch, cond_dim, tokens, size, n)
    t0 = time.perf_counter()
    fast = _plain_step_rate(torch.compile(model), batch, cond_dim, tokens, size, n)
    out = {
        "batch": batch,
        "eager_samples_per_s": round(eager, 1),
        "compiled_samples_per_s": round(fast, 1),
        "compile_and_run_s": round(time.perf_counter() - t0, 1),
    }
    print(
        f"compile: plain step eager {eager:.1f}, torch.compile {fast:.1f} samples/s "
        f"({fast / eager:.2f}x; compile and run {out['compile_and_run_s']} s)"
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true", help="tiny models and sizes, CPU allowed")
    parser.add_argument(
        "--only", choices=["peak", "encode", "train", "diagnose", "compile"], action="append"
    )
    parser.add_argument("--batch", type=int, default=64, help="encode: images per batch")
    parser.add_argument("--batches", type=int, default=20, help="encode: timed batches")
    parser.add_argument("--train-batch", type=int, help="train: default, the largest that fits")
    parser.add_argument("--train-steps", type=int, default=30)
    args = parser.parse_args()
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        raise SystemExit("no CUDA GPU here: run with --smoke to check the script only")
    parts = args.only or ["peak", "encode", "train"]
    device = torch.cuda.get_device_name(0) if cuda else platform.processor() or "cpu"
    results: dict = {
        "command": "python " + " ".join(["benchmarks/gpu.py", *sys.argv[1:]]),
        "device": device,
        "torch": torch.__version__,
    }
    print(f"device {device}, torch {torch.__version__}")
    steps = 3 if args.smoke else args.train_steps
    runs = {
        "peak": lambda: peak(args.smoke),
        "encode": lambda: encode(args.smoke, args.batch, args.batches),
        "train": lambda: train(
            args.smoke, args.train_batch, steps, results.get("peak", {}).get("matmul_tflops")
        ),
        "diagnose": lambda: diagnose(args.smoke, args.train_batch),
        "compile": lambda: compiled(args.smoke, args.train_batch),
    }
    for part in parts:  # one part's failure is reported and does not lose the others
        try:
            results[part] = runs[part]()
        except Exception as exc:  # noqa: BLE001 - a benchmark reports what broke
            import traceback

            traceback.print_exc()
            results[part] = {"error": f"{type(exc).__name__}: {exc}"}
    text = json.dumps(results, indent=2) + "\n"
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu.json").write_text(text)
    if not args.smoke:
        out_file = ROOT / "benchmarks" / "results" / "gpu.json"
        out_file.write_text(text)
        print(f"wrote {out_file}")


if __name__ == "__main__":
    main()
