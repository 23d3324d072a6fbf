"""What is left when a driver dies without warning (`kill -9`, the OOM killer, a lost machine).

- `Watchdog`: a small process started beside the private Ray a driver starts. It notes the
  driver's descendants every second; when the driver is gone it ends the ones still running
  (Ray's agents would otherwise stay orphaned for minutes, listening). A driver that ends normally
  shuts Ray down itself, and the watchdog then finds nothing left to end.
- `process_identity` / `reap_dead_runs`: each pipeline run records its host, pid and the pid's
  start time, and its driver renews a heartbeat (the tag `difforge.heartbeat`, the time) every
  `HEARTBEAT_S` seconds while it runs. Whoever looks next (a later run of the experiment,
  `difforge jobs`) marks FAILED the RUNNING runs whose driver is gone: provably dead on this
  host (no such process, or a process of that pid started at another time), or, on any host,
  silent for `STALE_S` seconds (a lost machine, a restarted head). A live concurrent run of the
  same pipeline is never touched.

Run as `python -m difforge.platform.watchdog PID START_TIME`.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from typing import Any

POLL_S = 1.0
GRACE_S = 3.0

HOST, PID, PID_START = "difforge.host", "difforge.pid", "difforge.pid_start"
HEARTBEAT = "difforge.heartbeat"
HEARTBEAT_S = float(os.environ.get("DIFFORGE_HEARTBEAT_S", "30"))
STALE_S = float(os.environ.get("DIFFORGE_HEARTBEAT_STALE_S", "180"))


def process_identity() -> dict[str, str]:
    """Tags that identify this driver process beyond doubt (pids are reused, start times not)."""
    import psutil

    me = psutil.Process()
    return {HOST: socket.gethostname(), PID: str(me.pid), PID_START: f"{me.create_time():.3f}"}


def is_alive(pid: int, started: float) -> bool:
    import psutil

    try:
        return abs(psutil.Process(pid).create_time() - started) < 0.01
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False
    except psutil.AccessDenied:
        return True  # it exists; we cannot tell more: not provably dead


def start_watchdog() -> subprocess.Popen | None:
    """Watch this process from a child process of its own (it outlives a SIGKILL of ours)."""
    import psutil

    me = psutil.Process()
    try:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "difforge.platform.watchdog",
                str(me.pid),
                str(me.create_time()),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            close_fds=True,
        )
    except OSError:
        return None


def watch(pid: int, started: float) -> None:
    import psutil

    mine = os.getpid()
    seen: dict[int, float] = {}
    while is_alive(pid, started):
        try:
            for child in psutil.Process(pid).children(recursive=True):
                if child.pid != mine:
                    seen[child.pid] = child.create_time()
        except psutil.Error:
            pass
        time.sleep(POLL_S)
    left = []
    for child_pid, child_started in seen.items():
        if is_alive(child_pid, child_started):
            try:
                proc = psutil.Process(child_pid)
                proc.terminate()
                left.append(proc)
            except psutil.Error:
                continue
    _, alive = psutil.wait_procs(left, timeout=GRACE_S)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass


def driver_gone(tags: dict[str, str], now: float | None = None) -> str | None:
    """Why a RUNNING pipeline run's driver is known to be gone, or None while it may live."""
    beat = tags.get(HEARTBEAT)
    if beat is not None:
        try:
            silent = (now or time.time()) - float(beat)
        except ValueError:
            silent = 0.0
        if silent > STALE_S:
            return f"its driver's heartbeat stopped {silent:.0f}s ago"
    if tags.get(HOST) == socket.gethostname() and PID in tags:
        try:
            pid, started = int(tags[PID]), float(tags[PID_START])
        except (KeyError, ValueError):
            return None
        if not is_alive(pid, started):
            return "a later run found its driver dead"
    return None


def end_run_and_steps(client: Any, run: Any, reason: str) -> None:
    """Mark a RUNNING pipeline run and its RUNNING step runs FAILED, saying why."""
    children = client.search_runs(
        [run.info.experiment_id],
        f"attributes.status = 'RUNNING' and tags.`mlflow.parentRunId` = '{run.info.run_id}'",
    )
    import contextlib
    import io

    for r in [*children, run]:
        client.set_tag(r.info.run_id, "difforge.ended_by", reason)
        with contextlib.redirect_stdout(io.StringIO()):  # MLflow prints "View run ... at" here
            client.set_terminated(r.info.run_id, "FAILED")


def reap_dead_runs(client: Any, experiment_id: str) -> list[str]:
    """Mark FAILED the RUNNING pipeline runs of the experiment whose driver is gone, and their
    RUNNING step runs. Returns the pipeline run ids it ended."""
    runs = client.search_runs([experiment_id], "attributes.status = 'RUNNING'", max_results=500)
    ended = []
    for run in runs:
        tags = run.data.tags
        if "mlflow.parentRunId" in tags:
            continue
        reason = driver_gone(tags)
        if reason is not None:
            end_run_and_steps(client, run, reason)
            ended.append(run.info.run_id)
    return ended


class Heartbeat:
    """Renews a run's heartbeat tag every HEARTBEAT_S seconds, in a thread, until stopped."""

    def __init__(self, client: Any, run_id: str):
        import threading

        self.client, self.run_id = client, run_id
        self.stop_event = threading.Event()
        self.beat()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def beat(self) -> None:
        try:
            self.client.set_tag(self.run_id, HEARTBEAT, f"{time.time():.0f}")
        except Exception:  # noqa: BLE001 - a server away for a moment: the next beat
            pass

    def _loop(self) -> None:
        while not self.stop_event.wait(HEARTBEAT_S):
            self.beat()

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(timeout=5)


if __name__ == "__main__":
    watch(int(sys.argv[1]), float(sys.argv[2]))
