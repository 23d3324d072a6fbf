"""The fixed cost of a Ray Train fit: what one training step pays before its loop runs.

    .venv/bin/python benchmarks/raytrain_overhead.py [--repeats 3]

In one run, on one local Ray (2 CPUs, difforge's Ray Train settings): a one-worker
`TorchTrainer.fit()` whose loop only imports torch and DeepSpeed (what every training loop
imports first), against a plain Ray task importing the same in a fresh worker process. Both are
timed end to end, `repeats` times each, alternating; prints the medians and the difference, the
fixed cost of Ray Train's controller and worker group. Writes benchmarks/results/raytrain.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def imports(_config=None) -> None:
    import deepspeed  # noqa: F401
    import torch  # noqa: F401


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from difforge.platform.raytrain import _tune_ray_train

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    _tune_ray_train()
    storage = tempfile.mkdtemp(prefix="raytrain-overhead-")
    # a fresh worker process for each task, as an actor of a training step gets
    task = ray.remote(num_cpus=1, max_calls=1)(imports)
    fits, tasks = [], []
    for i in range(args.repeats):
        t0 = time.perf_counter()
        TorchTrainer(
            imports,
            scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
            run_config=ray.train.RunConfig(storage_path=storage, name=f"overhead-{i}"),
        ).fit()
        fits.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        ray.get(task.remote())
        tasks.append(time.perf_counter() - t0)
        print(f"repeat {i}: Ray Train fit {fits[-1]:.1f} s, plain task {tasks[-1]:.1f} s")
    fit, plain = statistics.median(fits), statistics.median(tasks)
    print(
        f"median: Ray Train fit {fit:.1f} s, plain task {plain:.1f} s, "
        f"difference {fit - plain:.1f} s per training step ({fit / plain:.1f}x)"
    )
    out = ROOT / "benchmarks" / "results" / "raytrain.json"
    out.write_text(
        json.dumps(
            {
                "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
                "repeats": args.repeats,
                "fit_s": [round(x, 2) for x in fits],
                "task_s": [round(x, 2) for x in tasks],
                "median_fit_s": round(fit, 2),
                "median_task_s": round(plain, 2),
                "difference_s": round(fit - plain, 2),
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
