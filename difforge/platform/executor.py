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
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from difforge.platform import datasets as ds_mod
from difforge.platform.columns import type_problems
from difforge.platform.context import FinalizeContext, JobContext
from difforge.platform.datasets import Dataset, join
from difforge.platform.errors import DifforgeError, Problem, SpecError, StepFailed
from difforge.platform.events import Observers, RunObserver, StepLog
from difforge.platform.failures import cause, failed_step
from difforge.platform.fusion import passes
from difforge.platform.leases import Lease, claim
from difforge.platform.lineage import nodes_seen, saw_nodes, this_node
from difforge.platform.operator import (
    MAIN,
    JobOperator,
    StepOutcome,
    required_columns,
)
from difforge.platform.outputs import Output, new_attempt
from difforge.platform.passes import PassStep, keeps_progress, output_names, run_map_pass
from difforge.platform.plan import Plan, PlannedStep, build_plan
from difforge.platform.progress import quiet_libraries
from difforge.platform.resources import Fitted, demand, fit
from difforge.platform.runtime import RayRuntime
from difforge.platform.show import text_table
from difforge.platform.spec import LoadedSpec, PipelineSpec, load_spec
from difforge.platform.tracking import MlflowObserver

log = logging.getLogger("difforge")


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
    kind: str = "map"  # the operator's kind

    def line(self) -> str:
        """The one line a step ends with on the console. Rows flow through a source, map or
        filter step (its rate is rows/s); a job reads its input whole, as often as it likes (a
        training step's own throughput is its `samples_per_s` metric)."""
        if self.cached:
            return f"step {self.step} ({self.op}): cached, {self.rows_out} rows"
        sides = "".join(f" (+{n} {k})" for k, n in self.side_rows.items())
        head = f"step {self.step} ({self.op}): {self.rows_out} rows{sides} in {self.seconds:.1f}s"
        if self.kind == "job":
            return head + (f", from {self.rows_in:,} input rows" if self.rows_in else "")
        rows = self.rows_in if self.rows_in is not None else self.rows_out
        return head + (f", {rows / self.seconds:,.0f} rows/s" if self.seconds > 0 and rows else "")


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


@dataclass
class _Started:
    """A step whose MLflow run is open and whose work is about to run."""

    step: PlannedStep
    log: StepLog
    fitted: Fitted
    attempt: str
    lease: Lease


class Executor:
    """Runs a plan's passes in order and commits each step; tells `events` what happens."""

    def __init__(self, plan: Plan, events: RunObserver, ray_runtime: RayRuntime, fuse: bool = True):
        self.plan = plan
        self.events = events
        self.ray = ray_runtime
        self.fuse = fuse
        self.run_started = time.time()

    def passes(self) -> list[list[PlannedStep]]:
        return passes(self.plan.steps, self.fuse)

    # -- job-shaped steps ------------------------------------------------------------------
    def _run_job(
        self, step: PlannedStep, fitted: Fitted, attempt: str, step_log: StepLog
    ) -> tuple[dict[str, list[dict]], int | None, dict]:
        inputs = [Dataset(r.uri) for r in step.inputs]
        if inputs:
            problems = type_problems(inputs[0].schema, required_columns(step.operator))
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
            log=step_log,
            outputs={name: Output(step.output_uri(name), attempt) for name in output_names(step)},
        )
        result = step.operator.run(ctx)
        entries = {name: [] for name in ctx.outputs}
        entries.update(result.entries or {})
        if result.table is not None:
            # cut into enough shards for the next step's pass to use every core
            entries[MAIN] += ctx.outputs[MAIN].write_batch(result.table, "000000", spread=True)
        rows_in = inputs[0].num_rows if inputs else None
        return entries, rows_in, result.metadata or {}

    # -- steps -----------------------------------------------------------------------------
    def _cached(self, step: PlannedStep) -> StepSummary:
        rows = ds_mod.read_manifest(step.uri).num_rows
        run_id = self.events.step_cached(step, rows)
        return StepSummary(step.id, step.op, None, rows, 0.0, True, step.uri, run_id=run_id)

    def _start(self, step: PlannedStep, fused_with: list[str], fresh: bool) -> _Started:
        step_log = self.events.step_started(step, fused_with)
        try:
            cluster = self.ray.ensure()
            fitted = fit(step.id, step.resources, cluster, step.op_cls.gpus_when_available)
            stateful = getattr(step.op_cls, "stateful", False)
            needs = demand(step.op_cls.kind, stateful, step.resources, fitted)
            self.ray.wait_for_nodes(step.id, needs, cluster)  # an autoscaling one grows
            ran_on = "cuda" if fitted.num_gpus else "cpu"
            if step.device is not None and step.device != ran_on:
                raise DifforgeError(
                    f"step '{step.id}' ({step.op}): its `auto` precision was planned for "
                    f"{step.device} (part of its fingerprint) but it would run on {ran_on}; set "
                    f"DIFFORGE_DEVICE_CLASS={ran_on}, or an explicit dtype/precision"
                )
            # its own work folder: an ended attempt's, to resume, else a new one; forced (or
            # in a pass with a forced step): a new one, checkpoints not reused. The old commit
            # stays visible until the new one replaces it
            lease = claim(step.work_root, fresh=fresh)
            step.work = lease.uri
            if lease.resumed:
                log.debug("step %s: resuming in %s", step.id, lease.uri)
        except BaseException as exc:
            self.events.step_ended(
                step, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
            )
            raise
        return _Started(step, step_log, fitted, new_attempt(), lease)

    def run_pass(self, group: list[PlannedStep]) -> list[StepSummary]:
        """Run one pass: a cached step, a job, or one Ray Data pass over a chain of map steps
        (each step still committed, finalized and tracked as its own)."""
        if group[0].cached:
            return [self._cached(group[0])]
        ids = [s.id for s in group]
        keep = keeps_progress(group)  # then a failed attempt's files stay, for the rerun
        started: list[_Started] = []
        done: list[StepSummary] = []
        fresh = any(s.forced for s in group)  # a pass's kept results include the forced step's
        try:
            for step in group:
                started.append(self._start(step, ids, fresh))
            t0 = time.time()
            if len(group) > 1:
                log.info(
                    "steps %s: running in one pass", ", ".join(f"{s.id} ({s.op})" for s in group)
                )
            else:
                log.info("step %s (%s): running", group[0].id, group[0].op)
            with nodes_seen() as nodes:  # the Ray nodes the work reports, for lineage
                results = self._work(started, t0)
            for s, (entries, rows_in, seconds, extra) in zip(started, results, strict=True):
                done.append(self._finish(s, entries, rows_in, seconds, extra, sorted(nodes)))
            return done
        except BaseException as exc:
            status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
            for s in started[len(done) :]:
                self.events.step_ended(s.step, status)
                if not keep:  # what this attempt wrote is of no use now
                    for name in output_names(s.step):
                        Output(s.step.output_uri(name), s.attempt).abort()
            ray = sys.modules.get("ray")  # a worker's error (Ray's type subclasses the user's)
            from_worker = ray is not None and isinstance(exc, ray.exceptions.RayError)
            if isinstance(exc, KeyboardInterrupt) or (
                isinstance(exc, DifforgeError) and not from_worker
            ):
                raise
            failed = failed_step(exc, group) if len(done) == 0 else started[len(done)].step
            where = f" (in one pass with {', '.join(ids)})" if len(group) > 1 else ""
            raise StepFailed(
                f"step '{failed.id}' ({failed.op}){where} failed: {cause(exc)}"
            ) from exc
        finally:
            for s in started:  # its work folder is free: to resume, or for gc
                s.lease.release()
            self.ray.release_nodes()  # the autoscaler may scale the step's nodes down

    def _work(self, started: list[_Started], t0: float) -> list[tuple]:
        """A pass's work: a job, or one Ray Data pass over a chain of map steps; per step its
        entries by output, rows in, seconds and its output's metadata (a job's own)."""
        head = started[0]
        if issubclass(head.step.op_cls, JobOperator):
            saw_nodes([this_node()])  # a job works on the driver too
            entries, rows_in, extra = self._run_job(head.step, head.fitted, head.attempt, head.log)
            return [(entries, rows_in, time.time() - t0, extra)]
        entries_k, rows_k, work, metadata_k, resumed = run_map_pass(
            [PassStep(s.step, s.fitted, s.attempt) for s in started]
        )
        if resumed:
            for s in started:
                s.log.log_metrics({"input_shards_resumed": resumed})
        wall, total = time.time() - t0, sum(work)
        # the pass's wall time, split by each step's share of the measured work
        shares = [w / total if total > 0 else 1 / len(work) for w in work]
        per_step = zip(entries_k, rows_k, shares, metadata_k, strict=True)
        return [(e, r, wall * f, m) for e, r, f, m in per_step]

    def _finish(
        self,
        s: _Started,
        entries: dict[str, list[dict]],
        rows_in: int | None,
        seconds: float,
        extra: dict,
        nodes: list[str] | None = None,
    ) -> StepSummary:
        """Commit a step's outputs (side outputs, then the operator's last word, then the main
        output), log its metrics and end its run."""
        step = s.step
        t0 = time.time()
        rows_out = _checked_rows(step, entries[MAIN])
        producer = self._producer(s, nodes)
        outputs = {name: Output(step.output_uri(name), s.attempt) for name in output_names(step)}
        commit = {"replace": step.forced, "stale_before": self.run_started}
        side_rows, sides = {}, {}
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
        op_metrics = step.operator.finalize(
            outcome, FinalizeContext(step.id, self.plan.name, s.log)
        )
        manifest, _ = outputs[MAIN].commit(
            entries[MAIN], step.fingerprint, producer, _metadata(step, extra), **commit
        )
        seconds += time.time() - t0
        counts = {"rows_out": manifest.num_rows, "rows_in": rows_in, "sides": side_rows}
        metrics = _step_metrics(step, counts, seconds, op_metrics or {})
        self.events.step_finished(step, metrics, manifest.model_dump(mode="json"))
        return StepSummary(
            step.id,
            step.op,
            rows_in,
            manifest.num_rows,
            seconds,
            False,
            step.uri,
            side_rows,
            s.log.run_id,
            step.op_cls.kind,
        )

    def _producer(self, s: _Started, nodes: list[str] | None) -> dict[str, Any]:
        """Who made a dataset, in its manifest: pipeline, step, operator, device, nodes."""
        step = s.step
        producer = {
            "pipeline": self.plan.name,
            "step": step.id,
            "op": step.op,
            "op_version": step.op_cls.version,
            "device": "cuda" if s.fitted.num_gpus else "cpu",
            "nodes": nodes or [],  # the Ray nodes its work ran on
        }
        if step.device is not None:  # what its `auto` precision resolved to
            producer["auto_precision"] = "bfloat16" if step.device == "cuda" else "float32"
        return producer


def _checked_rows(step: PlannedStep, main: list[dict]) -> int:
    """The rows of a step's main output: fewer than its min_rows fail it; none is a warning."""
    rows_out = sum(e["rows"] for e in main)
    if step.min_rows is not None and rows_out < step.min_rows:
        raise DifforgeError(
            f"step '{step.id}' ({step.op}) wrote {rows_out} rows, fewer than its "
            f"min_rows: {step.min_rows}; nothing was committed"
        )
    if rows_out == 0:
        log.warning(
            "step %s (%s): its output has 0 rows (set min_rows to make this an error)",
            step.id,
            step.op,
        )
    return rows_out


def _metadata(step: PlannedStep, extra: dict) -> dict[str, Any]:
    """The main output's manifest metadata: its main input's, then what its work computed (a
    map pass: its input's and the operator's `metadata`, computed once as the pass began; a
    job: what it returned)."""
    metadata: dict[str, Any] = {}
    if step.inputs:
        metadata.update(Dataset(step.inputs[0].uri).metadata)
    return {**metadata, **extra}


def _step_metrics(
    step: PlannedStep, counts: dict[str, Any], seconds: float, op_metrics: dict[str, float]
) -> dict[str, float]:
    """A computed step's MLflow metrics: rows out (and in, and per side output), seconds, the
    operator's own, and its rate (which no operator's metric of that name overrides)."""
    rows_out, rows_in = counts["rows_out"], counts["rows_in"]
    metrics = {
        "rows_out": rows_out,
        "seconds": seconds,
        "cached": 0,
        **{f"rows_{k}": v for k, v in counts["sides"].items()},
        **op_metrics,
    }
    if rows_in is not None:
        metrics["rows_in"] = rows_in
    if rows_in is not None or rows_out:
        rows = rows_in if rows_in is not None else rows_out
        metrics["rows_per_s"] = rows / seconds if seconds > 0 else 0.0
        metrics[f"{step.operator.rows_are}_per_s"] = metrics["rows_per_s"]
    return metrics


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
    observers: list[RunObserver] | None = None,
) -> RunSummary:
    """Run a pipeline; return a summary of each step (rows, seconds, cached, output URI).

    `source` is a YAML path, YAML text, a dict or a PipelineSpec. `overrides` are `--set`
    strings (`STEP.params.FIELD=VALUE`). `tags` go on the pipeline's MLflow run (the
    scheduler and `difforge submit` mark their runs with them). `fuse=False` (or
    DIFFORGE_FUSE=0) runs every step in a pass of its own, never fused with its input.
    `observers` hear the run's events (`difforge.platform.events`) beside MLflow's tracking.
    """
    loaded = source if isinstance(source, LoadedSpec) else load_spec(source, overrides)
    if loaded.spec.matrix:
        raise SpecError(
            [
                Problem(
                    "this pipeline declares a matrix: run it as a sweep "
                    "(`difforge run` does; from Python, difforge.sweep)",
                    loaded.file,
                )
            ]
        )
    from difforge.models.resolve import set_registry

    set_registry(loaded.spec.tracking.uri)  # where `models:/` references are pinned and found
    plan = build_plan(loaded, until=until, force=force)
    spec = loaded.spec
    if fuse is None:
        fuse = os.environ.get("DIFFORGE_FUSE", "1") != "0"
    t0 = time.time()
    quiet_libraries()  # the libraries' own logs go to a file (-v: to the console)
    tracking = MlflowObserver(
        spec.tracking.uri,
        spec.tracking.experiment or spec.name,
        {"difforge.file": loaded.file, **(tags or {})},
    )
    events = Observers(tracking, *(observers or []))
    settings_ = {"until": until, "force": force, **(params or {})}
    opening = _opening(plan, settings_)
    summaries, status, total = _execute(plan, events, runtime, address, fuse, opening, t0)
    order = {s.id: i for i, s in enumerate(plan.steps)}  # the pipeline's order, not the passes'
    summaries.sort(key=lambda s: order[s.step])
    return RunSummary(
        spec.name, events.run_id, tracking.uri, tracking.experiment, summaries, total, status
    )


def _opening(plan: Plan, settings_: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """What the pipeline's run starts with: its params (the pipeline, storage, overrides and
    the run's settings) and files (the resolved plan, the YAML as written)."""
    loaded = plan.loaded
    params = {
        "pipeline": plan.name,
        "storage": plan.storage,
        "overrides": loaded.overrides,
        **settings_,
    }
    files = {"resolved.json": json.dumps(plan.resolved(), indent=2)}
    if loaded.text is not None:
        files["pipeline.yaml"] = loaded.text
    return params, files


def _execute(
    plan: Plan,
    events: Observers,
    runtime: RayRuntime | None,
    address: str | None,
    fuse: bool,
    opening: tuple[dict[str, Any], dict[str, str]],
    t0: float,
) -> tuple[list[StepSummary], str, float]:
    """Run a plan's passes, its events told to `events`: the pipeline's run opened (with its
    settings and files) while Ray starts, if some step must run (Ray starts only then); ended
    whatever happens. Returns the step summaries, in the order the passes ran, the status and
    the seconds since `t0` when it ended."""
    own_runtime = runtime is None
    runtime = runtime or RayRuntime(address)
    summaries: list[StepSummary] = []
    status, total = "FAILED", 0.0
    started = False
    try:
        with ThreadPoolExecutor(1) as pool:
            opened = pool.submit(events.pipeline_started, plan, *opening)
            try:
                if any(not s.cached for s in plan.steps):
                    runtime.ensure()
                    runtime.check_storage(plan.storage)  # on several nodes: one they all see
            finally:  # the pipeline's run exists either way, and is ended below
                opened.result()
                started = True
        executor = Executor(plan, events, runtime, fuse=fuse)
        for group in executor.passes():
            for s in executor.run_pass(group):
                summaries.append(s)
                log.info("%s", s.line())
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        total = time.time() - t0
        try:
            if started:
                cached = sum(s.cached for s in summaries)
                events.pipeline_ended(status, {"seconds": total, "steps_cached": cached})
        finally:
            if own_runtime:
                runtime.shutdown()
    return summaries, status, total
