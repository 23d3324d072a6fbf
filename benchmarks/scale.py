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

    .venv/bin/python benchmarks/scale.py --huge 2000000 [--folder /big/disk] [--steps 500]

Larger than the machine: ROWS rows (2M: about 33 GB, more than this machine's 24 GiB of RAM)
written directly as a committed dataset under FOLDER (default: .difforge-bench/huge), then
(1) one full epoch of the training loader alone (`ShardStream`, a fresh process: rows/s and its
peak RSS) and (2) a `train.diffusion` step of STEPS steps through the real path (`difforge.run`,
Ray Train, one worker), with Ray's spill folder pinned under FOLDER; the machine's memory in use
is sampled through the whole run and its peak reported. The data is deleted afterwards.
Writes benchmarks/results/scale_huge.json.
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
UNET = {
    "type": "UNet2DModel",
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "down_block_types": ["DownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "UpBlock2D"],
    "norm_num_groups": 8,
}


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
        table = pa.table(
            {
                "id": [f"z{i:08d}" for i in range(start, start + n)],
                "latent": to_column(rng.standard_normal((n, *SHAPE), dtype=np.float32)),
                "label": pa.array(rng.integers(0, 10, n), pa.int64()),
            }
        )
        entries.append(out.write(table, f"{start:09d}"))
    out.commit(
        entries,
        f"scale-{rows}",
        {"benchmark": "scale"},
        metadata={"classes": [str(i) for i in range(10)]},
    )


def worker(uri: str, steps: int, shuffle_mb: int, folder: str) -> None:
    """In a fresh process: train, then print samples/s and this process's peak RSS."""
    from difforge.diffusion.training import train_locally
    from difforge.operators.train.diffusion import Params, train
    from difforge.platform.datasets import open_dataset

    p = Params(
        backbone=UNET,
        batch_size=64,
        max_steps=steps,
        checkpoint_every=steps,
        warmup_steps=5,
        ema_decay=None,
        shuffle_mb=shuffle_mb,
    ).model_dump()
    data = open_dataset(uri)
    io = train_locally(
        {
            "params": p,
            "shards": data.shards(),
            "column": "latent",
            "num_classes": 10,
            "threads": os.cpu_count(),
        },
        folder,
        train,
    )
    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"samples_per_s": io.history[-1]["samples_per_s"], "peak_rss_mib": rss_mib}))


def run_worker(uri: str, steps: int, shuffle_mb: int, work: Path) -> dict:
    folder = tempfile.mkdtemp(dir=work)
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            "--worker",
            uri,
            "--steps",
            str(steps),
            "--shuffle-mb",
            str(shuffle_mb),
            "--folder",
            folder,
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "DS_ACCELERATOR": "cpu"},
    )
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    shutil.rmtree(folder, ignore_errors=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def loader_epoch(uri: str, batch: int) -> None:
    """In a fresh process: read one full epoch through the training loader; print rows/s and
    this process's peak RSS."""
    from difforge.diffusion.data import ShardStream
    from difforge.platform.datasets import open_dataset

    stream = ShardStream(open_dataset(uri).shards(), "latent", 0, batch)
    t0 = time.perf_counter()
    seen = 0
    for i in range(len(stream) // batch):
        seen += len(stream.batch(i).x0)
    seconds = time.perf_counter() - t0
    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        json.dumps(
            {
                "rows": seen,
                "seconds": round(seconds, 1),
                "rows_per_s": round(seen / seconds),
                "peak_rss_mib": round(rss_mib),
            }
        )
    )


class MemorySampler:
    """The machine's memory in use (total - available, so page cache is not counted), sampled
    every half second in a thread; `peak` above the level when it started."""

    def __init__(self):
        import threading

        import psutil

        self._vm = psutil.virtual_memory
        self.base = self.peak = self._used()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _used(self) -> int:
        vm = self._vm()
        return vm.total - vm.available

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            self.peak = max(self.peak, self._used())

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        return {
            "base_used_mib": self.base >> 20,
            "peak_used_mib": self.peak >> 20,
            "peak_above_base_mib": (self.peak - self.base) >> 20,
        }


def huge(rows: int, folder: Path, steps: int) -> None:
    import ray

    import difforge

    folder.mkdir(parents=True, exist_ok=True)
    uri, spill = str(folder / "latents"), folder / "ray-spill"
    os.environ["DIFFORGE_HOME"] = str(folder / "home")
    results: dict = {
        "command": f"python benchmarks/scale.py --huge {rows} --steps {steps}",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.1f} GiB RAM",
        "rows": rows,
        "latent_shape": list(SHAPE),
    }
    memory = MemorySampler()
    try:
        t0 = time.perf_counter()
        write_latents(uri, rows)
        size = sum(f.stat().st_size for f in Path(uri).rglob("*.parquet"))
        results["written"] = {
            "seconds": round(time.perf_counter() - t0),
            "gb": round(size / 1e9, 1),
        }
        print(
            f"written: {rows:,} rows, {size / 1e9:.1f} GB in {results['written']['seconds']} s",
            flush=True,
        )
        out = subprocess.run(
            [sys.executable, __file__, "--loader", uri],
            capture_output=True,
            text=True,
            env={**os.environ, "DS_ACCELERATOR": "cpu"},
        )
        if out.returncode != 0:
            raise RuntimeError(out.stderr[-3000:])
        results["loader_epoch"] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"loader, one epoch: {results['loader_epoch']}", flush=True)

        spilling = {"type": "filesystem", "params": {"directory_path": str(spill)}}
        ray.init(
            address="local",
            include_dashboard=False,
            _system_config={"object_spilling_config": json.dumps(spilling)},
        )
        spec = {
            "name": "scale-huge",
            "storage": str(folder / "storage"),
            "tracking": {"experiment": "benchmarks"},
            "steps": [
                {
                    "id": "model",
                    "op": "train.diffusion",
                    "inputs": [uri],
                    "params": {
                        "backbone": UNET,
                        "batch_size": 32,
                        "max_steps": steps,
                        "checkpoint_every": steps,
                        "warmup_steps": 5,
                        "ema_decay": None,
                    },
                    "resources": {"num_workers": 1},
                }
            ],
        }
        t0 = time.perf_counter()
        summary = difforge.run(spec)
        from mlflow.tracking import MlflowClient

        run = MlflowClient(summary.tracking_uri).get_run(summary.step("model").run_id)
        spilled = sum(f.stat().st_size for f in spill.rglob("*") if f.is_file())
        results["train"] = {
            "steps": steps,
            "batch_size": 32,
            "seconds": round(time.perf_counter() - t0),
            "samples_per_s": round(run.data.metrics["samples_per_s"], 1),
            "ray_spilled_mb": round(spilled / 1e6, 1),
        }
        print(f"train.diffusion: {results['train']}", flush=True)
        ray.shutdown()
    finally:
        results["memory"] = memory.stop()
        shutil.rmtree(folder, ignore_errors=True)
    print(f"machine memory in use: {results['memory']}")
    out_file = ROOT / "benchmarks" / "results" / "scale_huge.json"
    out_file.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out_file}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--small", type=int, default=20_000)
    parser.add_argument("--large", type=int, default=400_000)
    parser.add_argument("--steps", type=int, help="default: 60, or 500 with --huge")
    parser.add_argument("--worker")
    parser.add_argument("--shuffle-mb", type=int, default=256)
    parser.add_argument("--folder")
    parser.add_argument("--huge", type=int, help="rows of the larger-than-memory run")
    parser.add_argument("--loader")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.steps, args.shuffle_mb, args.folder)
        return
    if args.loader:
        loader_epoch(args.loader, 256)
        return
    if args.huge:
        huge(args.huge, Path(args.folder or ROOT / ".difforge-bench" / "huge"), args.steps or 500)
        return
    args.steps = args.steps or 60

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
        print(
            f"samples/s, stream over whole-in-memory at {args.small} rows: {speed:.2f}x "
            "(target >= 0.95x)"
        )
        results.update(
            runs=runs,
            rss_ratio_large_over_small=round(rss, 3),
            speed_ratio_stream_over_memory=round(speed, 3),
        )
        out = ROOT / "benchmarks" / "results" / "scale.json"
        out.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {out}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
