"""One attempt's work is its own: the folder a run works in for one step, held by a lease.

A step's checkpoints and resume markers live in a work folder under `<dataset>/_work/w-*/`. A
run that computes the step holds a lease on the folder it works in, renewed every `RENEW_S`
seconds while the step runs and released when it ends. Starting the step, a run takes over the
newest folder whose lease has ended (released; not renewed for `EXPIRES_S` seconds; or held by
a process of this host that is gone) and resumes from what it holds; where every folder is held
by a live run (the same step, computed by another run at this moment), it works in a new folder
of its own. Two runs never write into one folder: the first to commit wins and the other finds
the dataset committed (the commit protocol, outputs.py).

A lease is a file `_lease-NNNNNN.json` created exclusively (an atomic link locally, a put with
`If-None-Match` on S3): taking over a folder creates the next number, so of two runs that find
the same folder free, one gets it.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from difforge.platform.datasets import join, url_to_fs
from difforge.platform.outputs import create_exclusive

log = logging.getLogger("difforge")
RENEW_S = float(os.environ.get("DIFFORGE_LEASE_RENEW_S", "10"))
EXPIRES_S = float(os.environ.get("DIFFORGE_LEASE_EXPIRES_S", "60"))
PREFIX = "w-"


def _now_state(owner: str, released: bool = False) -> bytes:
    state = {
        "owner": owner,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "renewed": time.time(),
        "released": released,
    }
    return json.dumps(state).encode()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def ended(state: dict[str, Any] | None, now: float | None = None) -> bool:
    """Whether a lease no longer holds its folder."""
    if state is None or state.get("released"):
        return True
    if (now or time.time()) - float(state.get("renewed", 0)) > EXPIRES_S:
        return True
    same_host = state.get("host") == socket.gethostname()
    return same_host and not _alive(int(state.get("pid", -1)))


def _current(fs: Any, folder: str) -> tuple[int, dict[str, Any] | None]:
    """(number, state) of a folder's newest lease; (0, None) where it has none."""
    try:
        names = [p.rsplit("/", 1)[-1] for p in fs.ls(folder, detail=False)]
    except FileNotFoundError:
        return 0, None
    numbers = sorted(int(n[7:13]) for n in names if n.startswith("_lease-") and n[7:13].isdigit())
    if not numbers:
        return 0, None
    try:
        return numbers[-1], json.loads(fs.cat_file(f"{folder}/_lease-{numbers[-1]:06d}.json"))
    except (FileNotFoundError, ValueError):  # being written this moment: held
        return numbers[-1], {"renewed": time.time()}


@dataclass
class Lease:
    """A run's hold on one work folder; renewed in a thread until released."""

    uri: str  # the work folder, as a URI
    fs: Any
    path: str  # the lease file
    owner: str
    resumed: bool
    _stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self._thread = threading.Thread(target=self._renew, daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        while not self._stop.wait(RENEW_S):
            try:
                self.fs.pipe_file(self.path, _now_state(self.owner))
            except Exception as exc:  # noqa: BLE001 - renewed again next time
                log.debug("lease %s: renewal failed: %s", self.path, exc)

    def release(self) -> None:
        """The step ended (committed, failed or interrupted): the folder is free to resume."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            self.fs.pipe_file(self.path, _now_state(self.owner, released=True))
        except Exception as exc:  # noqa: BLE001 - it expires instead
            log.debug("lease %s: release failed: %s", self.path, exc)


def _take(fs: Any, folder: str, number: int, owner: str, uri: str, resumed: bool) -> Lease | None:
    path = f"{folder}/_lease-{number:06d}.json"
    if not create_exclusive(fs, path, _now_state(owner)):
        return None
    return Lease(uri=uri, fs=fs, path=path, owner=owner, resumed=resumed)


def claim(work_root: str, fresh: bool = False) -> Lease:
    """The work folder this run uses for a step whose work folders live in `work_root`: the
    newest one no live run holds (resuming what it holds), else a new one. `fresh` (--force):
    always a new one, and the folders no live run holds are removed."""
    fs, root = url_to_fs(work_root)
    root = root.rstrip("/")
    fs.makedirs(root, exist_ok=True)
    owner = secrets.token_hex(8)
    try:
        folders = [p for p in fs.ls(root, detail=False) if p.rsplit("/", 1)[-1].startswith(PREFIX)]
    except FileNotFoundError:
        folders = []
    for folder in sorted(folders, reverse=True):  # newest first: names begin with the time
        number, state = _current(fs, folder)
        if not ended(state):
            continue  # a live run works here
        if fresh:
            fs.rm(folder, recursive=True)
            continue
        lease = _take(
            fs, folder, number + 1, owner, join(work_root, folder.rsplit("/", 1)[-1]), True
        )
        if lease is not None:
            return lease
    name = f"{PREFIX}{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
    folder = f"{root}/{name}"
    fs.makedirs(folder, exist_ok=True)
    lease = _take(fs, folder, 1, owner, join(work_root, name), False)
    assert lease is not None  # a new folder of a random name
    return lease
