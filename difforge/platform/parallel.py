"""Parallel building blocks for job operators that must see a whole dataset at once (dedup,
pairing) but keep the driver's memory flat: per-shard maps that write shards, and grouping by
key through Ray Data's shuffle. Only small shard descriptions ever reach the driver."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from difforge.platform.datasets import ShardWriter, url_to_fs
from difforge.platform.executor import STATS
from difforge.platform.operator import MAIN

if TYPE_CHECKING:
    import pyarrow as pa
    import ray.data


def shard_rows(result: pa.Table | dict[str, pa.Table], writers: dict[str, ShardWriter], key: str):
    """Write one batch's outputs as shards; return a table describing them."""
    from difforge.platform.executor import _write_outputs

    if not isinstance(result, dict) and len(writers) == 1:
        result = {next(iter(writers)): result}
    return _write_outputs(result, writers, key, 0)


class _FileWorker:
    def __init__(self, fn: Callable, writers: dict[str, ShardWriter], batch_size: int,
                 columns: list[str] | None):  # fmt: skip
        self.fn, self.writers, self.batch_size, self.columns = fn, writers, batch_size, columns

    def __call__(self, batch: pa.Table) -> pa.Table:
        import pyarrow as pa
        import pyarrow.parquet as pq

        outs = []
        for raw in batch.column("item").to_pylist():
            item = json.loads(raw)
            fs, path = url_to_fs(item["file"])
            with fs.open(path, "rb") as f:
                pf = pq.ParquetFile(f)
                for seq, rb in enumerate(
                    pf.iter_batches(batch_size=self.batch_size, columns=self.columns)
                ):
                    result = self.fn(pa.Table.from_batches([rb]))
                    outs.append(shard_rows(result, self.writers, f"{item['index']:06d}-{seq:04d}"))
        return pa.concat_tables(outs) if outs else shard_rows({}, self.writers, "")


def map_files(
    files: list[str],
    fn: Callable[[pa.Table], pa.Table | dict[str, pa.Table]],
    writers: dict[str, ShardWriter],
    batch_size: int = 4096,
    num_cpus: float = 1.0,
    columns: list[str] | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """Apply `fn` to every batch of every file, in parallel tasks; return the shard entries."""
    rows = [{"item": json.dumps({"file": f, "index": i})} for i, f in enumerate(files)]
    entries = collect(map_files_lazy(rows, fn, writers, batch_size, num_cpus, columns), writers)
    return entries


def map_files_lazy(rows, fn, writers, batch_size, num_cpus, columns) -> ray.data.Dataset:
    import ray.data

    worker = _FileWorker(fn, writers, batch_size, columns)
    data = ray.data.from_items(rows, override_num_blocks=max(1, len(rows)))
    return data.map_batches(worker, batch_size=1, batch_format="pyarrow", num_cpus=num_cpus)


def read_files(files: list[str], fn: Callable[[pa.Table], pa.Table], batch_size: int = 4096,
               num_cpus: float = 1.0, columns: list[str] | None = None) -> ray.data.Dataset:  # fmt: skip
    """A Ray Dataset of `fn` applied to every batch of the files (rows stay in Ray)."""
    import ray.data

    def run(batch: pa.Table) -> pa.Table:
        import pyarrow as pa
        import pyarrow.parquet as pq

        out = []
        for uri in batch.column("file").to_pylist():
            fs, path = url_to_fs(uri)
            with fs.open(path, "rb") as f:
                for rb in pq.ParquetFile(f).iter_batches(batch_size=batch_size, columns=columns):
                    out.append(fn(pa.Table.from_batches([rb])))
        return pa.concat_tables(out)

    data = ray.data.from_items([{"file": f} for f in files], override_num_blocks=max(1, len(files)))
    return data.map_batches(run, batch_size=1, batch_format="pyarrow", num_cpus=num_cpus)


class _GroupWriter:
    def __init__(self, fn: Callable, writers: dict[str, ShardWriter]):
        self.fn, self.writers = fn, writers

    def __call__(self, group: pa.Table) -> pa.Table:
        import hashlib

        result = self.fn(group)
        if not isinstance(result, dict):
            result = {next(iter(self.writers)) if len(self.writers) == 1 else MAIN: result}
        tables = result
        first = next((t for t in tables.values() if t is not None and t.num_rows), None)
        if first is None:
            return shard_rows({}, self.writers, "")
        key = hashlib.sha256(str(first.column(0)[0].as_py()).encode()).hexdigest()[:20]
        return shard_rows(result, self.writers, f"g-{key}-{first.num_rows}")


def group_and_write(data: ray.data.Dataset, key: str, fn: Callable, writers: dict[str, ShardWriter],
                    num_partitions: int | None = None) -> dict[str, list[dict[str, Any]]]:  # fmt: skip
    """Group rows by `key` (a shuffle: no group passes through the driver), apply `fn` to each
    group and write what it returns as shards."""
    grouped = data.groupby(key, num_partitions=num_partitions or default_partitions())
    out = grouped.map_groups(as_function(_GroupWriter(fn, writers)), batch_format="pyarrow")
    return collect(out, writers)


def default_partitions() -> int:
    """Shuffle partitions: a few per CPU (Ray's default of 200 costs seconds on a laptop)."""
    import ray

    return max(2, min(200, 4 * int(ray.cluster_resources().get("CPU", 1))))


def as_function(obj: Callable) -> Callable:
    """A plain function around a callable object (Ray Data's map_groups wants a __name__)."""

    def run(batch):
        return obj(batch)

    run.__name__ = type(obj).__name__
    return run


def collect(data: ray.data.Dataset, writers: dict[str, ShardWriter]) -> dict[str, list[dict]]:
    entries: dict[str, list[dict]] = {name: [] for name in writers}
    for row in data.iter_rows():
        if row["output"] != STATS:
            entries[row["output"]].append(row)
    return entries
