"""The Ray a run uses: started on first use, private to the driver unless told otherwise.

By default Ray is private to this process (`address="local"`): a cluster started on the same
machine with `ray start` is never joined by accident; `address=` (or RAY_ADDRESS) attaches to
one. A private Ray gets a watchdog that ends its processes if the driver is killed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading

from difforge.platform import capacity
from difforge.platform.errors import DifforgeError
from difforge.platform.progress import quiet_libraries, verbose
from difforge.platform.watchdog import start_watchdog

log = logging.getLogger("difforge")


#: Ray's switch for a node that is not meant to join a cluster (its default on macOS and
#: Windows): the node's IP is then the loopback address, which every Ray server binds
_NO_CLUSTER = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@contextlib.contextmanager
def loopback_only(private: bool):
    """While a private Ray starts: its GCS, raylet, agents and workers listen on 127.0.0.1
    only (without this, Ray on Linux binds every interface even when told 127.0.0.1: it
    replaces a loopback node IP with the machine's address). Ray's processes inherit the
    setting as they start; this process gets its own back afterwards, so a later run can
    still join a cluster."""
    if not private:
        yield
        return
    from ray._private import ray_constants

    before_env, before = os.environ.get(_NO_CLUSTER), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[_NO_CLUSTER] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before
        if before_env is None:
            os.environ.pop(_NO_CLUSTER, None)
        else:
            os.environ[_NO_CLUSTER] = before_env


@contextlib.contextmanager
def warnings_to(log_file):
    """While Ray starts: its warnings go to the libraries' log file. (Without console logging,
    `ray.init` empties its logger's handlers, and Python then prints what it logs, such as
    its note on token authentication, to stderr.)"""
    if log_file is None:
        yield
        return
    previous = logging.lastResort
    handler = logging.FileHandler(log_file)
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    logging.lastResort = handler
    try:
        yield
    finally:
        logging.lastResort = previous
        handler.close()


def free_port() -> int:
    """A loopback port nothing listens on now (the caller binds it soon after)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RayRuntime:
    """Where a run's work runs, as the executor sees it: `ensure` (Ray started on first use;
    what the cluster holds), `check_storage`, `wait_for_nodes` and `release_nodes` (an
    autoscaler's), `shutdown` (only a Ray it started)."""

    def __init__(self, address: str | None):
        self.address = address or os.environ.get("RAY_ADDRESS") or "local"
        self.started = False
        self.watchdog = None
        self.requested = False  # a standing request to the autoscaler

    def ensure(self) -> capacity.Capacity:
        import ray

        if not ray.is_initialized():
            log.info("starting Ray (address=%s)", self.address)
            main = threading.current_thread() is threading.main_thread()
            previous = signal.getsignal(signal.SIGTERM) if main else None
            loud = verbose()
            logs = quiet_libraries()  # before Ray starts: its workers inherit the settings
            try:
                with loopback_only(self.address == "local"), warnings_to(logs):
                    ray.init(
                        address=self.address,
                        include_dashboard=False,
                        logging_level=logging.INFO if loud else logging.WARNING,
                        configure_logging=loud,
                        log_to_driver=loud,  # workers' output: in Ray's session logs unless -v
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
            import ray.train  # noqa: F401 - its loggers exist before they are quietened
            from ray.data import DataContext

            DataContext.get_current().enable_progress_bars = loud  # difforge draws its own
            quiet_libraries()  # importing Ray Data and Ray Train set up loggers of their own
            if logs is not None:
                workers = ""
                if self.address == "local":
                    session = ray._private.worker.global_worker.node.get_session_dir_path()
                    workers = f" (Ray's worker logs: {session}/logs)"
                log.info("Ray's and libraries' logs: %s%s; -v shows them", logs, workers)
        return capacity.of_cluster()

    def check_storage(self, storage: str) -> None:
        """Refuse storage that some node of the cluster cannot see (shared.py)."""
        from difforge.platform.shared import check_shared

        check_shared(storage)

    def wait_for_nodes(
        self, step: str, bundles: list[dict[str, float]], cap: capacity.Capacity
    ) -> None:
        """On an autoscaling cluster (`cap`, from `ensure`): ask for the step's nodes and wait
        until they are up."""
        if cap.autoscaler:
            self.requested |= capacity.wait_for_nodes(step, bundles, capacity.scale_timeout_s())

    def release_nodes(self) -> None:
        if self.requested:
            capacity.release()
            self.requested = False

    def shutdown(self) -> None:
        if self.started:
            import ray

            ray.shutdown()
            self.started = False
            if self.watchdog is not None:
                self.watchdog.terminate()
                self.watchdog = None
