"""The baseline of benchmarks/train.py: the same recipe as plain multi-process DeepSpeed,
launched by torchrun, without Ray. Usage: torchrun --nproc_per_node N _train_torchrun.py CONFIG"""

from __future__ import annotations

import json
import os
import sys

import torch.distributed as dist

from difforge.diffusion.training import FolderIO
from difforge.operators.train.diffusion import train
from difforge.platform.events import NullLog


def main() -> None:
    with open(sys.argv[1]) as f:
        config = json.load(f)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    io = FolderIO(config.pop("folder"), rank)
    train({**config, "log": NullLog()}, rank, world, io)
    if rank == 0:
        with open(os.environ["DIFFORGE_BENCH_OUT"], "w") as f:
            json.dump(io.history[-1], f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
