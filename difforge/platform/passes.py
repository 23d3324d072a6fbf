"""The pass runner: one pass over a step's input shards (or a source's read tasks), for one
map step or a chain of fused ones, with per-shard resume. A stateless chain runs one plain Ray
task per item; a chain headed by a stateful (model) step, a Ray Data actor pool.

The head step reads its item itself (a source its read task, a map operator one input shard,
in batches); each later step of the chain takes the batch the step before it produced, still in
memory. Every step writes its own shards through its `Output`, so each step's dataset is
committed as if it had run alone. A resumable pass keeps, per input shard, the descriptions of
the shards it wrote (`_work/passes/` of the head step): a rerun redoes only the missing ones.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from difforge.platform import datasets as ds_mod
from difforge.platform.columns import type_problems
from difforge.platform.context import MapContext
from difforge.platform.datasets import Dataset, join
from difforge.platform.errors import DifforgeError
from difforge.platform.failures import STEP_NOTE
from difforge.platform.lineage import saw_nodes
from difforge.platform.operator import (
    MAIN,
    JobOperator,
    SourceOperator,
    output_metadata,
    required_columns,
)
from difforge.platform.outputs import Output
from difforge.platform.parallel import as_finished, shard_batches
from difforge.platform.plan import PlannedStep
from difforge.platform.progress import Progress
from difforge.platform.resources import Fitted
from difforge.platform.sizing import MIN_SHARD_ROWS, SHARDS_PER_CPU, cluster_cpus
from difforge.platform.written import STATS, write_batch

if TYPE_CHECKING:
    import pyarrow as pa

log = logging.getLogger("difforge")

PASSES = "passes"  # in a head step's work folder: which input shards a pass has finished
ITEM_DONE = "__item_done__"  # a row a worker returns per input shard (or read task) it finished


@dataclass
class PassStep:
    """A step of a pass, as the driver plans it: what runs, where, as which attempt."""

    step: PlannedStep
    fitted: Fitted
    attempt: str


def output_names(step: PlannedStep) -> list[str]:
    """A step's outputs: the main one, then its side outputs."""
    return [MAIN, *step.op_cls.side_outputs]


def keeps_progress(group: list[PlannedStep]) -> bool:
    """A pass that keeps each input shard's results as soon as they are written (and keeps its
    attempt's files when it fails): a chain (its results become visible only when the whole
    pass ends), or a single step whose operator asks for it."""
    return not issubclass(group[0].op_cls, JobOperator) and (
        len(group) > 1 or getattr(group[0].op_cls, "resumable", False)
    )


@dataclass
class Stage:
    """One step of a pass, as the workers see it (picklable)."""

    step: str
    op_cls: type
    params: dict
    outputs: dict[str, Output]
    ctx: MapContext | None
    batch_size: int


class PassWorker:
    """Runs on Ray workers: one pass over work items for one step or for a chain of fused steps.

    The head step reads its item itself (a source its read task, a map operator one input
    shard, in batches); each later step of the chain takes the batch the step before it
    produced, still in memory. Every step writes its own shards, so each step's dataset is
    committed as if it had run alone. Reading inside the worker means no separate read tasks
    compete with an actor pool for CPUs, and shard names follow the input's order. Each output
    row describes a shard (or, for `STATS`, the rows a step took in and its seconds of work).
    """

    def __init__(self, stages: list[Stage], markers: str | None = None):
        self.stages = stages
        self.markers = markers  # where each finished item's shard list is kept, if resumable
        self.source = issubclass(stages[0].op_cls, SourceOperator)
        self.ops, self.reads = [], []
        for k, s in enumerate(stages):
            op = s.op_cls(s.op_cls.Params.model_validate(s.params))
            self.reads.append(required_columns(op))
            if not (k == 0 and self.source):
                try:
                    op.setup(s.ctx)
                except Exception as exc:
                    exc.add_note(f"{STEP_NOTE}{s.step}")  # which step of the pass
                    raise
            self.ops.append(op)

    def _check_types(self, k: int, batch: pa.Table) -> None:
        """The columns step k reads have the vocabulary's types (a `label` of strings is
        refused here, naming the column, not deep inside the operator)."""
        stage = self.stages[k]
        problems = type_problems(batch.schema, self.reads[k])
        if problems:
            raise DifforgeError(
                f"step '{stage.step}' ({stage.op_cls.name}): its input's " + "; ".join(problems)
            )

    def _head_batches(self, item: dict) -> Iterator[pa.Table]:
        """The head step's input batches (for a source: its output tables, read)."""
        if self.source:
            yield from self.ops[0].read(item)
            return
        yield from shard_batches(item, self.stages[0].batch_size)

    def _stage(self, k: int, batch: pa.Table, key: str, started: float, out: list) -> None:
        """Step k on one batch (`started`: when fetching it began); then the next step on the
        main output, in slices of at most its batch size."""
        if k == 0 and self.source:
            result, rows_in = batch, 0
        else:
            self._check_types(k, batch)
            try:
                result, rows_in = self.ops[k].process(batch), batch.num_rows
            except Exception as exc:
                exc.add_note(f"{STEP_NOTE}{self.stages[k].step}")  # which step of the pass
                raise
        tables = result if isinstance(result, dict) else {MAIN: result}
        described = write_batch(tables, self.stages[k].outputs, key, rows_in)
        out.append(_tag(described, k, time.perf_counter() - started))
        main = tables.get(MAIN)
        if k + 1 == len(self.stages) or main is None:
            return
        size = self.stages[k + 1].batch_size
        for c, start in enumerate(range(0, main.num_rows, size)):
            self._stage(k + 1, main.slice(start, size), f"{key}-{c:04d}", time.perf_counter(), out)

    def _item(self, item: dict) -> list[pa.Table]:
        from difforge.platform import batch_cache

        out: list[pa.Table] = []
        batches = self._head_batches(item)
        for seq in itertools.count():
            started = time.perf_counter()
            batch = next(batches, None)
            if batch is None:
                break
            key = f"{item['index']:06d}-{seq:04d}"
            if len(self.stages) == 1:
                self._stage(0, batch, key, started, out)
                continue
            # what one step decoded, the next need not decode again, while this batch lasts
            with batch_cache.scope():
                self._stage(0, batch, key, started, out)
        return out

    def __call__(self, batch: pa.Table) -> pa.Table:
        import pyarrow as pa

        outs = []
        for raw in batch.column("item").to_pylist():
            item = json.loads(raw)
            outs.append(self._item_done())  # counted by the driver's progress bar
            done = self._done_marker(item)
            if done is not None:
                kept = self._kept(*done)
                if kept is not None:  # finished by an earlier, interrupted run
                    outs.append(kept)
                    continue
            item_outs = self._item(item)
            table = pa.concat_tables(item_outs) if item_outs else None
            if done is not None and table is not None:
                fs, path = done
                fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
                fs.pipe_file(path, json.dumps(table.to_pylist()).encode())
            if table is not None:
                outs.append(table)
        if outs:
            return pa.concat_tables(outs, promote_options="permissive")  # kept rows: from JSON
        return _tag(write_batch({}, self.stages[0].outputs, "", 0), 0, 0.0)

    def _item_done(self) -> pa.Table:
        import pyarrow as pa

        row = _tag(write_batch({}, self.stages[0].outputs, "", 0), 0, 0.0)
        return row.set_column(row.column_names.index("output"), "output", pa.array([ITEM_DONE]))

    def _kept(self, fs, path: str) -> pa.Table | None:
        """An item's shard descriptions kept by an earlier run, if all its shards still exist
        (they live in that run's attempt folders, in the datasets' own folders)."""
        import pyarrow as pa

        try:
            rows = json.loads(fs.cat_file(path))
        except FileNotFoundError:
            return None
        for row in rows:
            if row["path"]:
                out_fs, root = ds_mod.url_to_fs(
                    self.stages[row["stage"]].outputs[row["output"]].uri
                )
                if not out_fs.exists(f"{root}/{row['path']}"):
                    return None
        return pa.Table.from_pylist(rows)

    def _done_marker(self, item: dict):
        if self.markers is None:
            return None
        fs, root = ds_mod.url_to_fs(self.markers)
        return fs, f"{root}/item-{item['index']:06d}.done.json"


def _count_markers(markers: str | None) -> int:
    if markers is None:
        return 0
    fs, root = ds_mod.url_to_fs(markers)
    try:
        return sum(1 for p in fs.ls(root, detail=False) if p.endswith(".done.json"))
    except FileNotFoundError:
        return 0


def _tag(described: pa.Table, stage: int, seconds: float) -> pa.Table:
    """A step's shard descriptions, marked with its place in the chain; its STATS row (the
    first) carries the seconds the step spent on the batch."""
    import pyarrow as pa

    n = described.num_rows
    described = described.append_column("stage", pa.array([stage] * n, pa.int32()))
    return described.append_column("seconds", pa.array([seconds] + [0.0] * (n - 1), pa.float64()))


def _task(*args):
    """A stateless chain as a plain function: Ray Data runs it as tasks, not actors."""

    def run(batch: pa.Table) -> pa.Table:
        return PassWorker(*args)(batch)

    return run


def split_shards(shards: list[dict[str, Any]], want: int) -> list[dict[str, Any]]:
    """A pass's items: the input's shards, each cut into row ranges (`start`, `stop`) of at
    least MIN_SHARD_ROWS rows when there are fewer than `want` shards, so every core works."""
    if len(shards) >= want:
        return shards
    parts = -(-want // max(1, len(shards)))
    items = []
    for s in shards:
        k = max(1, min(parts, s["rows"] // MIN_SHARD_ROWS))
        if k == 1:
            items.append(s)
            continue
        step = -(-s["rows"] // k)
        items += [
            {**s, "start": a, "stop": min(a + step, s["rows"])} for a in range(0, s["rows"], step)
        ]
    return items


def run_map_pass(
    chain: list[PassStep],
) -> tuple[list[dict[str, list[dict]]], list[int | None], list[float], list[dict], int]:
    """Run the chain; per step: its shard entries by output, rows in, seconds of work and its
    main output's metadata (computed once, here); and how many input shards an earlier,
    interrupted run had finished."""
    head = chain[0].step
    rows_in: list[int | None] = [None] + [0] * (len(chain) - 1)
    if issubclass(head.op_cls, SourceOperator):
        items = head.operator.read_tasks(chain[0].fitted.batch_size)
    else:
        source = Dataset(head.inputs[0].uri)
        items = split_shards(source.shards(), SHARDS_PER_CPU * cluster_cpus())
        rows_in[0] = source.num_rows
    markers = _markers(chain, items)
    stages, metadata = _stages(chain)
    rows = [{"item": json.dumps({**t, "index": i})} for i, t in enumerate(items)]
    resumed = _count_markers(markers)
    if resumed:
        log.info(
            "%s: %d of %d input shards already done by an earlier run",
            "+".join(s.step.id for s in chain),
            resumed,
            len(rows),
        )
    results = _results(chain, stages, markers, rows)
    entries: list[dict[str, list[dict]]] = [{n: [] for n in s.outputs} for s in stages]
    work = [0.0] * len(chain)
    unit = "read tasks" if issubclass(head.op_cls, SourceOperator) else "shards"
    progress = Progress("+".join(s.step.id for s in chain), len(rows), unit)
    try:
        for row in results:
            _account(row, entries, rows_in, work, progress)
    finally:
        progress.close()
    return entries, rows_in, work, metadata, resumed


def _markers(chain: list[PassStep], items: list[dict]) -> str | None:
    """Where the pass marks the items it has done, for a rerun to skip them (None where its
    steps keep no progress)."""
    if not keeps_progress([s.step for s in chain]):
        return None
    head = chain[0].step
    # these very steps over the same items: another pass's markers are not ours. A source's
    # read tasks depend on its batch size; a map's items are its input shards (or their
    # parts), whatever the batch size (a rerun with another batch size reuses what was done)
    what = [s.step.fingerprint for s in chain]
    if issubclass(head.op_cls, SourceOperator):
        what.append(str(chain[0].fitted.batch_size))
    elif any("start" in i for i in items):
        what.append(json.dumps([[i.get("start"), i.get("stop")] for i in items]))
    key = hashlib.sha256(" ".join(what).encode()).hexdigest()[:16]
    return join(head.work_uri, PASSES, f"pass-{key}")


def _stages(chain: list[PassStep]) -> tuple[list[Stage], list[dict]]:
    """Each step of the chain as the workers run it: its operator, params, outputs and (but
    a source's) context, with the metadata the step before it will commit; and the metadata
    each step's main output will be committed with."""
    stages, metadata = [], []
    pending = None  # the metadata the previous step of the chain will commit
    for k, s in enumerate(chain):
        step = s.step
        if k == 0:
            inputs = [Dataset(r.uri) for r in step.inputs]
            meta = inputs[0].metadata if inputs else {}
        else:
            inputs, meta = [], pending  # plain maps' metadata depends on params alone
        pending = {**meta, **output_metadata(step.operator, inputs)}
        metadata.append(pending)
        outputs = {name: Output(step.output_uri(name), s.attempt) for name in output_names(step)}
        ctx = None
        if not (k == 0 and issubclass(step.op_cls, SourceOperator)):
            ctx = MapContext(
                step=step.id,
                inputs=[r.uri for r in step.inputs],
                work_uri=step.work_uri,
                num_gpus=s.fitted.num_gpus,
                pending_metadata=meta if k > 0 else None,
            )
        params = step.params.model_dump(mode="json")
        stages.append(Stage(step.id, step.op_cls, params, outputs, ctx, s.fitted.batch_size))
    return stages, metadata


def _results(chain: list[PassStep], stages: list[Stage], markers: str | None, rows: list[dict]):
    """The workers' report rows, as they finish: an actor pool where the chain holds a model,
    else one plain Ray task per item."""
    import ray.data

    fitted = chain[0].fitted
    common: dict[str, Any] = {"batch_format": "pyarrow", "num_cpus": fitted.num_cpus}
    if fitted.num_gpus:
        common["num_gpus"] = fitted.num_gpus
    if getattr(chain[0].step.op_cls, "stateful", False):
        data = ray.data.from_items(rows, override_num_blocks=max(1, len(rows)))
        data = data.map_batches(
            PassWorker,
            fn_constructor_args=(stages, markers),
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(  # no more actors than input shards
                min_size=max(1, min(fitted.min_actors, len(rows))),
                max_size=max(1, min(fitted.max_actors, len(rows))),
            ),
            **common,
        )
        return data.iter_rows()
    import pyarrow as pa

    tables = as_finished(
        _task(stages, markers),
        [pa.Table.from_pylist([r]) for r in rows],
        fitted.num_cpus,
        fitted.num_gpus,
    )
    return (row for t in tables for row in t.to_pylist())


def _account(row: dict, entries: list, rows_in: list, work: list, progress: Progress) -> None:
    """One row of a pass's output: a finished item, a step's work on a batch, or a shard."""
    saw_nodes([row.get("node")])
    k = row["stage"]
    if row["output"] == ITEM_DONE:
        progress.update()
    elif row["output"] == STATS:
        work[k] += row["seconds"]
        if k > 0:
            rows_in[k] += row["rows"]
    else:
        entries[k][row["output"]].append(row)
