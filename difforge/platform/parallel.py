"""Parallel building blocks for job operators that must see a whole dataset at once (dedup,
pairing) but keep the driver's memory flat: per-shard maps that write shards, and grouping by
key through Ray Data's shuffle. Only small shard descriptions ever reach the driver."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from difforge.platform.datasets import read_shard
from difforge.platform.outputs import MAIN, Output, collect, write_batch

if TYPE_CHECKING:
    import pyarrow as pa
    import ray.data


Shard = str | dict[str, Any]  # a URI, or a dataset's shard with its size and checksum


def _shard(shard: Shard) -> dict[str, Any]:
    return {"file": shard} if isinstance(shard, str) else shard


def open_parquet(shard: Shard, **kwargs):
    """A Parquet shard for reading, checked against its manifest's size and checksum."""
    import pyarrow.parquet as pq

    s = _shard(shard)
    return pq.ParquetFile(read_shard(s["file"], s.get("bytes"), s.get("sha256", "")), **kwargs)


def shard_rows(result: pa.Table | dict[str, pa.Table], outputs: dict[str, Output], key: str):
    """Write one batch's outputs as shards; return a table describing them."""
    if not isinstance(result, dict) and len(outputs) == 1:
        result = {next(iter(outputs)): result}
    return write_batch(result, outputs, key, 0)


class _FileWorker:
    def __init__(self, fn: Callable, outputs: dict[str, Output], batch_size: int,
                 columns: list[str] | None):  # fmt: skip
        self.fn, self.outputs, self.batch_size, self.columns = fn, outputs, batch_size, columns

    def __call__(self, batch: pa.Table) -> pa.Table:
        import pyarrow as pa

        outs = []
        for raw in batch.column("item").to_pylist():
            item = json.loads(raw)
            pf = open_parquet(item["shard"])
            for seq, rb in enumerate(
                pf.iter_batches(batch_size=self.batch_size, columns=self.columns)
            ):
                result = self.fn(pa.Table.from_batches([rb]))
                outs.append(shard_rows(result, self.outputs, f"{item['index']:06d}-{seq:04d}"))
        return pa.concat_tables(outs) if outs else shard_rows({}, self.outputs, "")


def map_files(
    files: list[Shard],
    fn: Callable[[pa.Table], pa.Table | dict[str, pa.Table]],
    outputs: dict[str, Output],
    batch_size: int = 4096,
    num_cpus: float = 1.0,
    columns: list[str] | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """Apply `fn` to every batch of every file, in parallel tasks; return the shard entries."""
    rows = [{"item": json.dumps({"shard": _shard(f), "index": i})} for i, f in enumerate(files)]
    data = map_files_lazy(rows, fn, outputs, batch_size, num_cpus, columns)
    return collect(data.iter_rows(), outputs)


def map_files_lazy(rows, fn, outputs, batch_size, num_cpus, columns) -> ray.data.Dataset:
    import ray.data

    worker = _FileWorker(fn, outputs, batch_size, columns)
    data = ray.data.from_items(rows, override_num_blocks=max(1, len(rows)))
    return data.map_batches(worker, batch_size=1, batch_format="pyarrow", num_cpus=num_cpus)


def read_files(files: list[Shard], fn: Callable[[pa.Table], pa.Table], batch_size: int = 4096,
               num_cpus: float = 1.0, columns: list[str] | None = None) -> ray.data.Dataset:  # fmt: skip
    """A Ray Dataset of `fn` applied to every batch of the files (rows stay in Ray)."""
    import ray.data

    def run(batch: pa.Table) -> pa.Table:
        import pyarrow as pa

        out = []
        for raw in batch.column("shard").to_pylist():
            pf = open_parquet(json.loads(raw))
            for rb in pf.iter_batches(batch_size=batch_size, columns=columns):
                out.append(fn(pa.Table.from_batches([rb])))
        return pa.concat_tables(out)

    items = [{"shard": json.dumps(_shard(f))} for f in files]
    data = ray.data.from_items(items, override_num_blocks=max(1, len(files)))
    return data.map_batches(run, batch_size=1, batch_format="pyarrow", num_cpus=num_cpus)


class _GroupWriter:
    def __init__(self, fn: Callable, outputs: dict[str, Output]):
        self.fn, self.outputs = fn, outputs

    def __call__(self, group: pa.Table) -> pa.Table:
        import hashlib

        result = self.fn(group)
        if not isinstance(result, dict):
            result = {next(iter(self.outputs)) if len(self.outputs) == 1 else MAIN: result}
        tables = result
        first = next((t for t in tables.values() if t is not None and t.num_rows), None)
        if first is None:
            return shard_rows({}, self.outputs, "")
        key = hashlib.sha256(str(first.column(0)[0].as_py()).encode()).hexdigest()[:20]
        return shard_rows(result, self.outputs, f"g-{key}-{first.num_rows}")


def group_and_write(data: ray.data.Dataset, key: str, fn: Callable, outputs: dict[str, Output],
                    num_partitions: int | None = None) -> dict[str, list[dict[str, Any]]]:  # fmt: skip
    """Group rows by `key` (a shuffle: no group passes through the driver), apply `fn` to each
    group and write what it returns as shards."""
    grouped = data.groupby(key, num_partitions=num_partitions or default_partitions())
    out = grouped.map_groups(as_function(_GroupWriter(fn, outputs)), batch_format="pyarrow")
    return collect(out.iter_rows(), outputs)


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
