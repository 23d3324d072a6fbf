"""What a run shows while it works, and where Ray's own chatter goes.

On a terminal, a pass over the data and a training job each draw one progress bar (tqdm) with
its ETA; off a terminal (CI, a job's log) they write at most one progress line every 30 seconds.
Ray's, Ray Data's, Ray Train's and MLflow's own logs go to a file under `DIFFORGE_HOME/logs/`,
whose path is printed once; `difforge run -v` (DIFFORGE_VERBOSE=1) shows them instead.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from difforge.platform.events import StepLog

log = logging.getLogger("difforge")

QUIET_EVERY_S = 30.0
#: a training loop's heartbeat (`StepLog.log_progress`): its loss, at most every PROGRESS_EVERY_S
PROGRESS_METRIC, PROGRESS_EVERY_S = "running_loss", 5.0
CHATTY = ("ray", "ray.data", "ray.train", "mlflow", "alembic", "deepspeed", "urllib3", "filelock")
_log_file: Path | None = None


def verbose() -> bool:
    return os.environ.get("DIFFORGE_VERBOSE", "") == "1"


def quiet_libraries(only_again: bool = False) -> Path | None:
    """Send the libraries' own loggers to a file in DIFFORGE_HOME/logs (once per process);
    returns its path (None when verbose: they go to the console). `only_again`: only where
    this process did so before (a library imported since has set its loggers up again)."""
    global _log_file
    if verbose() or (only_again and _log_file is None):
        return None
    if _log_file is None:
        from difforge.platform import settings

        folder = settings.home() / "logs"
        folder.mkdir(parents=True, exist_ok=True)
        _log_file = folder / f"run-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}.log"
        # Ray Data configures its own loggers from this file (read again by its workers)
        config = folder / "ray-data-logging.yaml"
        config.write_text(RAY_DATA_LOGGING.format(path=_log_file))
        os.environ["RAY_DATA_LOGGING_CONFIG"] = str(config)
        # diffusers' and the hub's loading bars ("Loading checkpoint shards") stay off the
        # console (read when they are imported)
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    handler = logging.FileHandler(_log_file)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    for name in CHATTY:
        lib = logging.getLogger(name)
        lib.handlers = [handler]
        lib.propagate = False
        lib.setLevel(logging.INFO)
    return _log_file


RAY_DATA_LOGGING = """\
version: 1
disable_existing_loggers: false
formatters:
  ray: {{format: "%(asctime)s %(name)s %(levelname)s %(message)s"}}
handlers:
  file: {{class: logging.FileHandler, formatter: ray, filename: "{path}"}}
loggers:
  ray.data: {{level: INFO, handlers: [file], propagate: false}}
"""


class Progress:
    """One bar (or, off a terminal, a line every 30 s) for `total` units of work."""

    def __init__(self, label: str, total: int | None, unit: str):
        self.label, self.total, self.unit = label, total, unit
        self.done, self.started, self.last_line = 0, time.time(), time.time()
        self.first: tuple[float, int] | None = None  # (time, done) of the first work seen
        self.postfix = ""
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(
                total=total,
                desc=label,
                unit=f" {unit}",
                leave=False,
                file=sys.stderr,
                dynamic_ncols=True,
            )

    def update(
        self, done: int | None = None, step: int = 1, show: bool = True, **postfix: Any
    ) -> None:
        """Record work done (and figures to show beside it); draw it unless `show` is False."""
        self.done = done if done is not None else self.done + step
        if self.first is None and self.done > 0:
            self.first = (time.time(), self.done)
        self.postfix = ", ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in postfix.items()
        )
        if not show:
            return
        if self.bar is not None:
            self.bar.n = self.done
            if postfix:
                self.bar.set_postfix_str(self.postfix, refresh=False)
            self.bar.refresh()
            return
        now = time.time()
        if now - self.last_line >= QUIET_EVERY_S:
            self.last_line = now
            log.info("%s", self.line())

    def line(self) -> str:
        elapsed = time.time() - self.started
        of = f"/{self.total}" if self.total else ""
        eta = ""
        if self.total and 0 < self.done < self.total and self.first is not None:
            # the rate since the first work seen: start-up (a training job's workers, a pass's
            # actors) is not work, and would make early estimates wild
            t0, d0 = self.first
            if self.done > d0:
                rate = (self.done - d0) / max(1e-9, time.time() - t0)
                eta = f", about {(self.total - self.done) / rate:.0f}s left"
        extra = f", {self.postfix}" if self.postfix else ""
        return f"{self.label}: {self.done}{of} {self.unit} in {elapsed:.0f}s{eta}{extra}"

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class MetricProgress:
    """A training job's progress, read from the metric its rank 0 logs to MLflow (step of
    total, loss), polled in a thread while the job runs."""

    def __init__(
        self, step_log: StepLog, label: str, metric: str, total: int, unit: str, first: int = 1
    ):
        """`first`: the step the metric is logged at once the first unit is done: 1 where the
        step counts units done (optimizer steps), 0 where it is the index of the unit just done
        (epochs counted from 0)."""
        self.step_log, self.metric = step_log, metric
        self.offset = 1 - first
        self.progress = Progress(label, total, unit)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> MetricProgress:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
        if exc[0] is None:  # where training ended, in one line (the bar goes)
            self._update(-1, show=False)
            log.info("%s", self.progress.line())
        self.progress.close()

    def _poll(self) -> None:
        seen = -1
        while not self.stop.wait(2.0):
            seen = self._update(seen)

    def _update(self, seen: int, show: bool = True) -> int:
        """Show the newest point of the checkpoints' metric or of the heartbeat between them."""
        try:
            points = [
                (step, value, self.metric)
                for step, value in self.step_log.metric_history(self.metric)
            ]
            points += [
                (step, value, "loss")
                for step, value in self.step_log.metric_history(PROGRESS_METRIC)
            ]
        except Exception:  # noqa: BLE001 - progress is a courtesy; never fails a run
            return seen
        if points:
            step, value, name = max(points)
            if step != seen:
                self.progress.update(step + self.offset, show=show, **{name: value})
                return step
        return seen
