"""Parallel building blocks for job operators that must see a whole dataset at once (dedup,
pairing) but keep the driver's memory flat: per-shard maps that write shards (plain Ray tasks;
an actor pool on GPUs), and grouping by key (plain Ray tasks for data a few tasks can hold,
Ray Data's shuffle beyond). Only small shard descriptions ever reach the driver."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from functools import partial
from typing import TYPE_CHECKING, Any

from difforge.platform.datasets import read_shard
from difforge.platform.outputs import MAIN, Output
from difforge.platform.sizing import cluster_cpus
from difforge.platform.written import collect, write_batch

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
    def __init__(
        self, fn: Callable, outputs: dict[str, Output], batch_size: int, columns: list[str] | None
    ):
        if isinstance(fn, tuple):  # (class, args): built here, once per actor
            fn = fn[0](*fn[1])
        self.fn, self.outputs, self.batch_size, self.columns = fn, outputs, batch_size, columns

    def __call__(self, batch: pa.Table) -> pa.Table:
        import pyarrow as pa

        return pa.concat_tables(
            [self.one(json.loads(raw)) for raw in batch.column("item").to_pylist()]
        )

    def one(self, item: dict[str, Any]) -> pa.Table:
        """One shard's batches through `fn`, their outputs written: the entries' table."""
        import pyarrow as pa

        outs = []
        batches = shard_batches(item["shard"], self.batch_size, self.columns)
        for seq, table in enumerate(batches):
            result = self.fn(table)
            outs.append(shard_rows(result, self.outputs, f"{item['index']:06d}-{seq:04d}"))
        return pa.concat_tables(outs) if outs else shard_rows({}, self.outputs, "")


_BUILT: dict[tuple, Any] = {}


class _BuildOnce:
    """`cls(*args)`, built once per worker process and reused by the tasks that run there."""

    def __init__(self, cls: type, args: tuple):
        import pickle

        self.cls, self.args = cls, args
        self.key = (cls.__module__, cls.__qualname__, pickle.dumps(args))

    def __call__(self, table: pa.Table):
        built = _BUILT.get(self.key)
        if built is None:
            _BUILT.clear()  # one model per process at a time
            built = _BUILT[self.key] = self.cls(*self.args)
        return built(table)


def shard_batches(
    shard: Shard, batch_size: int, columns: list[str] | None = None
) -> Iterator[pa.Table]:
    """A shard's rows in batches, checked against its manifest: the `columns` it has; only its
    rows `start` to `stop`, or the (sorted) rows it `take`s, when the shard names them."""
    import numpy as np
    import pyarrow as pa

    s = _shard(shard)
    pf = open_parquet(s)
    if columns is not None:
        columns = [c for c in columns if c in pf.schema_arrow.names]
    take = np.asarray(s["take"], np.int64) if s.get("take") is not None else None
    lo, hi = s.get("start", 0), s.get("stop")
    offset = 0
    for rb in pf.iter_batches(batch_size=batch_size, columns=columns):
        n, table = rb.num_rows, pa.Table.from_batches([rb])
        if take is not None:
            local = take[(take >= offset) & (take < offset + n)] - offset
            table = table.take(pa.array(local)) if len(local) else None
        else:
            first, end = max(lo - offset, 0), n if hi is None else min(hi - offset, n)
            table = table.slice(first, end - first) if end > first else None
        offset += n
        if table is not None:
            yield table
        if hi is not None and offset >= hi:
            return


def map_files(
    files: list[Shard],
    fn: Callable[[pa.Table], pa.Table | dict[str, pa.Table]] | tuple[type, tuple],
    outputs: dict[str, Output],
    batch_size: int = 4096,
    num_cpus: float = 1.0,
    columns: list[str] | None = None,
    num_gpus: float = 0.0,
) -> dict[str, list[dict[str, Any]]]:
    """Apply `fn` to every batch of every file (a shard may list the rows it `take`s), in
    parallel tasks. `fn` may be `(class, args)` (a model): built once per worker process on
    CPUs; with `num_gpus`, in an actor pool of one GPU per actor. Returns the entries.

    On CPUs each file is a plain Ray task (the shards it writes are its result's rows): no
    Ray Data pipeline to plan and start, whose fixed cost is about a second a call."""
    if num_gpus:
        return _on_gpus(files, fn, outputs, batch_size, num_cpus, columns, num_gpus)
    if isinstance(fn, tuple):  # built once per worker process, reused by its later tasks
        fn = _BuildOnce(*fn)
    worker = _FileWorker(fn, outputs, batch_size, columns)
    items = [{"shard": _shard(f), "index": i} for i, f in enumerate(files)]
    done = run_tasks(worker.one, items, num_cpus)
    return collect((row for t in done for row in t.to_pylist()), outputs)


def _on_gpus(files, fn, outputs, batch_size, num_cpus, columns, num_gpus):
    """map_files on GPUs: an actor pool of one model per GPU, fed by Ray Data."""
    import ray
    import ray.data

    rows = [{"item": json.dumps({"shard": _shard(f), "index": i})} for i, f in enumerate(files)]
    data = ray.data.from_items(rows, override_num_blocks=max(1, len(rows)))
    if not isinstance(fn, tuple):
        fn = (_Same, (fn,))
    size = max(1, min(len(rows), int(ray.cluster_resources().get("GPU", 0))))
    out = data.map_batches(
        _FileWorker,
        fn_constructor_args=(fn, outputs, batch_size, columns),
        batch_size=1,
        batch_format="pyarrow",
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        compute=ray.data.ActorPoolStrategy(min_size=size, max_size=size),
    )
    return collect(out.iter_rows(), outputs)


class _Same:
    """A plain function as a (class, args) pair an actor builds."""

    def __init__(self, fn: Callable):
        self.fn = fn

    def __call__(self, table: pa.Table):
        return self.fn(table)


def read_files(
    files: list[Shard],
    fn: Callable[[pa.Table], pa.Table],
    batch_size: int = 4096,
    num_cpus: float = 1.0,
    columns: list[str] | None = None,
) -> ray.data.Dataset:
    """A Ray Dataset of `fn` applied to every batch of the files (rows stay in Ray)."""
    import pyarrow as pa
    import ray.data

    def run(batch: pa.Table) -> pa.Table:
        return pa.concat_tables(
            [
                apply_to_shard(json.loads(raw), fn, batch_size, columns)
                for raw in batch.column("shard").to_pylist()
            ]
        )

    items = [{"shard": json.dumps(_shard(f))} for f in files]
    data = ray.data.from_items(items, override_num_blocks=max(1, len(files)))
    return data.map_batches(run, batch_size=1, batch_format="pyarrow", num_cpus=num_cpus)


def apply_to_shard(
    shard: Shard,
    fn: Callable[[pa.Table], pa.Table],
    batch_size: int = 4096,
    columns: list[str] | None = None,
) -> pa.Table:
    """`fn` applied to every batch of one shard, the results concatenated."""
    import pyarrow as pa

    pf = open_parquet(shard)
    out = [
        fn(pa.Table.from_batches([rb]))
        for rb in pf.iter_batches(batch_size=batch_size, columns=columns)
    ]
    if not out:  # a shard of no rows
        empty = pf.schema_arrow.empty_table()
        out = [fn(empty.select(columns) if columns else empty)]
    return pa.concat_tables(out)


def _call(fn: Callable, *args):
    return fn(*args)


def run_tasks(fn: Callable, items: list, num_cpus: float = 1.0) -> list:
    """`fn(item)` for each item as a plain Ray task (in Ray's reused worker processes; `fn` is
    sent once): their results, in order."""
    import ray

    shared = ray.put(fn)
    remote = ray.remote(_call).options(num_cpus=num_cpus)
    return ray.get([remote.remote(shared, item) for item in items])


def as_finished(
    fn: Callable, items: list, num_cpus: float = 1.0, num_gpus: float = 0.0
) -> Iterator:
    """`fn(item)` for each item as a plain Ray task: their results as the tasks finish. When
    the caller stops early (a failure), the rest is cancelled by force: an unforced cancel
    raises inside a running task, which can interrupt an import and leave the worker process,
    which Ray reuses, with a half-imported module (seen: pandas without `core`)."""
    import ray

    shared = ray.put(fn)
    remote = ray.remote(_call).options(num_cpus=num_cpus, num_gpus=num_gpus)
    pending = [remote.remote(shared, item) for item in items]
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            yield ray.get(done[0])
    finally:
        for ref in pending:
            ray.cancel(ref, force=True)


def group_in_tasks(
    items: list,
    keys: Callable[[Any], pa.Table],
    group: Callable[[int, list[pa.Table]], Any],
    parts: int = 1,
    num_cpus: float = 1.0,
) -> list:
    """A shuffle in plain Ray tasks, for data a few tasks can hold: `keys(item)` for each item
    (a table with a `key` column, split into `parts` by key), then `group(part, tables)` once
    per part, given every keys table's rows of that part (rows sharing a key meet in one
    part). The tables go from task to task through the object store, never through the
    driver. Returns `group`'s results, one per part."""
    import ray

    split = ray.remote(_split_by_key).options(num_cpus=num_cpus, num_returns=parts)
    shared = ray.put(keys)
    cut = [split.remote(shared, parts, item) for item in items]
    cut = [c if parts > 1 else [c] for c in cut]
    gather = ray.remote(_gather).options(num_cpus=num_cpus)
    return ray.get([gather.remote(group, i, *[c[i] for c in cut]) for i in range(parts)])


def _split_by_key(keys: Callable, parts: int, item) -> pa.Table | tuple[pa.Table, ...]:
    import zlib

    import numpy as np
    import pyarrow as pa

    table = keys(item)
    if parts == 1:
        return table
    column = table.column("key")
    if pa.types.is_integer(column.type):
        part = column.to_numpy() % parts
    else:  # a hash every process agrees on (Python's own is salted per process)
        part = np.array(
            [zlib.crc32(str(k).encode()) % parts for k in column.to_pylist()], dtype=np.int64
        )
    order = np.argsort(part, kind="stable")
    table, starts = table.take(order), np.searchsorted(part[order], np.arange(parts + 1))
    return tuple(table.slice(a, b - a) for a, b in zip(starts[:-1], starts[1:], strict=True))


def _gather(group: Callable, part: int, *tables):
    return group(part, list(tables))


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


#: up to this many rows, a grouping runs in one task (a shuffle's fixed cost is seconds);
#: above it, Ray Data's shuffle spreads it over the cluster
SINGLE_TASK_ROWS = 250_000


def apply_to_groups(
    table: pa.Table, key: str, fn, single: str = "call", at_once: bool = False
) -> pa.Table | None:
    """`fn` applied to each group of rows sharing `key`, the results concatenated. A group of
    one row, with `single`: "call" `fn` on it, "skip" it (nothing), or "keep" the row as it is
    (where most groups are single, `fn`'s per-call cost would be most of the work).
    `at_once`: `fn` is called once, on every group's rows (sorted by `key`)."""
    import numpy as np
    import pyarrow as pa

    if table.num_rows == 0:
        return None
    table = table.sort_by(key)
    column = table.column(key)
    keys = (
        column.to_numpy()
        if pa.types.is_integer(column.type)
        else np.asarray(column.to_pylist(), dtype=object)
    )
    bounds = np.r_[0, np.flatnonzero(keys[1:] != keys[:-1]) + 1, len(keys)]
    starts, sizes = bounds[:-1], np.diff(bounds)
    alone = sizes == 1 if single != "call" else np.zeros(len(sizes), bool)
    if at_once:
        rows = table.filter(pa.array(np.repeat(~alone, sizes)))
        out = [fn(rows)] if rows.num_rows else []
    else:
        out = [
            fn(table.slice(a, n))
            for a, n in zip(starts[~alone].tolist(), sizes[~alone].tolist(), strict=True)
        ]
    if single == "keep" and alone.any():
        out.append(table.take(starts[alone]))
    out = [t for t in out if t is not None and t.num_rows]
    return pa.concat_tables(out) if out else None


class _OneTaskGroups:
    def __init__(self, key: str, fn: Callable, outputs: dict[str, Output], single: str):
        self.key, self.fn, self.outputs, self.single = key, fn, outputs, single

    def __call__(self, table: pa.Table) -> pa.Table:
        name = next(iter(self.outputs)) if len(self.outputs) == 1 else MAIN
        result = apply_to_groups(table, self.key, self.fn, self.single)
        return shard_rows({name: result} if result is not None else {}, self.outputs, "all")


def group_and_write(
    data: ray.data.Dataset,
    key: str,
    fn: Callable,
    outputs: dict[str, Output],
    num_partitions: int | None = None,
    rows: int | None = None,
    single: str = "call",
) -> dict[str, list[dict[str, Any]]]:
    """Group rows by `key`, apply `fn` to each group (a table back) and write what it returns
    as shards; a group of one row as `apply_to_groups`'s `single` says. With `rows` (about how
    many rows `data` has) up to SINGLE_TASK_ROWS, in one task; else by a shuffle. No group
    passes through the driver either way."""
    if rows is not None and rows <= SINGLE_TASK_ROWS:
        out = data.repartition(1).map_batches(
            as_function(_OneTaskGroups(key, fn, outputs, single)),
            batch_size=None,
            batch_format="pyarrow",
        )
        return collect(out.iter_rows(), outputs)
    grouped = data.groupby(key, num_partitions=num_partitions or default_partitions())
    if single != "call":
        fn = partial(_one_group, fn, single)
    out = grouped.map_groups(as_function(_GroupWriter(fn, outputs)), batch_format="pyarrow")
    return collect(out.iter_rows(), outputs)


def _one_group(fn: Callable, single: str, group: pa.Table) -> pa.Table | None:
    """`fn` on a group of several rows; a group of one skipped ("skip") or kept as it is."""
    if group.num_rows > 1:
        return fn(group)
    return group if single == "keep" else None


def default_partitions() -> int:
    """Shuffle partitions: a few per CPU (Ray's default of 200 costs seconds on a laptop)."""
    return max(2, min(200, 4 * cluster_cpus()))


def as_function(obj: Callable) -> Callable:
    """A plain function around a callable object (Ray Data's map_groups wants a __name__)."""

    def run(batch):
        return obj(batch)

    run.__name__ = type(obj).__name__
    return run
