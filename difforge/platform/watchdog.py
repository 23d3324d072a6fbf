"""What is left when a driver dies without warning (`kill -9`, the OOM killer, a lost machine).

- `Watchdog`: a small process started beside the private Ray a driver starts. It notes the
  driver's descendants every second; when the driver is gone it ends the ones still running
  (Ray's agents would otherwise stay orphaned for minutes, listening). A driver that ends normally
  shuts Ray down itself, and the watchdog then finds nothing left to end.
- `process_identity` / `reap_dead_runs`: each pipeline run records its host, pid and the pid's
  start time; a later run on the same host marks FAILED the RUNNING runs whose driver is
  provably dead (no such process, or a process of that pid started at another time). A live
  concurrent run of the same pipeline is never touched.

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


def reap_dead_runs(client: Any, experiment_id: str) -> list[str]:
    """Mark FAILED the RUNNING pipeline runs of this host whose driver is provably dead, and
    their RUNNING step runs. Returns the pipeline run ids it ended."""
    host = socket.gethostname()
    runs = client.search_runs(
        [experiment_id],
        f"attributes.status = 'RUNNING' and tags.`{HOST}` = '{host}'",
        max_results=200,
    )
    ended = []
    for run in runs:
        tags = run.data.tags
        if "mlflow.parentRunId" in tags or PID not in tags:
            continue
        try:
            pid, started = int(tags[PID]), float(tags[PID_START])
        except (KeyError, ValueError):
            continue
        if is_alive(pid, started):
            continue
        children = client.search_runs(
            [experiment_id],
            f"attributes.status = 'RUNNING' and tags.`mlflow.parentRunId` = '{run.info.run_id}'",
        )
        for r in [*children, run]:
            client.set_tag(r.info.run_id, "difforge.ended_by", "a later run found its driver dead")
            client.set_terminated(r.info.run_id, "FAILED")
        ended.append(run.info.run_id)
    return ended


if __name__ == "__main__":
    watch(int(sys.argv[1]), float(sys.argv[2]))
