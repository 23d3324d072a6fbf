"""Sampling on two Ray nodes: images/s of one `sample.diffusion` step with 1 and 2 actors on a
two-node local cluster (two raylets of 1 CPU each, started with `ray.cluster_utils.Cluster`)
against one node of 2 CPUs.

    .venv/bin/python benchmarks/two_node.py [--images 2000] [--steps 25]

Both nodes share this machine's two cores, so no scaling is expected here: the figures show
that the step spreads its actors over the nodes (the nodes its manifest records) and what the
second node costs. The model is a small class-conditional UNet trained for 30 steps on the
8x8 digits (what is measured is sampling speed, not quality); each configuration samples with
its own plan seed, so the sampling step runs every time and the training step is cached.
Writes benchmarks/results/two_node.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

UNET = {
    "type": "UNet2DModel",
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
}


def spec(storage: str, images: int, steps: int, actors: int, seed: int) -> dict:
    return {
        "name": "two-node-bench",
        "storage": storage,
        "tracking": {"experiment": "benchmarks"},
        "steps": [
            {"id": "raw", "op": "ingest.digits"},
            {
                "id": "model",
                "op": "train.diffusion",
                "inputs": ["raw"],
                "params": {
                    "backbone": UNET,
                    "batch_size": 64,
                    "max_steps": 30,
                    "checkpoint_every": 30,
                    "ema_decay": None,
                },
                "resources": {"num_workers": 1, "num_cpus": 1},
            },
            {
                "id": "plan",
                "op": "sample.plan",
                "inputs": ["model"],
                "params": {"num_images": images, "guidance_scales": [2.0], "seed": seed},
            },
            {
                "id": "samples",
                "op": "sample.diffusion",
                "inputs": ["plan"],
                "params": {"scheduler": "ddim", "num_inference_steps": steps},
                "resources": {"max_actors": actors, "num_cpus": 1, "batch_size": 125},
            },
        ],
    }


def sample_once(storage: str, images: int, steps: int, actors: int, seed: int) -> dict:
    import difforge

    summary = difforge.run(spec(storage, images, steps, actors, seed))
    step = summary.step("samples")
    manifest = difforge.open_dataset(step.uri).manifest
    return {
        "images": step.rows_out,
        "seconds": round(step.seconds, 2),
        "images_per_s": round(step.rows_out / step.seconds, 1),
        "nodes": len(manifest.producer.get("nodes", [])),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=25)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="difforge-bench-two-node-"))
    os.environ["DIFFORGE_HOME"] = str(work / "home")
    storage = str(work / "s")
    import ray
    from ray.cluster_utils import Cluster

    results: dict = {
        "command": f"python benchmarks/two_node.py --images {args.images} --steps {args.steps}",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "images": args.images,
        "ddim_steps": args.steps,
        "runs": {},
    }
    topologies = {  # name: what the printout calls it
        "two_nodes": "two nodes (1 CPU each)",
        "one_node": "one node (2 CPUs)",
    }
    seed = 0
    for name, what in topologies.items():
        cluster = None
        if name == "two_nodes":
            cluster = Cluster(
                initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False}
            )
            cluster.add_node(num_cpus=1)
            cluster.wait_for_nodes()
            ray.init(address=cluster.address)
        else:
            ray.init(address="local", num_cpus=2, include_dashboard=False)
        try:
            for actors in (1, 2):
                seed += 1
                r = sample_once(storage, args.images, args.steps, actors, seed)
                results["runs"][f"{name}_{actors}_actors"] = r
                print(f"{what}, {actors} actor(s): {r}", flush=True)
        finally:
            ray.shutdown()
            if cluster is not None:
                cluster.shutdown()
    runs = results["runs"]
    ratio = runs["two_nodes_2_actors"]["images_per_s"] / runs["one_node_2_actors"]["images_per_s"]
    results["two_nodes_over_one_node_2_actors"] = round(ratio, 3)
    print(f"2 actors: two nodes / one node = {ratio:.2f}x")
    out = ROOT / "benchmarks" / "results" / "two_node.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
