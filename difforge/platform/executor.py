"""Running a plan: each step that is not cached runs on Ray, writes its shards under a fresh
attempt folder and commits a manifest; every run and step is tracked in MLflow.

Ray starts only when a step needs computing, so a fully cached run never starts it. By default
Ray is private to this process (`address="local"`): a cluster started on the same machine with
`ray start` is never joined by accident; `address=` (or RAY_ADDRESS) attaches to one.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from difforge.platform import datasets as ds_mod
from difforge.platform.context import JobContext, MapContext
from difforge.platform.datasets import Dataset, ShardWriter, attempt_id, join
from difforge.platform.errors import DifforgeError, Problem, SpecError, StepFailed
from difforge.platform.operator import MAIN, JobOperator, SourceOperator, StepOutcome
from difforge.platform.plan import Plan, PlannedStep, build_plan
from difforge.platform.resources import Fitted, fit
from difforge.platform.spec import LoadedSpec, PipelineSpec, load_spec
from difforge.platform.tracking import StepTracker, Tracker, git_commit

if TYPE_CHECKING:
    import pyarrow as pa

log = logging.getLogger("difforge")

STATS = "__stats__"
RESUMABLE_SHARDS = "_work/shards"  # where resumable operators keep finished shards


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
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]

        def fmt(r: list[str]) -> str:
            return "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()

        lines = [fmt(head), fmt(["-" * w for w in widths]), *map(fmt, rows)]
        return "\n".join(lines)


class RayRuntime:
    """Starts Ray on first use; shuts it down only if it started it."""

    def __init__(self, address: str | None):
        self.address = address or os.environ.get("RAY_ADDRESS") or "local"
        self.started = False

    def ensure(self) -> dict[str, float]:
        import ray

        if not ray.is_initialized():
            log.info("starting Ray (address=%s)", self.address)
            main = threading.current_thread() is threading.main_thread()
            previous = signal.getsignal(signal.SIGTERM) if main else None
            ray.init(
                address=self.address,
                include_dashboard=False,
                logging_level=logging.WARNING,
                configure_logging=True,
            )
            # ray.init makes SIGTERM exit at once; keep the caller's handler (the CLI ends the
            # run like Ctrl-C, so its MLflow runs say KILLED) where there was one.
            if callable(previous):
                signal.signal(signal.SIGTERM, previous)
            self.started = True
            from ray.data import DataContext

            ctx = DataContext.get_current()
            ctx.enable_progress_bars = True
        return dict(ray.cluster_resources())

    def shutdown(self) -> None:
        if self.started:
            import ray

            ray.shutdown()
            self.started = False


def _write_outputs(
    result: pa.Table | dict[str, pa.Table],
    writers: dict[str, ShardWriter],
    key: str,
    rows_in: int,
) -> pa.Table:
    """Write a batch's outputs as shards; return a small table describing them."""
    import pyarrow as pa

    tables = result if isinstance(result, dict) else {MAIN: result}
    unknown = set(tables) - set(writers)
    if unknown:
        raise DifforgeError(f"operator returned undeclared outputs: {sorted(unknown)}")
    rows: list[dict[str, Any]] = [
        {"output": STATS, "path": "", "rows": rows_in, "bytes": 0, "schema": ""}
    ]
    for name, table in tables.items():
        if table is None:
            continue
        if table.num_rows == 0:
            entry = {
                "path": "",
                "rows": 0,
                "bytes": 0,
                "schema": ds_mod.encode_schema(table.schema),
            }
        else:
            entry = writers[name].write(table, key)
        rows.append({"output": name, **entry})
    return pa.Table.from_pylist(rows)


class _Worker:
    """Runs on Ray workers: one operator instance per task (or per actor, set up once) that
    turns work items into committed-to-be shards. A source reads its task; a map operator reads
    one input shard and processes it in batches. Reading inside the worker means no separate
    read tasks compete with an actor pool for CPUs, and shard names follow the input's order."""

    def __init__(self, op_cls, params: dict, writers: dict[str, ShardWriter],
                 ctx: MapContext | None, batch_size: int):  # fmt: skip
        self.op = op_cls(op_cls.Params.model_validate(params))
        self.source = issubclass(op_cls, SourceOperator)
        if not self.source:
            self.op.setup(ctx)
        self.writers = writers
        self.batch_size = batch_size

    def _results(self, item: dict):
        if self.source:
            for table in self.op.read(item):
                yield table, 0
            return
        import pyarrow as pa
        import pyarrow.parquet as pq

        fs, path = ds_mod.url_to_fs(item["file"])
        with fs.open(path, "rb") as f:
            for rb in pq.ParquetFile(f).iter_batches(batch_size=self.batch_size):
                batch = pa.Table.from_batches([rb])
                yield self.op.process(batch), batch.num_rows

    def __call__(self, batch: pa.Table) -> pa.Table:
        import pyarrow as pa

        outs = []
        for raw in batch.column("item").to_pylist():
            item = json.loads(raw)
            done = self._done_marker(item)
            if done is not None:
                fs, path = done
                if fs.exists(path):  # written by an earlier, interrupted run
                    outs.append(pa.Table.from_pylist(json.loads(fs.cat_file(path))))
                    continue
            item_outs = []
            for seq, (result, rows_in) in enumerate(self._results(item)):
                key = f"{item['index']:06d}-{seq:04d}"
                item_outs.append(_write_outputs(result, self.writers, key, rows_in))
            table = pa.concat_tables(item_outs) if item_outs else None
            if done is not None and table is not None:
                fs, path = done
                fs.pipe_file(path, json.dumps(table.to_pylist()).encode())
            if table is not None:
                outs.append(table)
        return pa.concat_tables(outs) if outs else _write_outputs({}, self.writers, "", 0)

    def _done_marker(self, item: dict):
        if not getattr(self.op, "resumable", False):
            return None
        fs, root = ds_mod.url_to_fs(self.writers[MAIN].dataset_uri)
        return fs, f"{root}/{RESUMABLE_SHARDS}/item-{item['index']:06d}.done.json"


def _task(*args):
    """A stateless operator as a plain function: Ray Data runs it as tasks, not actors."""

    def run(batch: pa.Table) -> pa.Table:
        return _Worker(*args)(batch)

    return run


class Executor:
    def __init__(self, plan: Plan, tracker: Tracker, ray_runtime: RayRuntime):
        self.plan = plan
        self.tracker = tracker
        self.ray = ray_runtime
        self.run_started = time.time()

    # -- map-shaped steps ------------------------------------------------------------------
    def _run_on_ray(
        self, step: PlannedStep, fitted: Fitted, attempt: str
    ) -> tuple[dict[str, list[dict]], int | None]:
        import ray.data

        params = step.params.model_dump(mode="json")
        if getattr(step.op_cls, "resumable", False):
            attempt = RESUMABLE_SHARDS  # kept across failed runs, under the fingerprint
        writers = {MAIN: ShardWriter(step.uri, attempt)}
        for name in step.op_cls.side_outputs:
            writers[name] = ShardWriter(step.output_uri(name), attempt)
        common: dict[str, Any] = {"batch_format": "pyarrow", "num_cpus": fitted.num_cpus}
        if fitted.num_gpus:
            common["num_gpus"] = fitted.num_gpus
        if issubclass(step.op_cls, SourceOperator):
            items = step.op_cls(step.params).read_tasks(fitted.batch_size)
            ctx, rows_in = None, None
        else:
            source = Dataset(step.inputs[0].uri)
            items = [{"file": uri} for uri in source.file_uris()]
            rows_in = source.num_rows
            ctx = MapContext(
                step=step.id,
                inputs=[r.uri for r in step.inputs],
                work_uri=step.work_uri,
                num_gpus=fitted.num_gpus,
            )
        rows = [{"item": json.dumps({**t, "index": i})} for i, t in enumerate(items)]
        data = ray.data.from_items(rows, override_num_blocks=max(1, len(rows)))
        args = (step.op_cls, params, writers, ctx, fitted.batch_size)
        if getattr(step.op_cls, "stateful", False):
            data = data.map_batches(
                _Worker,
                fn_constructor_args=args,
                batch_size=1,
                compute=ray.data.ActorPoolStrategy(
                    min_size=fitted.min_actors, max_size=fitted.max_actors
                ),
                **common,
            )
        else:
            data = data.map_batches(_task(*args), batch_size=1, **common)
        entries: dict[str, list[dict]] = {name: [] for name in writers}
        for row in data.iter_rows():
            if row["output"] != STATS:
                entries[row["output"]].append(row)
        return entries, rows_in

    # -- job-shaped steps ------------------------------------------------------------------
    def _run_job(
        self, step: PlannedStep, fitted: Fitted, attempt: str, tracker: StepTracker
    ) -> tuple[dict[str, list[dict]], int | None, dict]:
        inputs = [Dataset(r.uri) for r in step.inputs]
        ctx = JobContext(
            step=step.id,
            pipeline=self.plan.name,
            inputs=inputs,
            work_uri=step.work_uri,
            storage=self.plan.storage,
            artifact_uri=join(step.uri, attempt, "artifacts"),
            resources=fitted,
            tracker=tracker,
            writers={
                MAIN: ShardWriter(step.uri, attempt),
                **{n: ShardWriter(step.output_uri(n), attempt) for n in step.op_cls.side_outputs},
            },
        )
        result = step.op_cls(step.params).run(ctx)
        entries = {name: [] for name in ctx.writers}
        entries.update(result.entries or {})
        if result.table is not None:
            entries[MAIN].append(ctx.writers[MAIN].write(result.table, "000000"))
        rows_in = inputs[0].num_rows if inputs else None
        return entries, rows_in, result.metadata or {}

    # -- one step --------------------------------------------------------------------------
    def run_step(self, step: PlannedStep) -> StepSummary:
        producer = {
            "pipeline": self.plan.name,
            "step": step.id,
            "op": step.op,
            "op_version": step.op_cls.version,
        }
        tags = {
            "difforge.pipeline": self.plan.name,
            "difforge.step": step.id,
            "difforge.op": step.op,
            "difforge.op_version": step.op_cls.version,
            "difforge.fingerprint": step.fingerprint,
            "difforge.inputs": json.dumps({r.text: r.fingerprint for r in step.inputs}),
            "difforge.uri": step.uri,
        }
        if step.cached:
            manifest = ds_mod.read_manifest(step.uri)
            run = self.tracker.start_step(step.id, {**tags, "difforge.cached": "true"})
            run.log_metrics({"rows_out": manifest.num_rows, "cached": 1})
            run.end()
            return StepSummary(
                step.id, step.op, None, manifest.num_rows, 0.0, True, step.uri, run_id=run.run_id
            )

        run = self.tracker.start_step(step.id, {**tags, "difforge.cached": "false"})
        try:
            run.log_params(step.params.model_dump(mode="json"), prefix="")
            cluster = self.ray.ensure()
            fitted = fit(step.id, step.resources, cluster, step.op_cls.gpus_when_available)
            if step.forced:
                # forced: start over, checkpoints included
                ds_mod.remove_work(step.work_uri)
                ds_mod.uncommit(step.uri)
                for name in step.op_cls.side_outputs:
                    ds_mod.uncommit(step.output_uri(name))
            attempt = attempt_id()
            t0 = time.time()
            log.info("step %s (%s): running", step.id, step.op)
            metadata: dict[str, Any] = {}
            if step.inputs:
                metadata.update(Dataset(step.inputs[0].uri).metadata)
            if issubclass(step.op_cls, JobOperator):
                entries, rows_in, extra = self._run_job(step, fitted, attempt, run)
                metadata.update(extra)
            else:
                entries, rows_in = self._run_on_ray(step, fitted, attempt)
                inputs = [Dataset(r.uri) for r in step.inputs]
                metadata.update(step.op_cls(step.params).output_metadata(inputs))
            side_rows, sides = {}, {}
            for name in step.op_cls.side_outputs:
                m, _ = ds_mod.commit(
                    step.output_uri(name),
                    entries[name],
                    step.fingerprint,
                    {**producer, "output": name},
                )
                side_rows[name] = m.num_rows
                sides[name] = Dataset(step.output_uri(name), m)
            # the operator's last word: metrics, artifacts, or a refusal (before the commit)
            outcome = StepOutcome(
                rows_in=rows_in,
                rows_out=sum(e["rows"] for e in entries[MAIN]),
                main_files=[join(step.uri, e["path"]) for e in entries[MAIN] if e["path"]],
                sides=sides,
            )
            op_metrics = step.op_cls(step.params).finalize(outcome, run) or {}
            manifest, ours = ds_mod.commit(
                step.uri, entries[MAIN], step.fingerprint, producer, metadata
            )
            if ours:
                ds_mod.remove_stale_attempts(step.uri, manifest, self.run_started)
            seconds = time.time() - t0
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
        except KeyboardInterrupt:
            run.end("KILLED")
            raise
        except DifforgeError:
            run.end("FAILED")
            raise
        except Exception as exc:
            run.end("FAILED")
            raise StepFailed(f"step '{step.id}' ({step.op}) failed: {_cause(exc)}") from exc


def _cause(exc: BaseException) -> str:
    """The user-facing cause of a failure, unwrapped from Ray's task and Ray Data errors.

    A Ray task error carries the remote traceback in its text; the user's own exception is
    its last "SomeError: message" line that is not one of Ray's wrappers.
    """
    chain, inner = [exc], exc
    for _ in range(8):
        nxt = getattr(inner, "cause", None) or inner.__cause__ or inner.__context__
        if nxt is None or nxt is inner:
            break
        chain.append(nxt)
        inner = nxt
    found = []
    for e in chain:
        for line in str(e).splitlines():
            line = line.strip()
            if re.match(r"^[\w.]+(Error|Exception)\b[^:]*:", line) and not line.startswith("ray."):
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
) -> RunSummary:
    """Run a pipeline; return a summary of each step (rows, seconds, cached, output URI).

    `source` is a YAML path, YAML text, a dict or a PipelineSpec. `overrides` are `--set`
    strings (`STEP.params.FIELD=VALUE`). `tags` go on the pipeline's MLflow run (the
    scheduler and `difforge submit` mark their runs with them).
    """
    loaded = source if isinstance(source, LoadedSpec) else load_spec(source, overrides)
    if loaded.spec.matrix:
        raise SpecError([Problem("this pipeline declares a matrix: run it as a sweep "
                                 "(`difforge run` does; from Python, difforge.sweep)", loaded.file)])  # fmt: skip
    plan = build_plan(loaded, until=until, force=force)
    spec = loaded.spec
    own_runtime = runtime is None
    runtime = runtime or RayRuntime(address)
    t0 = time.time()

    def start_tracking() -> tuple[Tracker, StepTracker]:
        tracker = Tracker(spec.tracking.uri, spec.tracking.experiment or spec.name)
        parent = tracker.start_pipeline(
            spec.name,
            {
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
            if any(not s.cached for s in plan.steps):
                runtime.ensure()
            tracker, parent = tracking.result()
        executor = Executor(plan, tracker, runtime)
        for step in plan.steps:
            summaries.append(executor.run_step(step))
            s = summaries[-1]
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
    return RunSummary(
        spec.name, parent.run_id, tracker.uri, tracker.experiment, summaries, total, status
    )
