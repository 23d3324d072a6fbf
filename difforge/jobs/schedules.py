"""Recurring pipeline runs: schedules in a persistent store, and the scheduler that fires them.

The store is a SQL database (SQLite in DIFFORGE_HOME by default, any SQLAlchemy URL at scale).
Every firing is a row keyed by (schedule, slot) with a unique constraint, so a slot fires at most
once: across scheduler restarts, and with two schedulers on the same store, whichever inserts the
row first launches the run and the other sees the conflict and moves on.

Time is injected (`Scheduler.tick(now)`) and so is the launcher, so the rules are testable
without waiting: a `Launcher` starts a run for a slot and reports its state later.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from difforge.platform import settings
from difforge.platform.errors import DifforgeError

log = logging.getLogger("difforge.scheduler")

OVERLAP = ("skip", "allow")
CATCHUP = ("none", "latest", "all")
ACTIVE = ("running",)
# A slot this late is "missed" (the scheduler was down) rather than due: catch-up decides.
DEFAULT_GRACE_S = 60.0
MAX_CATCHUP = 1000

SCHEMA = [
    """CREATE TABLE IF NOT EXISTS schedules (
        name VARCHAR(200) PRIMARY KEY,
        file TEXT NOT NULL,
        overrides TEXT NOT NULL,
        cron VARCHAR(200) NOT NULL,
        timezone VARCHAR(100) NOT NULL,
        cluster TEXT,
        forward_env TEXT NOT NULL,
        overlap VARCHAR(10) NOT NULL,
        catchup VARCHAR(10) NOT NULL,
        on_failure TEXT,
        paused INTEGER NOT NULL,
        created REAL NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS firings (
        schedule VARCHAR(200) NOT NULL,
        slot REAL NOT NULL,
        fired_at REAL NOT NULL,
        status VARCHAR(20) NOT NULL,
        job_id TEXT,
        message TEXT,
        finished_at REAL,
        PRIMARY KEY (schedule, slot)
    )""",
]


@dataclass
class Schedule:
    name: str
    file: str
    cron: str
    timezone: str = "UTC"
    overrides: tuple[str, ...] = ()
    cluster: str | None = None
    forward_env: tuple[str, ...] = ()
    overlap: str = "skip"
    catchup: str = "latest"
    on_failure: str | None = None
    paused: bool = False
    created: float = 0.0

    def slots(self, after: float, until: float, limit: int = MAX_CATCHUP) -> list[float]:
        """Cron slots in (after, until], as epoch seconds, in the schedule's time zone."""
        from croniter import croniter

        it = croniter(self.cron, datetime.fromtimestamp(after, ZoneInfo(self.timezone)))
        out: list[float] = []
        while len(out) < limit:
            t = it.get_next(float)
            if t > until:
                break
            out.append(t)
        return out

    def next_slot(self, after: float) -> float:
        from croniter import croniter

        return croniter(self.cron, datetime.fromtimestamp(after, ZoneInfo(self.timezone))).get_next(
            float
        )


def validate(s: Schedule) -> None:
    from croniter import croniter

    if not croniter.is_valid(s.cron):
        raise DifforgeError(
            f"--cron '{s.cron}': not a cron expression (5 fields: minute hour day month "
            "weekday, or 6 with seconds last)"
        )
    try:
        ZoneInfo(s.timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise DifforgeError(f"--timezone '{s.timezone}': unknown time zone") from None
    if s.overlap not in OVERLAP:
        raise DifforgeError(f"--overlap {s.overlap}: one of {', '.join(OVERLAP)}")
    if s.catchup not in CATCHUP:
        raise DifforgeError(f"--catchup {s.catchup}: one of {', '.join(CATCHUP)}")


class Store:
    """Schedules and their firings in one SQL database."""

    def __init__(self, url: str | None = None):
        from sqlalchemy import create_engine, text

        self.url = url or os.environ.get("DIFFORGE_SCHEDULES") or default_url()
        self._text = text
        kwargs: dict[str, Any] = {}
        if self.url.startswith("sqlite"):
            kwargs["connect_args"] = {"timeout": 30}
        self.engine = create_engine(self.url, **kwargs)
        with self.engine.begin() as con:
            for ddl in SCHEMA:
                con.execute(text(ddl))

    def _exec(self, sql: str, **params: Any):
        with self.engine.begin() as con:
            return con.execute(self._text(sql), params)

    def add(self, s: Schedule) -> None:
        from sqlalchemy.exc import IntegrityError

        validate(s)
        try:
            self._exec(
                "INSERT INTO schedules VALUES (:name, :file, :overrides, :cron, :tz, :cluster, "
                ":env, :overlap, :catchup, :on_failure, :paused, :created)",
                name=s.name,
                file=s.file,
                overrides=json.dumps(list(s.overrides)),
                cron=s.cron,
                tz=s.timezone,
                cluster=s.cluster,
                env=json.dumps(list(s.forward_env)),
                overlap=s.overlap,
                catchup=s.catchup,
                on_failure=s.on_failure,
                paused=int(s.paused),
                created=s.created or time.time(),
            )
        except IntegrityError:
            raise DifforgeError(f"a schedule named '{s.name}' exists: remove it first") from None

    def _row(self, r: Any) -> Schedule:
        return Schedule(
            name=r.name,
            file=r.file,
            cron=r.cron,
            timezone=r.timezone,
            overrides=tuple(json.loads(r.overrides)),
            cluster=r.cluster,
            forward_env=tuple(json.loads(r.forward_env)),
            overlap=r.overlap,
            catchup=r.catchup,
            on_failure=r.on_failure,
            paused=bool(r.paused),
            created=r.created,
        )

    def schedules(self) -> list[Schedule]:
        return [self._row(r) for r in self._exec("SELECT * FROM schedules ORDER BY name")]

    def get(self, name: str) -> Schedule:
        rows = list(self._exec("SELECT * FROM schedules WHERE name = :n", n=name))
        if not rows:
            known = ", ".join(s.name for s in self.schedules()) or "none"
            raise DifforgeError(f"no schedule named '{name}' (schedules: {known})")
        return self._row(rows[0])

    def set_paused(self, name: str, paused: bool) -> None:
        self.get(name)
        self._exec("UPDATE schedules SET paused = :p WHERE name = :n", p=int(paused), n=name)

    def remove(self, name: str) -> None:
        self.get(name)
        self._exec("DELETE FROM schedules WHERE name = :n", n=name)

    def claim(self, name: str, slot: float, now: float, status: str, message: str = "") -> bool:
        """Record a slot; False if it was recorded before (by us, earlier, or another scheduler)."""
        from sqlalchemy.exc import IntegrityError

        try:
            self._exec(
                "INSERT INTO firings (schedule, slot, fired_at, status, message) "
                "VALUES (:s, :slot, :now, :status, :msg)",
                s=name,
                slot=slot,
                now=now,
                status=status,
                msg=message,
            )
            return True
        except IntegrityError:
            return False

    def update(self, name: str, slot: float, expect: str | None = None, **fields: Any) -> bool:
        """Set fields of a firing; with `expect`, only if its status is still that (a CAS)."""
        sets = ", ".join(f"{k} = :{k}" for k in fields)
        where = "schedule = :s AND slot = :slot" + (" AND status = :expect" if expect else "")
        res = self._exec(
            f"UPDATE firings SET {sets} WHERE {where}",
            s=name,
            slot=slot,
            expect=expect,
            **fields,
        )
        return res.rowcount == 1

    def last_slot(self, name: str) -> float | None:
        row = self._exec("SELECT MAX(slot) AS m FROM firings WHERE schedule = :s", s=name).first()
        return row.m if row and row.m is not None else None

    def firings(self, name: str | None = None, status: tuple[str, ...] | None = None) -> list[Any]:
        sql = "SELECT * FROM firings WHERE 1 = 1"
        params: dict[str, Any] = {}
        if name:
            sql += " AND schedule = :s"
            params["s"] = name
        if status:
            sql += " AND status IN (" + ", ".join(f":st{i}" for i in range(len(status))) + ")"
            params.update({f"st{i}": v for i, v in enumerate(status)})
        return list(self._exec(sql + " ORDER BY slot", **params))


def default_url() -> str:
    return f"sqlite:///{settings.home() / 'schedules.db'}"


class Launcher(Protocol):
    def start(self, schedule: Schedule, slot: float) -> str:
        """Start a run for this slot; return its job id."""

    def state(self, schedule: Schedule, job_id: str) -> tuple[str, str]:
        """(running | succeeded | failed | stopped, message)."""


class RunLauncher:
    """Runs each firing as an ordinary pipeline run: `difforge run` in a local process, or
    `difforge submit` to the schedule's cluster."""

    def __init__(self, log_dir: Path | None = None):
        self.log_dir = log_dir or settings.home() / "schedules" / "logs"
        self.procs: dict[str, subprocess.Popen] = {}

    def _tags(self, schedule: Schedule, slot: float) -> dict[str, str]:
        return {"difforge.schedule": schedule.name, "difforge.slot": slot_text(slot, schedule)}

    def start(self, schedule: Schedule, slot: float) -> str:
        if schedule.cluster:
            from difforge.jobs import cluster

            job = cluster.submit(
                schedule.file,
                list(schedule.overrides),
                cluster=schedule.cluster,
                forward_env=list(schedule.forward_env),
                tags=self._tags(schedule, slot),
            )
            return job.job_id
        folder = self.log_dir / schedule.name
        folder.mkdir(parents=True, exist_ok=True)
        stem = folder / f"{int(slot)}"
        argv = [sys.executable, "-m", "difforge", "run", schedule.file]
        for item in schedule.overrides:
            argv += ["--set", item]
        for k, v in self._tags(schedule, slot).items():
            argv += ["--tag", f"{k}={v}"]
        # The exit status lands in a file, so a restarted scheduler can still read the outcome.
        script = f"{shlex.join(argv)} > {shlex.quote(str(stem))}.log 2>&1; echo $? > {shlex.quote(str(stem))}.rc"
        proc = subprocess.Popen(["/bin/sh", "-c", script], start_new_session=True)
        job_id = f"local:{proc.pid}:{stem}"
        self.procs[job_id] = proc
        return job_id

    def state(self, schedule: Schedule, job_id: str) -> tuple[str, str]:
        if not job_id.startswith("local:"):
            from difforge.jobs import cluster

            info = cluster.job_info(schedule.cluster, job_id)  # a lost job: LOST, from MLflow
            status = {"SUCCEEDED": "succeeded", "FAILED": "failed", "STOPPED": "stopped"}
            status["LOST"] = "failed"
            return status.get(info["status"], "running"), info["message"]
        _, pid, stem = job_id.split(":", 2)
        proc = self.procs.get(job_id)
        if proc is not None:
            proc.poll()
        rc_file = Path(f"{stem}.rc")
        if not rc_file.exists():
            if proc is None and not _alive(int(pid)):
                return "failed", "the run's process is gone and left no exit status"
            return "running", ""
        rc = int(rc_file.read_text().strip() or 1)
        self.procs.pop(job_id, None)
        if rc == 0:
            return "succeeded", ""
        tail = _last_error(Path(f"{stem}.log"))
        return "failed", f"exit status {rc}" + (f": {tail}" if tail else "")

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


def _last_error(log_file: Path) -> str:
    try:
        lines = log_file.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    errors = [line for line in lines if line.startswith("error:")]
    return (errors or lines or [""])[-1][:500]


def slot_text(slot: float, schedule: Schedule) -> str:
    return datetime.fromtimestamp(slot, ZoneInfo(schedule.timezone)).isoformat()


class Scheduler:
    """Fires due slots of every active schedule; `tick(now)` is one pass, `serve()` loops."""

    def __init__(
        self,
        store: Store,
        launcher: Launcher | None = None,
        grace_s: float = DEFAULT_GRACE_S,
        clock=time.time,
    ):
        self.store = store
        self.launcher = launcher or RunLauncher()
        self.grace_s = grace_s
        self.clock = clock
        self.stopping = threading.Event()
        self.hooks: list[threading.Thread] = []

    def tick(self, now: float | None = None) -> list[tuple[str, float, str]]:
        """One pass: fire what is due, then settle finished runs (reading a cluster's job
        states can be slow, and must not make a slot late). Returns (schedule, slot, status)
        for each slot recorded in this pass."""
        now = self.clock() if now is None else now
        recorded = self._fire(now)
        self.settle(now)
        return recorded

    def _fire(self, now: float) -> list[tuple[str, float, str]]:
        recorded = []
        for s in self.store.schedules():
            if s.paused:
                continue
            for slot, status, message in self._decide(s, now):
                if not self.store.claim(
                    s.name, slot, now, "claimed" if status == "fire" else status, message
                ):
                    continue  # another scheduler (or an earlier pass) has this slot
                if status == "fire":
                    status = self._launch(s, slot, now)
                recorded.append((s.name, slot, status))
        return recorded

    def _decide(self, s: Schedule, now: float) -> list[tuple[float, str, str]]:
        last = self.store.last_slot(s.name)
        after = s.created if last is None else last
        due = s.slots(after, now)
        if not due:
            return []
        on_time = [t for t in due if now - t <= self.grace_s]
        missed = [t for t in due if now - t > self.grace_s]
        if s.catchup == "all":
            fire, skip = due, []
        elif s.catchup == "latest":
            fire, skip = due[-1:], due[:-1]
        else:
            fire, skip = on_time[-1:], missed + on_time[:-1]
        out = [(t, "missed", "the scheduler was not running at this time") for t in skip]
        out += [(t, "fire", "") for t in fire]
        return sorted(out)

    def _launch(self, s: Schedule, slot: float, now: float) -> str:
        if s.overlap == "skip":
            # A run that ended since the last pass does not make this slot skip.
            self.settle(now, only=s.name)
            running = [f for f in self.store.firings(s.name, ACTIVE) if f.slot != slot]
            if running:
                self.store.update(
                    s.name,
                    slot,
                    status="skipped",
                    message=f"the run of {slot_text(running[-1].slot, s)} is still running",
                )
                log.info(
                    "%s: slot %s skipped (previous run still running)", s.name, slot_text(slot, s)
                )
                return "skipped"
        try:
            job_id = self.launcher.start(s, slot)
        except Exception as exc:  # a bad YAML, an unreachable cluster: recorded, not fatal
            message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            self.store.update(s.name, slot, status="failed", message=message, finished_at=now)
            log.warning("%s: slot %s could not start: %s", s.name, slot_text(slot, s), message)
            self._on_failure(s, slot, "", "failed", message)
            return "failed"
        self.store.update(s.name, slot, status="running", job_id=job_id)
        log.info("%s: slot %s started %s", s.name, slot_text(slot, s), job_id)
        return "running"

    def settle(self, now: float | None = None, only: str | None = None) -> None:
        """Ask the launcher about each running firing (of every schedule, or `only` one);
        record outcomes; start on-failure hooks."""
        now = self.clock() if now is None else now
        schedules = {s.name: s for s in self.store.schedules()}
        for f in self.store.firings(only, status=ACTIVE):
            s = schedules.get(f.schedule)
            if s is None:
                continue
            try:
                state, message = self.launcher.state(s, f.job_id)
            except Exception as exc:
                log.warning("%s: cannot read the state of %s: %s", s.name, f.job_id, exc)
                continue
            if state == "running":
                continue
            # Compare-and-set: with two schedulers, only one records the outcome and alerts.
            if self.store.update(
                s.name, f.slot, expect="running", status=state, message=message, finished_at=now
            ):
                log.info("%s: slot %s %s %s", s.name, slot_text(f.slot, s), state, message)
                if state == "failed":
                    self._on_failure(s, f.slot, f.job_id, state, message)

    def _on_failure(self, s: Schedule, slot: float, job_id: str, status: str, message: str) -> None:
        """Run the schedule's on-failure command in a thread: a slow alert must not delay
        the slots of other schedules. `drain()` waits for the ones started."""
        if not s.on_failure:
            return
        self.hooks = [t for t in self.hooks if t.is_alive()]
        hook = threading.Thread(
            target=self._run_hook, args=(s, slot, job_id, status, message), daemon=True
        )
        hook.start()
        self.hooks.append(hook)

    def drain(self, timeout: float = 130.0) -> None:
        """Wait for the on-failure commands started so far (each is stopped after 120 s)."""
        deadline = time.monotonic() + timeout
        for hook in self.hooks:
            hook.join(max(0.0, deadline - time.monotonic()))
        self.hooks = [t for t in self.hooks if t.is_alive()]

    def _run_hook(self, s: Schedule, slot: float, job_id: str, status: str, message: str) -> None:
        env = {
            **os.environ,
            "DIFFORGE_SCHEDULE": s.name,
            "DIFFORGE_SLOT": slot_text(slot, s),
            "DIFFORGE_JOB_ID": job_id,
            "DIFFORGE_STATUS": status,
            "DIFFORGE_MESSAGE": message,
            "DIFFORGE_FILE": s.file,
        }
        try:
            subprocess.run(s.on_failure, shell=True, env=env, timeout=120, check=False)
        except subprocess.TimeoutExpired:
            log.warning("%s: the on-failure command ran over 120 s and was stopped", s.name)

    def serve(self, interval: float = 1.0) -> None:
        """Tick until SIGTERM or SIGINT; then stop cleanly (runs already started keep going)."""

        def stop(signum: int, frame: Any) -> None:
            log.info("scheduler: signal %d, stopping", signum)
            self.stopping.set()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        log.info("scheduler: store %s, %d schedules", self.store.url, len(self.store.schedules()))
        while not self.stopping.is_set():
            try:
                self.tick()
            except Exception as exc:  # a store hiccup must not end the service
                log.warning("scheduler: tick failed: %s", exc)
            # Wake at the next slot or after `interval`, whichever is sooner.
            self.stopping.wait(self._sleep_for(interval))
        self.drain()
        log.info("scheduler: stopped")

    def _sleep_for(self, interval: float) -> float:
        now = self.clock()
        upcoming = [s.next_slot(now) for s in self.store.schedules() if not s.paused]
        soonest = min(upcoming, default=now + interval)
        return max(0.05, min(interval, soonest - now + 0.01))
