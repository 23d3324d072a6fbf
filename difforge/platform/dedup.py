"""The machinery of the dedup shape (`difforge.platform.operator.DedupOperator`), written once:
keys for every row in parallel tasks, a shuffle that brings rows sharing a key together (for
small inputs, one task), the operator's `match` within each group, one verdict per duplicate
row, then a second parallel pass that drops (or flags) those rows. Only small shard
descriptions reach the driver."""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any, ClassVar

from difforge.platform import columns as C
from difforge.platform.datasets import join, url_to_fs
from difforge.platform.operator import JobOperator, JobResult, required_columns
from difforge.platform.outputs import MAIN
from difforge.platform.parallel import SINGLE_TASK_ROWS
from difforge.platform.sizing import SHARD_ROWS
from difforge.platform.written import collect

if TYPE_CHECKING:
    import pyarrow as pa

    from difforge.platform.context import JobContext

#: the side output listing each duplicate row: its id, the id it duplicates, and details
DUPLICATES = "duplicates"


class DedupOperator(JobOperator):
    """Finds rows that duplicate other rows across a whole dataset, or (with a second input)
    rows of a reference dataset, and drops them or flags them; the side output `duplicates`
    lists each with the id it duplicates. You write `keys` (rows that may be duplicates share
    a key) and `match` (within one key's rows, which duplicate which); difforge computes the
    keys in parallel, brings each key's rows together with a shuffle (no row passes through
    the driver), keeps one verdict per row, removes or flags the rows in a second parallel
    pass, and logs the pairs found side by side (`grid`)."""

    kind: ClassVar[str] = "dedup"
    side_outputs: ClassVar[tuple[str, ...]] = (DUPLICATES,)
    #: each row has exactly one key (no second shuffle to pick one verdict per row)
    one_key_per_row: ClassVar[bool] = False
    #: `match` takes the rows of many keys at once (each key's rows together, sorted by key)
    #: and answers for all of them: one call per grouping task instead of one per key
    match_many_keys: ClassVar[bool] = False
    #: columns of `match`'s rows ordering a row's verdicts: the first one is kept
    rank: ClassVar[tuple[str, ...]] = ()
    #: the MLflow image of removed rows beside what they duplicated ("" for none)
    grid: ClassVar[str] = "duplicates.png"
    #: up to this many input rows per grouping task (one per CPU with `one_key_per_row`, else
    #: one), keys are grouped in plain Ray tasks (Ray Data's shuffle costs seconds more);
    #: above, by Ray Data's shuffle across the cluster. Size it by what a row's keys hold.
    single_task_rows: ClassVar[int] = SINGLE_TASK_ROWS

    def keys(self, batch: pa.Table, role: str) -> pa.Table:
        """Zero or more rows per input row: `id`, `key` (a string or an integer), `role`
        ("main", or "ref"
        for reference rows) and whatever `match` needs."""
        raise NotImplementedError

    def match(self, group: pa.Table, reference: bool) -> pa.Table:
        """Given the rows sharing one key (a key of one row has nothing to compare, and
        difforge may skip `match` for it): a row (`id`, `duplicate_of`, and any
        detail columns) for each main row that duplicates another: one with a lower id, by
        convention, or, when the step has a `reference` input, a reference row."""
        raise NotImplementedError

    def flag_column(self) -> str | None:
        """None to drop duplicates; else the name of a boolean column flagging them (and
        `{name}_id` holding the id each duplicates), every row kept."""
        return None

    def run(self, ctx: JobContext) -> JobResult:
        return run_dedup(self, ctx)


class DropIds:
    """Removes the rows whose ids are listed in some shards (loaded once per task), or keeps
    them and flags them (`flag` and `{flag}_id` columns)."""

    def __init__(self, id_files: list[str], flag: str | None = None):
        self.id_files, self.flag, self._ids = id_files, flag, None

    def ids(self) -> tuple[pa.Array, pa.Array]:
        """(the duplicates' ids, the id each duplicates)."""
        if self._ids is None:
            import pyarrow as pa
            import pyarrow.parquet as pq

            ids, of = [pa.array([], pa.string())], [pa.array([], pa.string())]
            for uri in self.id_files:
                fs, path = url_to_fs(uri)
                t = pq.read_table(path, filesystem=fs, columns=[C.ID, "duplicate_of"])
                ids += t.column(0).cast(pa.string()).chunks
                of += t.column(1).cast(pa.string()).chunks
            self._ids = (pa.concat_arrays(ids), pa.concat_arrays(of))
        return self._ids

    def __call__(self, batch: pa.Table) -> pa.Table:
        import pyarrow.compute as pc

        ids, of = self.ids()
        at = pc.index_in(batch.column(C.ID).cast(ids.type), value_set=ids)  # null: not listed
        if self.flag:
            batch = batch.append_column(self.flag, pc.is_valid(at))
            return batch.append_column(f"{self.flag}_id", of.take(at))
        return batch.filter(pc.is_null(at))


def first_by(rank: tuple[str, ...], group: pa.Table) -> pa.Table:
    """One row per duplicate id (rows of one id matched under several keys): the first by
    `rank`, then by what it duplicates."""
    rows = sorted(group.to_pylist(), key=lambda r: (*[r[k] for k in rank], r["duplicate_of"]))
    return group.from_pylist(rows[:1], schema=group.schema)


class _ShardKeys:
    """The keys of one (role, shard)'s rows."""

    def __init__(self, op: DedupOperator, batch_size: int, columns: list[str]):
        self.op, self.batch_size, self.columns = op, batch_size, columns

    def __call__(self, item: tuple[str, Any]) -> pa.Table:
        from difforge.platform.parallel import apply_to_shard

        role, shard = item
        return apply_to_shard(
            shard, partial(self.op.keys, role=role), self.batch_size, self.columns
        )


class _InOneTask:
    """Every key's group of a part in one task: match within each, then one verdict per row
    (a row's keys all in this part)."""

    def __init__(self, op: DedupOperator, match, outputs: dict):
        self.op, self.match, self.outputs = op, match, outputs

    def __call__(self, part: int, tables: list[pa.Table]) -> pa.Table:
        import pyarrow as pa

        from difforge.platform.parallel import apply_to_groups, shard_rows

        found = (
            apply_to_groups(
                pa.concat_tables(tables),
                "key",
                self.match,
                single="skip",
                at_once=self.op.match_many_keys,
            )
            if tables
            else None
        )
        if found is not None and not self.op.one_key_per_row:
            found = apply_to_groups(found, C.ID, partial(first_by, self.op.rank), single="keep")
        return shard_rows(
            {DUPLICATES: found} if found is not None else {}, self.outputs, f"part-{part:04d}"
        )


def run_dedup(op: DedupOperator, ctx: JobContext) -> JobResult:
    """Keys, a shuffle by key, `match` per group, one verdict per row, then the drop pass."""
    from difforge.platform.parallel import (
        as_function,
        default_partitions,
        group_and_write,
        group_in_tasks,
        read_files,
    )
    from difforge.platform.sizing import cluster_cpus

    res = ctx.resources
    columns = sorted(required_columns(op))
    match = partial(op.match, reference=len(ctx.inputs) > 1)
    side = {DUPLICATES: ctx.outputs[DUPLICATES]}
    roles = ["main", "ref"][: len(ctx.inputs)]
    # one part per CPU; one in all where a row has several keys (its verdicts must meet)
    parts = cluster_cpus() if op.one_key_per_row else 1
    if sum(ds.num_rows for ds in ctx.inputs) <= op.single_task_rows * parts:
        # small enough for a few tasks' memory: keys and groups in plain Ray tasks, no Ray
        # Data shuffle (its fixed cost is seconds)
        items = [(role, s) for ds, role in zip(ctx.inputs, roles, strict=True) for s in ds.shards()]
        done = group_in_tasks(
            items,
            _ShardKeys(op, res.batch_size, columns),
            _InOneTask(op, match, side),
            parts,
            res.num_cpus,
        )
        found = collect((r for t in done for r in t.to_pylist()), side)[DUPLICATES]
        return _drop(op, ctx, found)
    keys = read_files(
        ctx.inputs[0].shards(), partial(op.keys, role="main"), res.batch_size, res.num_cpus, columns
    )
    if len(ctx.inputs) > 1:
        ref = read_files(
            ctx.inputs[1].shards(),
            partial(op.keys, role="ref"),
            res.batch_size,
            res.num_cpus,
            columns,
        )
        keys = keys.union(ref)
    if op.one_key_per_row:  # a row is in one group only: its verdict is final
        found = group_and_write(keys, "key", match, side, single="skip")[DUPLICATES]
    else:
        pairs = keys.groupby("key", num_partitions=default_partitions()).map_groups(
            as_function(match), batch_format="pyarrow"
        )
        found = group_and_write(pairs, C.ID, partial(first_by, op.rank), side, single="keep")[
            DUPLICATES
        ]
    return _drop(op, ctx, found)


def _drop(op: DedupOperator, ctx: JobContext, found: list[dict]) -> JobResult:
    """The second pass: every input row but the duplicates found (or all, flagged)."""
    from difforge.platform.parallel import map_files

    res = ctx.resources
    id_files = [join(ctx.outputs[DUPLICATES].uri, e["path"]) for e in found if e["path"]]
    flag = op.flag_column()
    # a filter: whole shards at a time (their writers bound them), one output shard each
    main = map_files(
        ctx.inputs[0].shards(),
        DropIds(id_files, flag),
        {MAIN: ctx.outputs[MAIN]},
        SHARD_ROWS,
        res.num_cpus,
    )[MAIN]
    if op.grid and C.IMAGE in ctx.inputs[0].schema.names:
        log_pairs(ctx, side_pairs(id_files), op.grid)
    return JobResult(entries={MAIN: main, DUPLICATES: found})


def side_pairs(uris: list[str], n: int = 16) -> list[tuple[str, str]]:
    """Up to `n` (duplicate, kept) id pairs from the duplicates' shards."""
    import pyarrow.parquet as pq

    pairs: list[tuple[str, str]] = []
    for uri in uris:
        if len(pairs) >= n:
            break
        fs, path = url_to_fs(uri)
        t = pq.read_table(path, filesystem=fs, columns=[C.ID, "duplicate_of"])
        pairs += list(zip(t.column(0).to_pylist(), t.column(1).to_pylist(), strict=True))
    return pairs[:n]


def log_pairs(ctx: JobContext, pairs: list[tuple[str, str]], name: str) -> None:
    """Removed rows beside what they duplicated, as an image grid in the step's log."""
    if not pairs:
        return
    from difforge.platform.show import captioned_grid

    wanted = {i for p in pairs for i in p}
    images: dict[str, Any] = {}
    for ds in ctx.inputs:  # only the shown rows' images are read
        shown = ds.rows_with_ids(wanted, [C.IMAGE])
        images.update(
            zip(shown.column(C.ID).to_pylist(), shown.column(C.IMAGE).to_pylist(), strict=True)
        )
    items = []
    for dropped, kept in pairs:
        items += [(images.get(kept), f"kept {kept}"), (images.get(dropped), f"drop {dropped}")]
    ctx.log.log_image(captioned_grid(items, columns=8), name)
