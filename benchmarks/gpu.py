"""GPU benchmark of `encode.vae`'s compute path, for a machine with a CUDA GPU (Ray not needed).

    python benchmarks/gpu.py                # a CUDA GPU: SD-sized VAE, 256x256, bf16
    python benchmarks/gpu.py --smoke        # anywhere: a tiny run that checks the script works

Two layers are measured, and each figure says which:

- `operator`: what an `encode.vae` actor does per batch, without Ray: `EncodeVAE.process` on an
  Arrow batch of PNG bytes (decode on the CPU, copy to the GPU, encode, latents back as a
  tensor column);
- `model`: `vae.encode(x).latent_dist.mean` alone on a batch already on the GPU (the ceiling
  the operator can approach).

The VAE has Stable Diffusion's autoencoder configuration (block_out_channels 128, 256, 512,
512; 4 latent channels), built from that config with random weights: speed does not depend on
the weights. Images are random RGB 256x256 PNGs. Target (issue 3): 1,000 images/s on one H100.
Writes benchmarks/results/gpu.json (not with --smoke).
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

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
TINY_VAE = {**SD_VAE, "block_out_channels": [32, 32], "norm_num_groups": 8,
            "down_block_types": ["DownEncoderBlock2D"] * 2,
            "up_block_types": ["UpDecoderBlock2D"] * 2}  # fmt: skip


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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true", help="tiny VAE and sizes, CPU allowed")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--batches", type=int, default=20, help="timed batches per layer")
    args = parser.parse_args()
    import pyarrow as pa
    import torch
    from diffusers import AutoencoderKL

    from difforge.operators.encode.vae import EncodeVAE, Params
    from difforge.platform.context import MapContext

    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        raise SystemExit("no CUDA GPU here: run with --smoke to check the script only")
    size, batch, batches = (32, 4, 2) if args.smoke else (256, args.batch, args.batches)
    folder = tempfile.mkdtemp(prefix="difforge-gpu-vae-")
    AutoencoderKL(**(TINY_VAE if args.smoke else SD_VAE)).save_pretrained(folder)

    op = EncodeVAE(Params(pretrained=folder))
    op.setup(MapContext(step="latents", inputs=[], work_uri=folder, num_gpus=1.0 if cuda else 0))
    pngs = png_batch(batch, size)
    table = pa.table({"id": [f"img/{i}" for i in range(batch)], "image": pa.array(pngs)})

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

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

    device = torch.cuda.get_device_name(0) if cuda else platform.processor() or "cpu"
    print(f"device {device}, dtype {op.dtype}, {size}x{size}, batch {batch}, latents {shape}, "
          f"{tuple(z.shape[1:])} from the model")  # fmt: skip
    print(f"operator (EncodeVAE.process, PNG decode included): {operator:.0f} images/s")
    print(f"model (vae.encode on a batch already on the device): {model:.0f} images/s")
    if not args.smoke:
        print(f"target 1,000 images/s on one H100: operator at {operator / 1000:.2f}x of it")
        out_file = ROOT / "benchmarks" / "results" / "gpu.json"
        out_file.write_text(json.dumps({
            "command": f"python benchmarks/gpu.py --batch {batch} --batches {batches}",
            "device": device, "dtype": str(op.dtype), "size": size, "batch": batch,
            "operator_images_per_s": round(operator), "model_images_per_s": round(model),
        }, indent=2) + "\n")  # fmt: skip
        print(f"wrote {out_file}")


if __name__ == "__main__":
    main()
