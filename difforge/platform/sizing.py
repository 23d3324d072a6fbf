"""Shard sizing: how many rows go in one Parquet shard, and how many CPUs there are to keep
busy."""

from __future__ import annotations

import os

#: Shard sizes: neither a million small files nor one huge one. Every writer cuts what it
#: writes into shards of at most SHARD_ROWS rows and about SHARD_BYTES (Arrow's in-memory
#: size, before compression); a writer holding a whole table (a job's result) also cuts it into
#: at least SHARDS_PER_CPU shards per CPU of the cluster, none under MIN_SHARD_ROWS rows, so
#: the next step's pass has work for every core. A map pass writes a shard per batch
#: (`resources.batch_size` rows) and splits its input's shards when they are too few.
SHARD_ROWS = 65_536
SHARD_BYTES = 128 << 20
SHARDS_PER_CPU = 2
MIN_SHARD_ROWS = 256


def cluster_cpus() -> int:
    """CPUs of the Ray cluster this process belongs to (this machine's, outside Ray)."""
    import sys

    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        return max(1, int(ray.cluster_resources().get("CPU", 1)))
    return os.cpu_count() or 1


def rows_per_shard(num_rows: int, nbytes: int = 0, spread: bool = False) -> int:
    """Rows per shard for a `num_rows`-row table taking `nbytes`: as few equal shards as the
    bounds allow (`spread`: at least SHARDS_PER_CPU per CPU, of MIN_SHARD_ROWS rows at least)."""
    if num_rows <= 0:
        return 1
    shards = max(-(-num_rows // SHARD_ROWS), -(-nbytes // SHARD_BYTES), 1)
    if spread:
        shards = max(shards, min(SHARDS_PER_CPU * cluster_cpus(), num_rows // MIN_SHARD_ROWS))
    return -(-num_rows // shards)
