"""Evaluation memory against dataset size: `evaluate.fid` with classifier features on 128x128
RGB images, samples against references of the same size, at two sizes, each run by a fresh
driver process whose peak RSS is read from the kernel (Ray's workers are other processes).

    .venv/bin/python benchmarks/eval_scale.py [--small 5000] [--large 50000]

Reports the driver's peak RSS at both sizes and its growth (target: under 200 MB from 5k to
50k, since the driver reads features back a shard at a time into running statistics). The
classifier is a `SmallCNN` of width 8 saved as a `train.classifier` model folder (untrained:
what is measured is memory, not quality). The images (500 distinct smooth patterns, each
reused under many ids) are written under a temporary folder and deleted at the end. Writes
benchmarks/results/eval_scale.json.
"""

from __future__ import annotations

import argparse
import io
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


def write_images(uri: str, rows: int, seed: int, shard_rows: int = 2000) -> None:
    import numpy as np
    import pyarrow as pa
    from PIL import Image

    from difforge.platform.outputs import open_output

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:128, 0:128] / 128.0
    patterns = []
    for _ in range(500):
        f = rng.uniform(1, 6, 3)
        phase = rng.uniform(0, 6.3, 3)
        img = np.stack([np.sin(f[c] * (xx + yy * (c + 1)) + phase[c]) for c in range(3)], -1)
        buf = io.BytesIO()
        Image.fromarray(((img + 1) * 127.5).astype(np.uint8), "RGB").save(buf, "PNG")
        patterns.append(buf.getvalue())
    out = open_output(uri)
    entries = []
    for start in range(0, rows, shard_rows):
        n = min(shard_rows, rows - start)
        table = pa.table(
            {
                "id": [f"i{seed}-{i:08d}" for i in range(start, start + n)],
                "image": [patterns[i % 500] for i in range(start, start + n)],
                "label": pa.array([i % 10 for i in range(start, start + n)], pa.int64()),
            }
        )
        entries.append(out.write(table, f"{start:09d}"))
    out.commit(entries, f"eval-scale-{seed}-{rows}", {"benchmark": "eval_scale"})


def write_classifier(folder: Path, uri: str) -> None:
    import pyarrow as pa
    import torch

    from difforge.models.classifier import SmallCNN
    from difforge.platform.outputs import write_dataset

    folder.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(SmallCNN(3, 10, 8).state_dict(), folder / "model.pt")
    config = {
        "kind": "classifier",
        "architecture": "SmallCNN",
        "in_channels": 3,
        "num_classes": 10,
        "width": 8,
        "classes": None,
        "accuracy": 0.0,
    }
    (folder / "config.json").write_text(json.dumps(config))
    write_dataset(
        uri,
        pa.table({"id": ["model"], "model_uri": [str(folder)], "kind": ["classifier"]}),
        "eval-scale-classifier",
    )


def driver(samples: str, reference: str, classifier: str, storage: str) -> None:
    """In a fresh process: one evaluate.fid step; print its result and this process's peak RSS."""
    import difforge

    spec = {
        "name": "eval-scale",
        "storage": storage,
        "steps": [
            {
                "id": "quality",
                "op": "evaluate.fid",
                "inputs": [samples, reference, classifier],
                "params": {"max_images": 10**9, "kid_subset_size": 500},
            }
        ],
    }
    t0 = time.time()
    summary = difforge.run(spec)
    row = difforge.open_dataset(summary.step("quality").uri).to_arrow().to_pylist()[0]
    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        json.dumps(
            {
                "fid": row["fid"],
                "num_samples": row["num_samples"],
                "seconds": time.time() - t0,
                "driver_peak_rss_mib": rss_mib,
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--small", type=int, default=5000)
    parser.add_argument("--large", type=int, default=50_000)
    parser.add_argument("--driver", nargs=4)
    args = parser.parse_args()
    if args.driver:
        driver(*args.driver)
        return
    work = Path(tempfile.mkdtemp(prefix="difforge-bench-eval-"))
    env = {**os.environ, "DIFFORGE_HOME": str(work / "home")}
    results = {}
    try:
        clf = str(work / "clf-ds")
        write_classifier(work / "clf", clf)
        for n in (args.small, args.large):
            samples, reference = str(work / f"samples-{n}"), str(work / f"reference-{n}")
            write_images(samples, n, seed=1)
            write_images(reference, n, seed=2)
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--driver",
                    samples,
                    reference,
                    clf,
                    str(work / f"storage-{n}"),
                ],
                capture_output=True,
                text=True,
                env=env,
            )
            if out.returncode != 0:
                raise SystemExit(f"the driver at {n} rows failed:\n{out.stderr[-3000:]}")
            results[n] = json.loads(out.stdout.strip().splitlines()[-1])
            print(n, results[n], flush=True)
            shutil.rmtree(samples)
            shutil.rmtree(reference)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    small, large = results[args.small], results[args.large]
    growth = large["driver_peak_rss_mib"] - small["driver_peak_rss_mib"]
    report = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}",
        "command": f"python benchmarks/eval_scale.py --small {args.small} --large {args.large}",
        "image": "128x128 RGB PNG",
        "features": "classifier (SmallCNN, width 8)",
        "small": {"rows": args.small, **small},
        "large": {"rows": args.large, **large},
        "driver_rss_growth_mib": round(growth, 1),
        "target_growth_mib": 200,
    }
    out_path = ROOT / "benchmarks" / "results" / "eval_scale.json"
    out_path.write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"driver peak RSS: {small['driver_peak_rss_mib']:.0f} MiB at {args.small:,} rows, "
        f"{large['driver_peak_rss_mib']:.0f} MiB at {args.large:,} rows: +{growth:.0f} MiB "
        "(target < 200)"
    )


if __name__ == "__main__":
    main()
