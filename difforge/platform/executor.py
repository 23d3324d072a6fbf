"""Running a plan: each step that is not cached runs on Ray, writes its shards under a fresh
attempt folder and commits a manifest; every run and step is tracked in MLflow.

Ray starts only when a step needs computing, so a fully cached run never starts it. By default
Ray is private to this process (`address="local"`): a cluster started on the same machine with
`ray start` is never joined by accident; `address=` (or RAY_ADDRESS) attaches to one.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from difforge.platform import datasets as ds_mod
from difforge.platform.columns import type_problems
from difforge.platform.context import JobContext, MapContext
from difforge.platform.datasets import Dataset, join, read_shard
from difforge.platform.errors import DifforgeError, Problem, SpecError, StepFailed
from difforge.platform.operator import MAIN, JobOperator, SourceOperator, StepOutcome
from difforge.platform.outputs import STATS, Output, new_attempt, write_batch
from difforge.platform.plan import Plan, PlannedStep, build_plan, passes
from difforge.platform.resources import Fitted, fit
from difforge.platform.show import text_table
from difforge.platform.spec import LoadedSpec, PipelineSpec, load_spec
from difforge.platform.tracking import StepTracker, Tracker, git_commit
from difforge.platform.watchdog import process_identity, reap_dead_runs, start_watchdog

if TYPE_CHECKING:
    import pyarrow as pa

log = logging.getLogger("difforge")

PASSES = "passes"  # in a head step's work folder: which input shards a pass has finished


@dataclass
class StepSummary:
    step: str
    op: str
    rows_in: int | None
    rows_out: int
    seconds: float
    cached: bool
    uri: str
    side_rows: dict[str, int] = field(default_factory=dict)
    run_id: str | None = None


@dataclass
class RunSummary:
    pipeline: str
    run_id: str | None
    tracking_uri: str
    experiment: str
    steps: list[StepSummary]
    seconds: float
    status: str = "FINISHED"

    def step(self, step_id: str) -> StepSummary:
        return next(s for s in self.steps if s.step == step_id)

    def table(self) -> str:
        head = ["step", "op", "rows in", "rows out", "seconds", "cached", "output"]
        rows = []
        for s in self.steps:
            out = str(s.rows_out) + "".join(f" (+{n} {k})" for k, n in s.side_rows.items())
            rows.append(
                [
                    s.step,
                    s.op,
                    "-" if s.rows_in is None else str(s.rows_in),
                    out,
                    f"{s.seconds:.1f}",
                    "yes" if s.cached else "no",
                    s.uri,
                ]
            )
        return text_table(head, rows)


class RayRuntime:
    """Starts Ray on first use; shuts it down only if it started it."""

    def __init__(self, address: str | None):
        self.address = address or os.environ.get("RAY_ADDRESS") or "local"
        self.started = False
        self.watchdog = None

    def ensure(self) -> dict[str, float]:
        import ray

        if not ray.is_initialized():
            log.info("starting Ray (address=%s)", self.address)
            main = threading.current_thread() is threading.main_thread()
            previous = signal.getsignal(signal.SIGTERM) if main else None
            try:
                ray.init(
                    address=self.address,
                    include_dashboard=False,
                    logging_level=logging.WARNING,
                    configure_logging=True,
                )
            except Exception as exc:
                where = "a private local Ray" if self.address == "local" else self.address
                raise DifforgeError(
                    f"Ray could not start ({where}): {type(exc).__name__}: {exc}"
                ) from exc
            # ray.init makes SIGTERM exit at once; keep the caller's handler (the CLI ends the
            # run like Ctrl-C, so its MLflow runs say KILLED) where there was one.
            if callable(previous):
                signal.signal(signal.SIGTERM, previous)
            self.started = True
            if self.address == "local":  # ends Ray's processes if this driver is killed
                self.watchdog = start_watchdog()
            from ray.data import DataContext

            ctx = DataContext.get_current()
            ctx.enable_progress_bars = True
        return dict(ray.cluster_resources())

    def shutdown(self) -> None:
        if self.started:
            import ray

            ray.shutdown()
            self.started = False
            if self.watchdog is not None:
                self.watchdog.terminate()
                self.watchdog = None


@dataclass
class _Stage:
    """One step of a pass, as the workers see it (picklable)."""

    step: str
    op_cls: type
    params: dict
    outputs: dict[str, Output]
    ctx: MapContext | None
    batch_size: int


class _Worker:
    """Runs on Ray workers: one pass over work items for one step or for a chain of fused steps.

    The head step reads its item itself (a source its read task, a map operator one input
    shard, in batches); each later step of the chain takes the batch the step before it
    produced, still in memory. Every step writes its own shards, so each step's dataset is
    committed as if it had run alone. Reading inside the worker means no separate read tasks
    compete with an actor pool for CPUs, and shard names follow the input's order. Each output
    row describes a shard (or, for `STATS`, the rows a step took in and its seconds of work).
    """

    def __init__(self, stages: list[_Stage], markers: str | None = None):
        self.stages = stages
        self.markers = markers  # where each finished item's shard list is kept, if resumable
        self.source = issubclass(stages[0].op_cls, SourceOperator)
        self.ops, self.reads = [], []
        for k, s in enumerate(stages):
            op = s.op_cls(s.op_cls.Params.model_validate(s.params))
            self.reads.append(s.op_cls.required_columns(op.params))
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
        import pyarrow as pa
        import pyarrow.parquet as pq

        shard = pq.ParquetFile(read_shard(item["file"], item["bytes"], item["sha256"]))
        for rb in shard.iter_batches(batch_size=self.stages[0].batch_size):
            yield pa.Table.from_batches([rb])

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
            return pa.concat_tables(outs)
        return _tag(write_batch({}, self.stages[0].outputs, "", 0), 0, 0.0)

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
        return _Worker(*args)(batch)

    return run


@dataclass
class _Started:
    """A step whose MLflow run is open and whose work is about to run."""

    step: PlannedStep
    run: StepTracker
    fitted: Fitted
    attempt: str


class Executor:
    def __init__(self, plan: Plan, tracker: Tracker, ray_runtime: RayRuntime, fuse: bool = True):
        self.plan = plan
        self.tracker = tracker
        self.ray = ray_runtime
        self.fuse = fuse
        self.run_started = time.time()

    def passes(self) -> list[list[PlannedStep]]:
        return passes(self.plan.steps, self.fuse)

    # -- map-shaped steps: one Ray Data pass for one step or a fused chain --------------------
    def _run_on_ray(
        self, chain: list[_Started]
    ) -> tuple[list[dict[str, list[dict]]], list[int | None], list[float], int]:
        """Run the chain; per step: its shard entries by output, rows in and seconds of work;
        and how many input shards an earlier, interrupted run had finished."""
        import ray.data

        # A pass keeps each input shard's results as soon as they are written (and a rerun
        # redoes only the missing ones) when its operator asks for it, and always when it
        # chains steps: their results become visible only when the whole pass ends.
        head = chain[0].step
        resumable = len(chain) > 1 or getattr(head.op_cls, "resumable", False)
        markers = None
        if resumable:
            # these very steps, over the same input shards (a source's read tasks depend on its
            # batch size): another pass's markers are not ours
            what = [s.step.fingerprint for s in chain] + [str(chain[0].fitted.batch_size)]
            key = hashlib.sha256(" ".join(what).encode()).hexdigest()[:16]
            markers = join(head.work_uri, PASSES, f"pass-{key}")
        stages = []
        pending = None  # the metadata the previous step of the chain will commit
        for k, s in enumerate(chain):
            step = s.step
            if k == 0:
                inputs = [Dataset(r.uri) for r in step.inputs]
                meta = inputs[0].metadata if inputs else {}
            else:
                inputs, meta = [], pending  # plain maps' metadata depends on params alone
            pending = {**meta, **step.operator.output_metadata(inputs)}
            outputs = {name: Output(step.output_uri(name), s.attempt) for name in _names(step)}
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
            stages.append(_Stage(step.id, step.op_cls, params, outputs, ctx, s.fitted.batch_size))
        fitted = chain[0].fitted
        common: dict[str, Any] = {"batch_format": "pyarrow", "num_cpus": fitted.num_cpus}
        if fitted.num_gpus:
            common["num_gpus"] = fitted.num_gpus
        rows_in: list[int | None] = [None] + [0] * (len(chain) - 1)
        if issubclass(head.op_cls, SourceOperator):
            items = head.operator.read_tasks(fitted.batch_size)
        else:
            source = Dataset(head.inputs[0].uri)
            items = source.shards()
            rows_in[0] = source.num_rows
        rows = [{"item": json.dumps({**t, "index": i})} for i, t in enumerate(items)]
        resumed = _count_markers(markers)
        if resumed:
            log.info("%s: %d of %d input shards already done by an earlier run",
                     "+".join(s.step.id for s in chain), resumed, len(rows))  # fmt: skip
        data = ray.data.from_items(rows, override_num_blocks=max(1, len(rows)))
        if getattr(head.op_cls, "stateful", False):
            data = data.map_batches(
                _Worker,
                fn_constructor_args=(stages, markers),
                batch_size=1,
                compute=ray.data.ActorPoolStrategy(
                    min_size=fitted.min_actors, max_size=fitted.max_actors
                ),
                **common,
            )
        else:
            data = data.map_batches(_task(stages, markers), batch_size=1, **common)
        entries: list[dict[str, list[dict]]] = [{n: [] for n in s.outputs} for s in stages]
        work = [0.0] * len(chain)
        for row in data.iter_rows():
            k = row["stage"]
            if row["output"] == STATS:
                work[k] += row["seconds"]
                if k > 0:
                    rows_in[k] += row["rows"]
            else:
                entries[k][row["output"]].append(row)
        return entries, rows_in, work, resumed

    # -- job-shaped steps ------------------------------------------------------------------
    def _run_job(
        self, step: PlannedStep, fitted: Fitted, attempt: str, tracker: StepTracker
    ) -> tuple[dict[str, list[dict]], int | None, dict]:
        inputs = [Dataset(r.uri) for r in step.inputs]
        if inputs:
            problems = type_problems(inputs[0].schema, step.op_cls.required_columns(step.params))
            if problems:
                raise DifforgeError(
                    f"step '{step.id}' ({step.op}): its input's " + "; ".join(problems)
                )
        ctx = JobContext(
            step=step.id,
            pipeline=self.plan.name,
            inputs=inputs,
            work_uri=step.work_uri,
            storage=self.plan.storage,
            resources=fitted,
            tracker=tracker,
            outputs={name: Output(step.output_uri(name), attempt) for name in _names(step)},
        )
        result = step.operator.run(ctx)
        entries = {name: [] for name in ctx.outputs}
        entries.update(result.entries or {})
        if result.table is not None:
            entries[MAIN].append(ctx.outputs[MAIN].write_batch(result.table, "000000"))
        rows_in = inputs[0].num_rows if inputs else None
        return entries, rows_in, result.metadata or {}

    # -- steps -----------------------------------------------------------------------------
    def _tags(self, step: PlannedStep) -> dict[str, str]:
        return {
            "difforge.pipeline": self.plan.name,
            "difforge.step": step.id,
            "difforge.op": step.op,
            "difforge.op_version": step.op_cls.version,
            "difforge.fingerprint": step.fingerprint,
            "difforge.inputs": json.dumps({r.text: r.fingerprint for r in step.inputs}),
            "difforge.uri": step.uri,
        }

    def _cached(self, step: PlannedStep) -> StepSummary:
        manifest = ds_mod.read_manifest(step.uri)
        run = self.tracker.start_step(step.id, {**self._tags(step), "difforge.cached": "true"})
        run.log_metrics({"rows_out": manifest.num_rows, "cached": 1})
        run.end()
        return StepSummary(
            step.id, step.op, None, manifest.num_rows, 0.0, True, step.uri, run_id=run.run_id
        )

    def _start(self, step: PlannedStep, fused_with: list[str]) -> _Started:
        tags = {**self._tags(step), "difforge.cached": "false"}
        if len(fused_with) > 1:
            tags["difforge.pass"] = "+".join(fused_with)
        run = self.tracker.start_step(step.id, tags)
        try:
            run.log_params(step.params.model_dump(mode="json"), prefix="")
            cluster = self.ray.ensure()
            fitted = fit(step.id, step.resources, cluster, step.op_cls.gpus_when_available)
            if step.forced:
                # forced: start over, checkpoints included; the old commit stays visible until
                # the new one replaces it
                ds_mod.remove_work(step.work_uri)
        except BaseException as exc:
            run.end("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
            raise
        return _Started(step, run, fitted, new_attempt())

    def run_pass(self, group: list[PlannedStep]) -> list[StepSummary]:
        """Run one pass: a cached step, a job, or one Ray Data pass over a chain of map steps
        (each step still committed, finalized and tracked as its own)."""
        if group[0].cached:
            return [self._cached(group[0])]
        ids = [s.id for s in group]
        # a pass that keeps each input shard's results keeps its attempt's files on failure
        keeps_progress = not issubclass(group[0].op_cls, JobOperator) and (
            len(group) > 1 or getattr(group[0].op_cls, "resumable", False)
        )
        started: list[_Started] = []
        done: list[StepSummary] = []
        try:
            for step in group:
                started.append(self._start(step, ids))
            t0 = time.time()
            if len(group) > 1:
                log.info("steps %s: running in one pass", ", ".join(
                    f"{s.id} ({s.op})" for s in group))  # fmt: skip
            else:
                log.info("step %s (%s): running", group[0].id, group[0].op)
            head = started[0]
            if issubclass(head.step.op_cls, JobOperator):
                entries, rows_in, extra = self._run_job(
                    head.step, head.fitted, head.attempt, head.run
                )
                results = [(entries, rows_in, time.time() - t0, extra)]
            else:
                if len(group) > 1 and any(s.forced for s in group):
                    for s in group:  # the pass's kept results include the forced step's
                        ds_mod.remove_work(s.work_uri)
                entries_k, rows_k, work, resumed = self._run_on_ray(started)
                if resumed:
                    for s in started:
                        s.run.log_metrics({"input_shards_resumed": resumed})
                wall, total = time.time() - t0, sum(work)
                # the pass's wall time, split by each step's share of the measured work
                shares = [w / total if total > 0 else 1 / len(work) for w in work]
                results = [
                    (e, r, wall * f, None)
                    for e, r, f in zip(entries_k, rows_k, shares, strict=True)
                ]
            for s, (entries, rows_in, seconds, extra) in zip(started, results, strict=True):
                done.append(self._finish(s, entries, rows_in, seconds, extra))
            return done
        except BaseException as exc:
            status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
            for s in started[len(done) :]:
                s.run.end(status)
                if not keeps_progress:  # what this attempt wrote is of no use now
                    for name in _names(s.step):
                        Output(s.step.output_uri(name), s.attempt).abort()
            if isinstance(exc, (KeyboardInterrupt, DifforgeError)):
                raise
            failed = _failed_step(exc, group) if len(done) == 0 else started[len(done)].step
            where = f" (in one pass with {', '.join(ids)})" if len(group) > 1 else ""
            raise StepFailed(
                f"step '{failed.id}' ({failed.op}){where} failed: {_cause(exc)}"
            ) from exc

    def _finish(
        self,
        s: _Started,
        entries: dict[str, list[dict]],
        rows_in: int | None,
        seconds: float,
        extra: dict | None,
    ) -> StepSummary:
        """Commit a step's outputs (side outputs, then the operator's last word, then the main
        output), log its metrics and end its run."""
        step, run = s.step, s.run
        t0 = time.time()
        rows_out = sum(e["rows"] for e in entries[MAIN])
        if step.min_rows is not None and rows_out < step.min_rows:
            raise DifforgeError(
                f"step '{step.id}' ({step.op}) wrote {rows_out} rows, fewer than its "
                f"min_rows: {step.min_rows}; nothing was committed"
            )
        if rows_out == 0:
            log.warning("step %s (%s): its output has 0 rows (set min_rows to make this an "
                        "error)", step.id, step.op)  # fmt: skip
        producer = {
            "pipeline": self.plan.name,
            "step": step.id,
            "op": step.op,
            "op_version": step.op_cls.version,
        }
        metadata: dict[str, Any] = {}
        if step.inputs:
            metadata.update(Dataset(step.inputs[0].uri).metadata)
        if extra is not None:  # a job's own metadata
            metadata.update(extra)
        else:
            inputs = [Dataset(r.uri) for r in step.inputs]
            metadata.update(step.operator.output_metadata(inputs))
        side_rows, sides = {}, {}
        outputs = {name: Output(step.output_uri(name), s.attempt) for name in _names(step)}
        commit = {"replace": step.forced, "stale_before": self.run_started}
        for name in step.op_cls.side_outputs:
            m, _ = outputs[name].commit(
                entries[name], step.fingerprint, {**producer, "output": name}, **commit
            )
            side_rows[name] = m.num_rows
            sides[name] = Dataset(step.output_uri(name), m)
        # the operator's last word: metrics, artifacts, or a refusal (before the commit)
        outcome = StepOutcome(
            rows_in=rows_in,
            rows_out=rows_out,
            main_files=[join(step.uri, e["path"]) for e in entries[MAIN] if e["path"]],
            sides=sides,
        )
        op_metrics = step.operator.finalize(outcome, run) or {}
        manifest, _ = outputs[MAIN].commit(
            entries[MAIN], step.fingerprint, producer, metadata, **commit
        )
        seconds += time.time() - t0
        metrics = {
            "rows_out": manifest.num_rows,
            "seconds": seconds,
            "cached": 0,
            **{f"rows_{k}": v for k, v in side_rows.items()},
            **op_metrics,
        }
        if rows_in is not None:
            metrics["rows_in"] = rows_in
            metrics["rows_per_s"] = rows_in / seconds if seconds > 0 else 0.0
        elif manifest.num_rows:
            metrics["rows_per_s"] = manifest.num_rows / seconds if seconds > 0 else 0.0
        run.log_metrics(metrics)
        run.log_dict(manifest.model_dump(mode="json"), "manifest.json")
        run.end()
        return StepSummary(
            step.id,
            step.op,
            rows_in,
            manifest.num_rows,
            seconds,
            False,
            step.uri,
            side_rows,
            run.run_id,
        )


def _names(step: PlannedStep) -> list[str]:
    """A step's outputs: the main one, then its side outputs."""
    return [MAIN, *step.op_cls.side_outputs]


STEP_NOTE = "difforge step: "


def _chain(exc: BaseException) -> list[BaseException]:
    """An error and what caused it, outermost first (Ray's wrappers keep theirs in `cause`)."""
    chain, inner = [exc], exc
    for _ in range(8):
        nxt = getattr(inner, "cause", None) or inner.__cause__ or inner.__context__
        if nxt is None or nxt is inner:
            break
        chain.append(nxt)
        inner = nxt
    return chain


def _failed_step(exc: BaseException, group: list[PlannedStep]) -> PlannedStep:
    """The step of a pass whose operator raised (named in a note on the worker's error)."""
    text = "\n".join(str(e) + "\n" + "\n".join(getattr(e, "__notes__", [])) for e in _chain(exc))
    named = re.findall(re.escape(STEP_NOTE) + r"(\S+)", text)
    return next((s for s in group if named and s.id == named[-1]), group[0])


def _cause(exc: BaseException) -> str:
    """The user-facing cause of a failure, unwrapped from Ray's task and Ray Data errors.

    A Ray task error carries the remote traceback in its text; the user's own exception is
    its last "SomeError: message" line that is not one of Ray's wrappers.
    """
    chain = _chain(exc)
    inner = chain[-1]
    found = []
    for e in chain:
        for line in str(e).splitlines():
            line = line.strip()
            if line.startswith("ray."):
                continue
            # an exception line: SomeError: ..., or one of difforge's own (DatasetNotCommitted)
            if re.match(r"^([\w.]+(Error|Exception)\b[^:]*|difforge\.[\w.]+):", line):
                found.append(line)
    if found:
        return found[-1]
    lines = [line.strip() for line in str(inner).splitlines() if line.strip()]
    return f"{type(inner).__name__}: {lines[-1]}" if lines else type(inner).__name__


def run(
    source: str | Path | dict | PipelineSpec | LoadedSpec,
    overrides: list[str] | None = None,
    until: str | None = None,
    force: list[str] | None = None,
    address: str | None = None,
    tags: dict[str, str] | None = None,
    params: dict[str, Any] | None = None,
    runtime: RayRuntime | None = None,
    fuse: bool | None = None,
) -> RunSummary:
    """Run a pipeline; return a summary of each step (rows, seconds, cached, output URI).

    `source` is a YAML path, YAML text, a dict or a PipelineSpec. `overrides` are `--set`
    strings (`STEP.params.FIELD=VALUE`). `tags` go on the pipeline's MLflow run (the
    scheduler and `difforge submit` mark their runs with them). `fuse=False` (or
    DIFFORGE_FUSE=0) runs every step in a pass of its own, never fused with its input.
    """
    loaded = source if isinstance(source, LoadedSpec) else load_spec(source, overrides)
    if loaded.spec.matrix:
        raise SpecError([Problem("this pipeline declares a matrix: run it as a sweep "
                                 "(`difforge run` does; from Python, difforge.sweep)", loaded.file)])  # fmt: skip
    plan = build_plan(loaded, until=until, force=force)
    spec = loaded.spec
    if fuse is None:
        fuse = os.environ.get("DIFFORGE_FUSE", "1") != "0"
    own_runtime = runtime is None
    runtime = runtime or RayRuntime(address)
    t0 = time.time()

    def start_tracking() -> tuple[Tracker, StepTracker]:
        tracker = Tracker(spec.tracking.uri, spec.tracking.experiment or spec.name)
        try:  # runs whose driver was killed would otherwise stay RUNNING forever
            for dead in reap_dead_runs(tracker.client, tracker.experiment_id):
                log.info("run %s: its driver is gone; marked FAILED", dead)
        except Exception as exc:  # noqa: BLE001 - housekeeping never fails a run
            log.debug("could not check for dead runs: %s", exc)
        parent = tracker.start_pipeline(
            spec.name,
            {
                **process_identity(),
                "difforge.pipeline": spec.name,
                "difforge.storage": plan.storage,
                "difforge.git_commit": git_commit(),
                "difforge.file": loaded.file,
                **(tags or {}),
            },
        )
        parent.log_params(
            {
                "pipeline": spec.name,
                "storage": plan.storage,
                "overrides": loaded.overrides,
                "until": until,
                "force": force,
                **(params or {}),
                **{f"fingerprint.{s.id}": s.fingerprint for s in plan.steps},
            }
        )
        files: dict[str, str | bytes] = {"resolved.json": json.dumps(plan.resolved(), indent=2)}
        if loaded.text is not None:
            files["pipeline.yaml"] = loaded.text
        tracker.log_files(parent, files)
        return tracker, parent

    # Ray starts only if some step must run; its start-up (mostly waiting on its processes)
    # overlaps with setting up the MLflow run.
    summaries: list[StepSummary] = []
    status = "FAILED"
    parent: StepTracker | None = None
    try:
        with ThreadPoolExecutor(1) as pool:
            tracking = pool.submit(start_tracking)
            try:
                if any(not s.cached for s in plan.steps):
                    runtime.ensure()
            finally:  # the pipeline's run exists either way, and is ended below
                tracker, parent = tracking.result()
        executor = Executor(plan, tracker, runtime, fuse=fuse)
        for group in executor.passes():
            for s in executor.run_pass(group):
                summaries.append(s)
                log.info(
                    "step %s: %s rows in %.1fs%s",
                    s.step,
                    s.rows_out,
                    s.seconds,
                    " (cached)" if s.cached else "",
                )
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        total = time.time() - t0
        try:
            if parent is not None:
                cached = sum(s.cached for s in summaries)
                parent.log_metrics({"seconds": total, "steps_cached": cached})
                parent.end(status)
        finally:
            if own_runtime:
                runtime.shutdown()
    order = {s.id: i for i, s in enumerate(plan.steps)}  # the pipeline's order, not the passes'
    summaries.sort(key=lambda s: order[s.step])
    return RunSummary(
        spec.name, parent.run_id, tracker.uri, tracker.experiment, summaries, total, status
    )
