"""Training benchmark: `train.diffusion` (Ray Train, 2 workers, ZeRO 2, fp32 on CPU) against
the same recipe as plain 2-process DeepSpeed launched with torchrun, without Ray: the same
model, data, precision and global batch.

    .venv/bin/python benchmarks/train.py [--steps 200]

Prints samples/s over the run (after each side's first step) and the ratio, and reports the
time to the first step separately for both. Writes benchmarks/results/train.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BACKBONE = {
    "type": "UNet2DModel",
    "block_out_channels": [32, 64],
    "layers_per_block": 2,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="difforge-bench-train-"))
    os.environ["DIFFORGE_HOME"] = str(work / "home")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import ray

    import difforge
    from difforge.operators.train.diffusion import Params
    from difforge.platform.runtime import free_port

    params = {
        "backbone": BACKBONE,
        "batch_size": args.batch_size,
        "max_steps": args.steps,
        "checkpoint_every": args.steps,
        "ema_decay": None,
        "deepspeed": {"zero_stage": 2, "precision": "fp32"},
    }
    ray.init(address="local", include_dashboard=False)
    data_spec = {
        "name": "bench-train",
        "storage": str(work / "s"),
        "tracking": {"experiment": "benchmarks"},
        "steps": [{"id": "raw", "op": "ingest.digits"}],
    }
    raw_uri = difforge.run(data_spec).step("raw").uri

    spec = {
        **data_spec,
        "steps": [
            *data_spec["steps"],
            {
                "id": "model",
                "op": "train.diffusion",
                "inputs": ["raw"],
                "params": params,
                "resources": {"num_workers": 2, "num_cpus": 1},
            },
        ],
    }
    summary = difforge.run(spec)
    from mlflow.tracking import MlflowClient

    run = MlflowClient(summary.tracking_uri).get_run(summary.step("model").run_id)
    ours_rate = run.data.metrics["samples_per_s"]
    history = MlflowClient(summary.tracking_uri).get_metric_history(run.info.run_id, "loss")
    assert history[-1].step == args.steps
    ours_total = summary.step("model").seconds
    ray.shutdown()

    # the same recipe under torchrun
    p = Params(**params).model_dump()
    ds = difforge.open_dataset(raw_uri)
    cfg = {
        "params": p,
        "shards": ds.shards(),
        "column": "image",
        "num_classes": 10,
        "threads": 1,
        "folder": str(work / "torchrun"),
    }
    cfg_path = work / "cfg.json"
    cfg_path.write_text(json.dumps(cfg))
    out = work / "torchrun.json"
    env = {**os.environ, "DIFFORGE_BENCH_OUT": str(out), "OMP_NUM_THREADS": "1"}
    t1 = time.time()
    done = subprocess.run(
        [
            str(Path(sys.executable).parent / "torchrun"),
            "--nproc_per_node",
            "2",
            "--master_port",
            str(free_port()),  # 29500 may be taken
            str(ROOT / "benchmarks" / "_train_torchrun.py"),
            str(cfg_path),
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    if done.returncode:
        sys.exit(f"torchrun failed ({done.returncode}):\n{done.stderr[-4000:]}")
    bare_total = time.time() - t1
    bare = json.loads(out.read_text())
    bare_rate = bare["samples_per_s"]
    results = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}",
        "command": f"python benchmarks/train.py --steps {args.steps} --batch-size {args.batch_size}",
        "steps": args.steps,
        "global_batch": args.batch_size,
        "difforge_samples_per_s": round(ours_rate, 1),
        "torchrun_samples_per_s": round(bare_rate, 1),
        "ratio": round(ours_rate / bare_rate, 3),
        "difforge_step_seconds_total": round(ours_total, 1),
        "torchrun_seconds_total": round(bare_total, 1),
        "whole_step_ratio": round(ours_total / bare_total, 2),
        "target_ratio": 0.9,
    }
    print(
        f"train.diffusion (Ray Train, 2 workers): {ours_rate:.1f} samples/s; torchrun "
        f"DeepSpeed: {bare_rate:.1f} samples/s; ratio {ours_rate / bare_rate:.2f} (target 0.9)"
    )
    print(
        f"whole step incl. start-up: difforge {ours_total:.1f}s, torchrun {bare_total:.1f}s "
        f"({ours_total / bare_total:.2f}x; target 1.25x)"
    )
    (ROOT / "benchmarks" / "results" / "train.json").write_text(
        json.dumps(results, indent=2) + "\n"
    )


if __name__ == "__main__":
    main()
