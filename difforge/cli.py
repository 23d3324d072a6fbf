"""The `difforge` command. Thin: parses arguments and calls difforge.platform and difforge.jobs.

Heavy libraries are imported inside the commands that need them, so `difforge --help` and
`difforge validate` answer fast. A user's mistake prints a message, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from typing import Any

from difforge.platform.errors import DifforgeError


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="pipeline YAML")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="STEP.params.FIELD=VALUE",
        help="override a value (repeatable; dotted paths into nested params)",
    )
    p.add_argument("--until", metavar="STEP", help="run only this step and what it needs")
    p.add_argument(
        "--force",
        action="append",
        default=[],
        metavar="STEP",
        help="recompute this step and everything downstream of it (repeatable)",
    )


def _cluster(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cluster", help="Ray dashboard URL, http://HEAD:8265 (DIFFORGE_CLUSTER)")


def _tags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tag",
        dest="tags",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a tag on the pipeline's MLflow run (repeatable)",
    )


def _parse_tags(items: list[str]) -> dict[str, str]:
    tags = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise DifforgeError(f"--tag {item}: expected KEY=VALUE")
        tags[key] = value
    return tags


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="difforge",
        description="Declarative pipelines for diffusion models: curate, encode, train, "
        "distill, sample, evaluate. On Ray, tracked in MLflow.",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="show Ray's, Ray Data's, Ray Train's and MLflow's own logs and progress bars",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("run", help="run a pipeline (embedded Ray unless --address)")
    _common(p)
    p.add_argument(
        "--address", help="attach to this Ray cluster (default: a private local Ray; RAY_ADDRESS)"
    )
    _tags(p)
    p.add_argument("--env-file", help="load environment variables (KEY=VALUE lines) before running")
    p.add_argument(
        "--require-env",
        action="append",
        default=[],
        metavar="NAME",
        help="fail before the first step unless NAME is in the environment",
    )
    p.add_argument("--submitted", action="store_true", help=argparse.SUPPRESS)  # a job's driver

    p = sub.add_parser("submit", help="submit a run to a Ray cluster through the Ray Jobs API")
    _common(p)
    _cluster(p)
    _tags(p)
    p.add_argument(
        "--env",
        dest="forward_env",
        action="append",
        default=[],
        metavar="NAME",
        help="a variable the job needs from the cluster's own environment, e.g. "
        "AWS_SECRET_ACCESS_KEY (repeatable; checked on the cluster before the first step; "
        "its value never travels with the job)",
    )
    p.add_argument("--pip", action="append", default=[], help="extra pip package for the job")
    p.add_argument("--wait", action="store_true", help="follow the logs until the job ends")

    jobs = sub.add_parser("jobs", help="list, follow and stop jobs on a Ray cluster")
    jsub = jobs.add_subparsers(dest="jobs_command", metavar="ACTION", required=True)
    _cluster(jsub.add_parser("list", help="every job on the cluster"))
    for name, text in (("status", "one job's status"), ("stop", "stop a running job")):
        q = jsub.add_parser(name, help=text)
        q.add_argument("job_id")
        _cluster(q)
    q = jsub.add_parser("logs", help="a job's driver log")
    q.add_argument("job_id")
    q.add_argument("--follow", "-f", action="store_true", help="stream until the job ends")
    _cluster(q)

    sched = sub.add_parser("schedule", help="recurring runs: add, list, pause, resume, remove")
    ssub = sched.add_subparsers(dest="schedule_command", metavar="ACTION", required=True)
    q = ssub.add_parser("add", help="run a pipeline on a cron schedule")
    q.add_argument("name")
    q.add_argument("file", help="pipeline YAML (read at each firing, so edits apply)")
    q.add_argument("--cron", required=True, help='"0 3 * * *"; a 6th field is seconds')
    q.add_argument("--timezone", default="UTC", help="IANA time zone of the cron (UTC)")
    q.add_argument("--cluster", help="submit to this Ray cluster (default: run locally)")
    q.add_argument(
        "--overlap",
        choices=["skip", "allow"],
        default="skip",
        help="skip: no new run while the previous one runs (default)",
    )
    q.add_argument(
        "--catchup",
        choices=["none", "latest", "all"],
        default="latest",
        help="slots missed while the scheduler was down: run none, the latest (default) or all",
    )
    q.add_argument(
        "--on-failure",
        help="shell command run when a firing fails "
        "(DIFFORGE_SCHEDULE, DIFFORGE_SLOT, DIFFORGE_JOB_ID, DIFFORGE_MESSAGE set)",
    )
    q.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="STEP.params.FIELD=VALUE"
    )
    q.add_argument(
        "--env",
        dest="forward_env",
        action="append",
        default=[],
        metavar="NAME",
        help="a variable cluster runs need from the cluster's environment",
    )
    ssub.add_parser("list", help="schedules with their next firing")
    for name, text in (("pause", "stop firing"), ("resume", "fire again"), ("remove", "delete")):
        ssub.add_parser(name, help=text).add_argument("name")
    q = ssub.add_parser("history", help="every firing of a schedule: slot, job, outcome")
    q.add_argument("name")
    for q in ssub.choices.values():
        q.add_argument("--store", help="schedule store URL (DIFFORGE_SCHEDULES; default SQLite)")

    p = sub.add_parser("scheduler", help="the service that fires schedules (SIGTERM stops it)")
    p.add_argument("--store", help="schedule store URL (DIFFORGE_SCHEDULES; default SQLite)")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between passes")
    p.add_argument(
        "--grace",
        type=float,
        default=60.0,
        help="a slot later than this is missed and follows --catchup",
    )

    p = sub.add_parser("validate", help="dry run: print the resolved plan, or every error")
    _common(p)
    p.add_argument("--json", action="store_true", help="print the resolved plan as JSON")

    p = sub.add_parser(
        "schema",
        help="print the JSON Schema of a pipeline, every operator's params included (for "
        "editors: the shipped pipelines name schema/pipeline.schema.json)",
    )
    p.add_argument(
        "--builtin",
        action="store_true",
        help="difforge's own operators only, no plugins (how schema/pipeline.schema.json is made)",
    )

    p = sub.add_parser("ops", help="list operators with their parameters")
    p.add_argument("name", nargs="?", help="show one operator")

    p = sub.add_parser("show", help="print a committed dataset's manifest, schema and rows")
    p.add_argument("uri")
    p.add_argument("--rows", type=int, default=5)
    p.add_argument("--grid", help="write a grid of its images to this PNG (default: a temp file)")

    p = sub.add_parser("sample", help="draw samples from a trained model, without a pipeline")
    p.add_argument("model", help="a model folder (local or s3://) or models:/NAME/VERSION")
    p.add_argument("--n", type=int, default=16, help="images to draw")
    p.add_argument("--class", dest="label", type=int, help="class to draw (default: all, in turn)")
    p.add_argument(
        "--prompt",
        action="append",
        help="a text model's prompt (repeat for several, drawn in turn)",
    )
    p.add_argument("--negative-prompt", help="guide away from this text instead of the null")
    p.add_argument("--steps", type=int, help="sampling steps (default: the model's own, else 25)")
    p.add_argument("--guidance", type=float, default=2.0, help="classifier-free guidance scale")
    p.add_argument(
        "--scheduler",
        default=None,
        choices=["ddpm", "ddim", "dpm_solver_pp", "euler", "heun", "lcm"],
        help="default: the model's (ddim; euler for a flow-matching model, lcm for a "
        "consistency student)",
    )
    p.add_argument(
        "--training-step",
        type=int,
        default=None,
        help="the model as it was at this training step (exported with export_every)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="samples", help="folder for the PNGs and grid.png")
    p.add_argument(
        "--weights",
        default="ema",
        choices=["ema", "model", "adapter"],
        help="EMA weights where saved; raw ones; or a fine-tune's adapter on its parent",
    )

    p = sub.add_parser("models", help="list the models pipelines registered in MLflow")
    p.add_argument("name", nargs="?", help="only this registered model (all versions)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: the local store)")

    p = sub.add_parser("report", help="compare a sweep's variants (or an experiment's runs)")
    p.add_argument("target", help="a sweep's MLflow run id, a pipeline run id, or an experiment")
    p.add_argument("--out", help="folder for report.md and its plots (default reports/NAME)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: the local store)")
    p.add_argument("--no-log", action="store_true", help="do not log the report to MLflow")

    p = sub.add_parser(
        "gc", help="remove unused attempt folders, finished work folders and old versions"
    )
    p.add_argument("storage", help="a storage root (or any folder under it): a path or s3://...")
    p.add_argument(
        "--older-than",
        default="24h",
        type=_duration,
        help="leave anything younger than this alone (90s, 30m, 24h, 7d; default 24h)",
    )
    p.add_argument(
        "--keep-last",
        type=int,
        metavar="N",
        help="keep only each step's N newest committed versions",
    )
    p.add_argument("--dry-run", action="store_true", help="print what would go; remove nothing")

    p = sub.add_parser("ui", help="serve the MLflow UI for the local store on 127.0.0.1")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5000)
    return parser


def _duration(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        if text[-1:] in units:
            return float(text[:-1]) * units[text[-1]]
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a duration: {text!r} (try 90s, 30m, 24h, 7d)"
        ) from None


def _print_plan(plan: Any) -> None:
    from difforge.platform.fusion import passes

    print(f"pipeline {plan.name}: {len(plan.steps)} steps, storage {plan.storage}")
    width = max(len(s.id) for s in plan.steps)
    opw = max(len(s.op) for s in plan.steps)
    fused = {s.id: g[0].id for g in passes(plan.steps) if len(g) > 1 for s in g[1:]}
    for s in plan.steps:
        state = "forced" if s.forced else ("cached" if s.cached else "to run")
        ins = ", ".join(r.text for r in s.inputs) or "-"
        note = f"  (in one pass with {fused[s.id]})" if s.id in fused else ""
        print(
            f"  {s.id.ljust(width)}  {s.op.ljust(opw)}  {s.fingerprint}  {state:7}  <- {ins}{note}"
        )


def _print_sweep(sweep: Any, until: str | None, force: list[str]) -> None:
    from difforge.platform.plan import build_plan
    from difforge.platform.sweep import shared_steps

    plans = {
        v.name: build_plan(sweep.variant_spec(v), until=until, force=force) for v in sweep.variants
    }
    first = next(iter(plans.values()))
    n = len(plans)
    print(f"sweep {first.name}: {n} variants, storage {first.storage}")
    for name, plan in plans.items():
        todo = sum(not s.cached for s in plan.steps)
        print(f"  {name}: {len(plan.steps) - todo} cached, {todo} to run")
    print("steps:")
    for step_id, distinct in shared_steps(plans).items():
        what = f"shared by all {n}: computed once" if distinct == 1 else f"{distinct} distinct"
        print(f"  {step_id:20} {what}")


def cmd_validate(args: argparse.Namespace) -> int:
    import difforge
    from difforge.platform.sweep import load_sweep

    sweep = load_sweep(args.file, args.overrides)
    if sweep is not None:
        _print_sweep(sweep, args.until, args.force)
        print(f"ok: {len(sweep.variants)} valid variants")
        return 0
    plan = difforge.plan(args.file, args.overrides, until=args.until, force=args.force)
    if args.json:
        print(json.dumps(plan.resolved(), indent=2))
    else:
        _print_plan(plan)
        todo = sum(not s.cached for s in plan.steps)
        print(f"ok: {len(plan.steps) - todo} cached, {todo} to run")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    import signal

    from difforge.platform.executor import run

    def terminate(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt  # `ray job stop` and schedulers send SIGTERM: end like Ctrl-C

    signal.signal(signal.SIGTERM, terminate)
    if args.env_file:
        from difforge.jobs.cluster import read_env_file

        os.environ.update(read_env_file(args.env_file))
    if args.require_env:
        from difforge.jobs.cluster import require_env

        require_env(args.require_env)
    if args.submitted:
        # a submitted job's driver: Ray may remove the job's working directory (its own copy
        # of the uploaded folder) while the run goes on, and a process whose working directory
        # is gone fails in odd places (torch's oneMKL cannot load, os.getcwd raises); so
        # work from the difforge home instead (the pipeline file by its absolute path)
        from difforge.platform import settings

        args.file = os.path.abspath(args.file)
        os.chdir(settings.home())
    from difforge.platform.spec import load_spec
    from difforge.platform.sweep import run_sweep, sweep_of

    loaded = load_spec(args.file, args.overrides)  # parsed once: a sweep's, or the pipeline
    sweep = sweep_of(loaded, args.file)
    if sweep is not None:
        result = run_sweep(sweep, until=args.until, force=args.force, address=args.address)
        print()
        print(result.table())
        print(
            f"\ndone in {result.seconds:.1f}s. MLflow sweep run {result.run_id} (experiment "
            f"'{result.experiment}'); `difforge report {result.run_id}` compares the variants"
        )
        return 0
    summary = run(
        loaded,
        until=args.until,
        force=args.force,
        address=args.address,
        tags=_parse_tags(args.tags),
    )
    print()
    print(summary.table())
    print()
    print(
        f"done in {summary.seconds:.1f}s. MLflow run {summary.run_id} "
        f"(experiment '{summary.experiment}', {summary.tracking_uri})"
    )
    from difforge.platform.report import headline

    try:
        results, url = headline(summary.tracking_uri, summary.run_id)
    except Exception as exc:  # noqa: BLE001 - the run stands; only its summary is missing
        print(f"(the run's results could not be read back from MLflow: {exc})")
        results, url = [], None
    if results:
        print("result: " + ", ".join(results))
    if url:
        local = summary.tracking_uri.startswith("sqlite:")
        print(f"browse it: {'difforge ui, then ' if local else ''}{url}")
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from difforge.jobs import cluster

    job = cluster.submit(
        args.file,
        args.overrides,
        cluster=args.cluster,
        forward_env=args.forward_env,
        tags=_parse_tags(args.tags),
        pip=args.pip,
        until=args.until,
        force=args.force,
    )
    needs = ", ".join(job.required_env) or "none"
    print(f"submitted job {job.job_id} to {job.cluster} (needs from the cluster's env: {needs})")
    print(f"  follow it:  {job.follow_hint()}")
    print(f"  dashboard:  {job.cluster}/#/jobs/{job.job_id}")
    if not args.wait:
        return 0
    status = cluster.logs(args.cluster, job.job_id, follow=True)
    print(f"job {job.job_id}: {status}")
    return 0 if status == "SUCCEEDED" else 1


def _when(t: float) -> str:
    import time

    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


def cmd_jobs(args: argparse.Namespace) -> int:
    from difforge.jobs import cluster

    if args.jobs_command == "list":
        rows = cluster.list_jobs(args.cluster)
        print(f"{'JOB':44} {'STATUS':10} {'PIPELINE':20} {'STARTED':19} ENDED")
        for r in rows:
            print(
                f"{r['job_id']:44} {r['status']:10} {r['pipeline']:20} "
                f"{_when(r['start']):19} {_when(r['end'])}"
            )
        return 0
    if args.jobs_command == "status":
        info = cluster.job_info(args.cluster, args.job_id)
        print(f"{info['job_id']}: {info['status']}")
        print(
            f"  pipeline: {info['pipeline']}  started {_when(info['start'])}"
            f"  ended {_when(info['end'])}"
        )
        if info["message"]:
            print(f"  {info['message']}")
        return 0 if info["status"] not in ("FAILED", "LOST") else 1
    if args.jobs_command == "logs":
        status = cluster.logs(args.cluster, args.job_id, follow=args.follow)
        if args.follow:
            print(f"job {args.job_id}: {status}")
        return 0
    if args.jobs_command == "stop":
        stopped = cluster.stop(args.cluster, args.job_id)
        print(f"job {args.job_id}: {'stop requested' if stopped else 'was not running'}")
        return 0
    return 2


def cmd_schedule(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from difforge.jobs.schedules import Schedule, Store, slot_text

    store = Store(args.store)
    action = args.schedule_command
    if action == "add":
        import difforge

        file = str(Path(args.file).resolve())
        difforge.load_spec(file, args.overrides)  # refuse a broken pipeline now, not at 3 am
        s = Schedule(
            name=args.name,
            file=file,
            cron=args.cron,
            timezone=args.timezone,
            overrides=tuple(args.overrides),
            cluster=args.cluster,
            forward_env=tuple(args.forward_env),
            overlap=args.overlap,
            catchup=args.catchup,
            on_failure=args.on_failure,
        )
        store.add(s)
        nxt = slot_text(store.get(s.name).next_slot(time.time()), s)
        print(f"schedule {s.name}: {s.cron} ({s.timezone}), next run {nxt}")
        print("  `difforge scheduler` fires it; `difforge schedule history " + s.name + "`")
    elif action == "list":
        rows = store.schedules()
        print(f"{'NAME':20} {'CRON':16} {'TZ':14} {'STATE':7} {'WHERE':26} NEXT")
        for s in rows:
            where = s.cluster or "local"
            state = "paused" if s.paused else "active"
            nxt = "-" if s.paused else slot_text(s.next_slot(time.time()), s)
            print(f"{s.name:20} {s.cron:16} {s.timezone:14} {state:7} {where:26} {nxt}")
    elif action in ("pause", "resume"):
        store.set_paused(args.name, action == "pause")
        print(f"schedule {args.name}: {'paused' if action == 'pause' else 'active'}")
    elif action == "remove":
        store.remove(args.name)
        print(f"schedule {args.name}: removed (its history stays in the store)")
    elif action == "history":
        firings = store.firings(args.name)
        if firings:  # a removed schedule's history stays readable (its slots shown in UTC)
            s = next((x for x in store.schedules() if x.name == args.name), None) or Schedule(
                name=args.name, file="", cron="* * * * *"
            )
        else:
            s = store.get(args.name)
        print(f"{'SLOT':26} {'STATUS':10} {'JOB':48} MESSAGE")
        for f in firings:
            print(
                f"{slot_text(f.slot, s):26} {f.status:10} {(f.job_id or '-'):48} {f.message or ''}"
            )
    return 0


def cmd_scheduler(args: argparse.Namespace) -> int:
    from difforge.jobs.schedules import Scheduler, Store

    scheduler = Scheduler(Store(args.store), grace_s=args.grace)
    scheduler.serve(interval=args.interval)
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from difforge.platform.schema import builtin_names, pipeline_schema

    print(json.dumps(pipeline_schema(builtin_names() if args.builtin else None), indent=2))
    return 0


def cmd_ops(args: argparse.Namespace) -> int:
    from difforge.platform import registry
    from difforge.platform.opdoc import columns_line, param_rows

    names = [args.name] if args.name else registry.names()
    for name in names:
        op = registry.get(name)
        print(f"{name}  (v{op.version}, {op.kind})  {op.description()}")
        # nested params under their parent's name, with their choices and defaults
        for field, kind, default, desc in param_rows(op.Params):
            shown = (
                ""
                if not default
                else " (required)"
                if default == "required"
                else f" (default {default})"
            )
            print(f"    {field}: {kind}{shown}{'  ' + desc if desc else ''}")
        if args.name:
            print(f"    {columns_line(op).lower()}")
            if op.side_outputs:
                print(f"    side outputs: {', '.join(op.side_outputs)}")
            print(f"    resources: {op.resources.model_dump(exclude_none=True)}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from difforge.platform.datasets import open_dataset
    from difforge.platform.show import describe, write_grid

    ds = open_dataset(args.uri)
    print(describe(ds, args.rows))
    if "image" in ds.manifest.column_names and ds.num_rows:
        path = write_grid(ds, args.grid)
        print(f"\nimage grid: {path}")
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    from difforge.platform.gc import collect_garbage

    report = collect_garbage(args.storage, args.older_than, args.keep_last, args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    for path in report.removed:
        print(f"{verb} {path}")
    print(f"{verb} {len(report.removed)} folder(s); {report.kept} committed dataset(s) kept")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from pathlib import Path

    from difforge.diffusion.generate import Generator
    from difforge.platform.errors import DifforgeError
    from difforge.platform.show import grid

    gen = Generator(args.model, args.weights, args.training_step)
    if gen.text != bool(args.prompt):
        raise DifforgeError(
            "--prompt: the model is text-conditional: give one"
            if gen.text
            else "--prompt: the model is not text-conditional (--class instead)"
        )
    if args.label is not None and not 0 <= args.label < max(gen.num_classes, 1):
        raise DifforgeError(f"--class {args.label}: the model has {gen.num_classes} classes")
    seeds = [args.seed + i for i in range(args.n)]
    labels = prompts = None
    if gen.text:
        prompts = [args.prompt[i % len(args.prompt)] for i in range(args.n)]
    elif args.label is not None:
        labels = [args.label] * args.n
    drawn = gen.draw(
        seeds,
        labels,
        prompts,
        [args.negative_prompt] * args.n,
        args.steps,
        args.guidance,
        args.scheduler,
    )
    images = drawn.images
    how = f"{drawn.steps} {drawn.scheduler} steps, guidance " + (
        f"{drawn.guidance[0]} (built into the model)"
        if drawn.built_in_guidance
        else f"{args.guidance}"
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if gen.text:
        from difforge.platform.show import captioned

        for i, img in enumerate(images):
            img.save(out / f"{i:05d}.png")
        shown = [
            (t, grid([im for im, q in zip(images, prompts, strict=True) if q == t], columns=8))
            for t in dict.fromkeys(prompts)
        ]
        captioned(shown, scale=4).save(out / "grid.png")
        print(f"{args.n} images ({len(shown)} prompt(s), {how}) in {out}/, grid: {out}/grid.png")
        return 0
    names = gen.info.get("classes") or []
    for i, (img, y) in enumerate(zip(images, drawn.labels, strict=True)):
        img.save(out / f"{i:05d}-class{y}.png")
    g = grid(images, columns=min(8, args.n))
    g.resize((g.width * 4, g.height * 4), 0).save(out / "grid.png")
    what = f"class {names[args.label] if names and args.label is not None else args.label}"
    print(
        f"{args.n} images ({what if args.label is not None else 'all classes'}, {how}) "
        f"in {out}/, grid: {out}/grid.png"
    )
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    import time

    from mlflow import MlflowClient

    from difforge.platform import settings
    from difforge.platform.show import text_table

    client = MlflowClient(args.tracking_uri or settings.default_tracking_uri())
    query = f"name = '{args.name}'" if args.name else ""
    versions = sorted(client.search_model_versions(query), key=lambda v: (v.name, -int(v.version)))
    if not args.name:  # the latest version of each model
        latest: dict[str, object] = {}
        for v in versions:
            latest.setdefault(v.name, v)
        versions = list(latest.values())
    if not versions:
        print(
            f"no registered models{' named ' + args.name if args.name else ''} in "
            f"{args.tracking_uri or settings.default_tracking_uri()}"
        )
        return 1 if args.name else 0
    rows = []
    for v in versions:
        t = v.tags
        figures = ", ".join(
            f"{k.removeprefix('metric.')} {x}"
            for k, x in sorted(t.items())
            if k.startswith("metric.")
        )
        rows.append(
            [
                f"models:/{v.name}/{v.version}",
                t.get("kind", ""),
                f"{t.get('pipeline', '')}/{t.get('step', '')}",
                figures,
                time.strftime("%Y-%m-%d %H:%M", time.localtime(v.creation_timestamp / 1000)),
            ]
        )
    print(text_table(["model", "kind", "made by (pipeline/step)", "figures", "registered"], rows))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from difforge.platform.report import main_table, write_report

    path = write_report(args.target, args.out, args.tracking_uri, log=not args.no_log)
    print(main_table(path))
    print(f"\nreport: {path} (plots beside it){'' if args.no_log else '; logged to MLflow'}")
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    import subprocess

    from difforge.platform import settings
    from difforge.platform.tracking import ui_page

    store = settings.default_tracking_uri()
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--host",
        args.host,
        "--port",
        str(args.port),
        "--workers",
        "1",
        "--backend-store-uri",
        store,
        "--default-artifact-root",
        settings.default_artifact_root().as_uri(),
    ]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    base = f"http://{args.host}:{args.port}"
    print(f"MLflow UI for {store} at {base}  (Ctrl-C stops it)")
    for name, experiment_id in _recent_experiments(store):
        print(f"  {name:24} {ui_page(base, f'experiments/{experiment_id}')}")
    sys.stdout.flush()  # before the server's own output, and seen at once through a pipe
    # the server and its workers in a process group of their own, ended with this command
    # whatever ends it (Ctrl-C, SIGTERM, a closed terminal's SIGHUP): none left holding the port
    server = subprocess.Popen(cmd, env=env, start_new_session=True)
    return _serve_until_signalled(server)


def _recent_experiments(store: str, n: int = 8) -> list[tuple[str, str]]:
    """(name, id) of the store's most recently updated experiments, if it has any yet: their
    runs pages are what `difforge ui` prints (MLflow's own links open GenAI's view)."""
    if not store.startswith("sqlite:///") or not os.path.exists(store[len("sqlite:///") :]):
        return []
    from mlflow import MlflowClient

    found = MlflowClient(store).search_experiments(
        max_results=n + 1, order_by=["last_update_time DESC"]
    )
    return [(e.name, e.experiment_id) for e in found if e.name != "Default"][:n]


def _serve_until_signalled(server) -> int:
    """Wait for `server`; on SIGINT, SIGTERM or SIGHUP end its process group (SIGTERM, then
    SIGKILL after 4 s) and return 0."""
    import signal
    import time

    class Stop(Exception):
        pass

    def stop(signum, frame):
        raise Stop

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, stop)
    try:
        return server.wait()
    except Stop:
        pass
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)  # a second Ctrl-C does not cut the clean-up short
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.pid, signal.SIGTERM)
    deadline = time.time() + 4
    while time.time() < deadline:
        try:
            os.killpg(server.pid, 0)
        except ProcessLookupError:
            break
        server.poll()  # reap the leader, or its group never empties
        time.sleep(0.1)
    else:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGKILL)
    server.wait()
    return 0


COMMANDS = {
    "run": cmd_run,
    "submit": cmd_submit,
    "jobs": cmd_jobs,
    "schedule": cmd_schedule,
    "scheduler": cmd_scheduler,
    "validate": cmd_validate,
    "schema": cmd_schema,
    "ops": cmd_ops,
    "show": cmd_show,
    "sample": cmd_sample,
    "models": cmd_models,
    "report": cmd_report,
    "gc": cmd_gc,
    "ui": cmd_ui,
}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 0
    if args.verbose:
        os.environ["DIFFORGE_VERBOSE"] = "1"  # for Ray's start-up, here and in submitted jobs
    from difforge.jobs.cluster import token_mode_when_a_token_is_given

    token_mode_when_a_token_is_given()  # before anything imports Ray
    # difforge's own lines on the console; the libraries' go to a log file (progress.py)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
    ours = logging.getLogger("difforge")
    ours.handlers, ours.propagate = [handler], False
    ours.setLevel(logging.INFO)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    try:
        return COMMANDS[args.command](args)
    except DifforgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        if exc.__cause__ is not None and os.environ.get("DIFFORGE_DEBUG"):
            raise
        return 2
    except KeyboardInterrupt:
        print("interrupted: nothing half-written is visible; rerun to continue", file=sys.stderr)
        sys.stderr.flush()
        return 130
    except BrokenPipeError:  # `difforge validate f.yaml | head -1`: the reader left; so do we
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
