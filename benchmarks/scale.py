"""Training memory against dataset size: `train.diffusion`'s recipe (one worker, DeepSpeed's
single-rank set-up, no Ray) on latent datasets of 4x32x32 float32 of two sizes, each run in a
fresh process whose peak RSS is read from the kernel.

    .venv/bin/python benchmarks/scale.py [--small 20000] [--large 400000] [--steps 60]

Reports, side by side in one run:
- peak RSS of a training process at the large size over that at the small size (target
  <= 1.2x: the stream holds a few windows, not the dataset);
- samples/s of the stream (default `shuffle_mb`) over samples/s with the whole small dataset in
  one window, i.e. held in memory as the loader before the stream did (target >= 0.95x).

Writes benchmarks/results/scale.json. The datasets (about 16 KB a row) are written under a
temporary folder and deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SHAPE = (4, 32, 32)
UNET = {"type": "UNet2DModel", "block_out_channels": [32, 64], "layers_per_block": 1,
        "down_block_types": ["DownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "UpBlock2D"], "norm_num_groups": 8}  # fmt: skip


def write_latents(uri: str, rows: int, shard_rows: int = 5000) -> None:
    """A committed dataset of random latents with labels, `shard_rows` a shard."""
    import numpy as np
    import pyarrow as pa

    from difforge.platform.outputs import open_output
    from difforge.platform.tensors import to_column

    out = open_output(uri)
    rng = np.random.default_rng(0)
    entries = []
    for start in range(0, rows, shard_rows):
        n = min(shard_rows, rows - start)
        table = pa.table({
            "id": [f"z{i:08d}" for i in range(start, start + n)],
            "latent": to_column(rng.standard_normal((n, *SHAPE), dtype=np.float32)),
            "label": pa.array(rng.integers(0, 10, n), pa.int64()),
        })  # fmt: skip
        entries.append(out.write(table, f"{start:09d}"))
    out.commit(entries, f"scale-{rows}", {"benchmark": "scale"},
               metadata={"classes": [str(i) for i in range(10)]})  # fmt: skip


def worker(uri: str, steps: int, shuffle_mb: int, folder: str) -> None:
    """In a fresh process: train, then print samples/s and this process's peak RSS."""
    from difforge.diffusion.training import train_locally
    from difforge.operators.train.diffusion import Params, train
    from difforge.platform.datasets import open_dataset

    p = Params(backbone=UNET, batch_size=64, max_steps=steps, checkpoint_every=steps,
               warmup_steps=5, ema_decay=None, shuffle_mb=shuffle_mb).model_dump()  # fmt: skip
    data = open_dataset(uri)
    io = train_locally({"params": p, "shards": data.shards(), "column": "latent",
                        "num_classes": 10, "threads": os.cpu_count()}, folder, train)  # fmt: skip
    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"samples_per_s": io.history[-1]["samples_per_s"], "peak_rss_mib": rss_mib}))


def run_worker(uri: str, steps: int, shuffle_mb: int, work: Path) -> dict:
    folder = tempfile.mkdtemp(dir=work)
    out = subprocess.run(
        [sys.executable, __file__, "--worker", uri, "--steps", str(steps),
         "--shuffle-mb", str(shuffle_mb), "--folder", folder],
        capture_output=True, text=True, env={**os.environ, "DS_ACCELERATOR": "cpu"},
    )  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    shutil.rmtree(folder, ignore_errors=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--small", type=int, default=20_000)
    parser.add_argument("--large", type=int, default=400_000)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--worker")
    parser.add_argument("--shuffle-mb", type=int, default=256)
    parser.add_argument("--folder")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.steps, args.shuffle_mb, args.folder)
        return

    from difforge.diffusion.data import DEFAULT_SHUFFLE_MB

    work = Path(tempfile.mkdtemp(prefix="difforge-scale-"))
    try:
        results: dict = {
            "command": f"python benchmarks/scale.py --small {args.small} --large {args.large} "
            f"--steps {args.steps}",
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
            "latent_shape": list(SHAPE),
        }
        sizes = {"small": args.small, "large": args.large}
        for name, rows in sizes.items():
            t0 = time.perf_counter()
            write_latents(str(work / name), rows)
            print(f"{name}: {rows} rows written in {time.perf_counter() - t0:.0f}s")
        whole_mb = args.small * 4 * 32 * 32 * 4 // 2**20 + 64  # the small set in one window
        runs = {
            "small_stream": run_worker(str(work / "small"), args.steps, DEFAULT_SHUFFLE_MB, work),
            "large_stream": run_worker(str(work / "large"), args.steps, DEFAULT_SHUFFLE_MB, work),
            "small_whole_in_memory": run_worker(str(work / "small"), args.steps, whole_mb, work),
        }
        for name, r in runs.items():
            print(
                f"{name:24s} {r['samples_per_s']:8.1f} samples/s  peak RSS {r['peak_rss_mib']:7.0f} MiB"
            )
        rss = runs["large_stream"]["peak_rss_mib"] / runs["small_stream"]["peak_rss_mib"]
        speed = (
            runs["small_stream"]["samples_per_s"] / runs["small_whole_in_memory"]["samples_per_s"]
        )
        print(f"peak RSS, {args.large} rows over {args.small}: {rss:.2f}x (target <= 1.2x)")
        print(f"samples/s, stream over whole-in-memory at {args.small} rows: {speed:.2f}x "
              "(target >= 0.95x)")  # fmt: skip
        results.update(runs=runs, rss_ratio_large_over_small=round(rss, 3),
                       speed_ratio_stream_over_memory=round(speed, 3))  # fmt: skip
        out = ROOT / "benchmarks" / "results" / "scale.json"
        out.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {out}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
