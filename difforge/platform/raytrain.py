"""Running a training loop as a Ray Train job in a step's work folder, resumably.

Checkpoints live in the step's `_work/` folder (local or S3). Ray Train restores the latest
one when a worker dies (`FailureConfig`), and a rerun of a pipeline whose driver died finds
the same run by name and storage path and continues it instead of starting over."""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from difforge.platform.lineage import saw_nodes
from difforge.platform.progress import MetricProgress

if TYPE_CHECKING:
    from difforge.platform.context import JobContext

log = logging.getLogger("difforge")


def fit(
    ctx: JobContext,
    loop: Callable[[dict], None],
    config: dict[str, Any],
    max_failures: int = 2,
    progress: tuple[str, int, str] | tuple[str, int, str, int] | None = None,
    alongside: Future | None = None,
):
    """Run `loop` on ctx.resources.num_workers Ray Train workers; return the Result.
    `progress`: (metric, total, unit[, first]): the metric rank 0 logs with its step, for the
    bar; `first`: the step logged once the first unit is done (1, the default, where steps
    count units done; 0 where a step is the index of the unit just done, as epochs from 0 are).
    `alongside`: the driver's own work (a check, say) running in a thread while Ray Train
    starts its workers, seconds that would otherwise come first; should it fail, the workers
    are stopped and its error is the step's."""
    from difforge.platform.datasets import url_to_fs

    _tune_ray_train()
    res = ctx.resources
    fs, work = url_to_fs(ctx.work_uri)
    fs.makedirs(work, exist_ok=True)
    per_worker = {"CPU": res.num_cpus, **({"GPU": res.num_gpus} if res.num_gpus else {})}
    log.info(
        "step %s: %d training worker(s) x %g CPU(s)%s; torch uses %d thread(s) each",
        ctx.step,
        res.num_workers,
        res.num_cpus,
        f" + {res.num_gpus:g} GPU" if res.num_gpus else "",
        max(1, int(res.num_cpus)),
    )
    trainer = _trainer(ctx, (fs, work), loop, config, per_worker, max_failures)
    earlier = sorted(fs.glob(f"{work.rstrip('/')}/ray-train/checkpoint_[0-9]*"))
    if earlier:  # Ray Train restores the run of this name and storage path: the last of them
        log.info(
            "step %s: continues from %s, the last checkpoint of an earlier attempt",
            ctx.step,
            earlier[-1].rsplit("/", 1)[-1],
        )
    watch = NodeLossWatch(ctx.step, [per_worker] * res.num_workers)
    try:
        if progress is None:
            result = _fit(trainer, alongside, watch)
        else:
            metric, total, unit, *first = progress
            with MetricProgress(ctx.log, ctx.step, metric, total, unit, *first):
                result = _fit(trainer, alongside, watch)
    except Exception:
        watch.raise_if_lost()  # the cause, not the stopped run's error
        raise
    finally:
        watch.stop()
    nodes = f"{work.rstrip('/')}/nodes"  # nodes_uri, on `fs`
    if fs.exists(nodes):
        saw_nodes(fs.cat_file(p).decode() for p in fs.ls(nodes, detail=False))
    return result


def _trainer(
    ctx: JobContext,
    storage: tuple[Any, str],
    loop: Callable[[dict], None],
    config: dict[str, Any],
    per_worker: dict[str, float],
    max_failures: int,
):
    """A TorchTrainer for the step: its workers, and its run named `ray-train` in the step's
    work folder, `storage` (its filesystem and path: where a rerun finds the run, and its
    checkpoints, again)."""
    import ray.train
    from pyarrow.fs import FSSpecHandler, PyFileSystem
    from ray.train.torch import TorchTrainer

    from difforge.platform.datasets import join

    res = ctx.resources
    fs, work = storage
    return TorchTrainer(
        _on_node(loop),
        train_loop_config={
            **config,
            "threads": res.num_cpus,
            "log": ctx.log,
            "nodes_uri": join(ctx.work_uri, "nodes"),  # each worker says where it runs
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=res.num_workers,
            use_gpu=res.num_gpus > 0,
            resources_per_worker=per_worker,
        ),
        run_config=ray.train.RunConfig(
            name="ray-train",
            storage_path=work,
            storage_filesystem=PyFileSystem(FSSpecHandler(fs)),
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
        ),
    )


class NodeLossWatch:
    """Ends a training run that a lost node has made impossible. When a node dies, Ray Train
    restarts its worker group from the last checkpoint; where the nodes left cannot hold the
    group and no autoscaler can add one (two 1-CPU hosts, two workers, one host gone), it asks
    for the group again and again, and the step would wait for good. This notices that (every
    2 s), stops the run, and fails the step naming the lost node; its checkpoints stay in the
    work folder, and a rerun on a cluster that can hold the group continues from them."""

    PERIOD_S = 2.0

    def __init__(self, step: str, bundles: list[dict[str, float]]):
        import threading

        import ray

        self.step, self.bundles = step, bundles
        self.start_nodes = {n["NodeID"]: n for n in ray.nodes() if n.get("Alive")}
        self.lost: list[str] = []
        self.stopping = threading.Event()
        self.on_lost: Callable[[], None] = lambda: None
        self.thread = threading.Thread(target=self._run, name="node-loss-watch", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopping.wait(self.PERIOD_S):
            try:
                if self._group_lost():
                    self.on_lost()
                    return
            except Exception as exc:  # noqa: BLE001 - a failed look is no verdict
                log.debug("node watch: %s", exc)

    def _group_lost(self) -> bool:
        import ray

        from difforge.platform import capacity

        nodes = ray.nodes()
        alive = {n["NodeID"] for n in nodes if n.get("Alive")}
        gone = [n for node_id, n in self.start_nodes.items() if node_id not in alive]
        if not gone:
            return False
        live = [dict(n["Resources"]) for n in nodes if n.get("Alive")]
        if capacity.fits(self.bundles, live) or capacity.autoscaler_present():
            return False  # Ray Train places the group again, here or on an added node
        self.lost = [f"{n['NodeManagerAddress']} (node {n['NodeID'][:8]})" for n in gone]
        return True

    def raise_if_lost(self) -> None:
        from difforge.platform.capacity import show
        from difforge.platform.errors import DifforgeError

        if self.lost:
            raise DifforgeError(
                f"step '{self.step}': lost {', '.join(self.lost)} during training; the nodes "
                f"left cannot hold its workers ({show(self.bundles)}), so it stopped. Its "
                "checkpoints are kept: rerun once the cluster can hold them again, and it "
                "continues from the last one"
            )

    def stop(self) -> None:
        self.stopping.set()


def _fit(trainer, alongside: Future | None = None, watch: NodeLossWatch | None = None):
    """`trainer.fit()`, with Ctrl-C kept as an interruption, and stopped early should the
    `alongside` work fail (its error raised, not the stopped run's).

    On the main thread Ray Train's fit installs a SIGINT handler of its own that ends the
    process with `sys.exit` (a "failed" step, `SystemExit`) and never puts the previous handler
    back. Ours, installed in its place (and removed after), asks the run's controller to stop
    its workers, as Ray's does, and raises KeyboardInterrupt, so the step ends as an
    interruption (runs KILLED, checkpoints kept). Ray hands out the controller only there: off
    the main thread the `alongside` work is waited for before the run starts."""
    import signal
    import threading

    import ray

    if threading.current_thread() is not threading.main_thread():
        if alongside is not None:
            alongside.result()
        result = trainer.fit()
        if watch is not None:
            watch.raise_if_lost()
        return result
    if alongside is not None and alongside.done():
        alongside.result()  # failed already: start nothing
    previous = signal.getsignal(signal.SIGINT)

    def stop(controller) -> None:
        try:
            controller.abort.remote()  # Ray Train stops its workers; we do not wait
        except Exception:  # the controller is gone already
            pass

    def register(controller) -> None:
        def on_sigint(signum, frame):
            signal.signal(signal.SIGINT, previous)  # a second Ctrl-C is the caller's again
            stop(controller)
            raise KeyboardInterrupt

        signal.signal(signal.SIGINT, on_sigint)
        if alongside is not None:
            alongside.add_done_callback(lambda f: f.exception() is not None and stop(controller))
        if watch is not None:  # Ray Train's abort waits on the group it cannot place: kill
            watch.on_lost = lambda: ray.kill(controller, no_restart=True)

    trainer._register_sigint_handler = register  # Ray Train's hook for its own handler
    try:
        result = trainer.fit()
    except Exception:
        if alongside is not None and alongside.done() and alongside.exception() is not None:
            raise alongside.exception() from None  # the cause, not the stopped run's error
        raise
    finally:
        signal.signal(signal.SIGINT, previous)
    if alongside is not None:
        alongside.result()
    if watch is not None:
        watch.raise_if_lost()  # an aborted run can end without an error of its own
    return result


def _tune_ray_train() -> None:
    """Ray Train's defaults, where they cost a training step seconds for nothing (a user's own
    settings of these variables win). Its controller polls the workers every 2 s, and a step's
    start and end each wait on polls: 0.5 s. Its preemption watcher (an actor of its own) serves
    clusters whose nodes can be reclaimed, not a single node."""
    import ray

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    if len([n for n in ray.nodes() if n.get("Alive")]) == 1:
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


def _on_node(loop: Callable[[dict], None]) -> Callable[[dict], None]:
    """The loop, after writing this worker's node id where the driver reads it (`fit`)."""

    def run(config: dict) -> None:
        import ray
        import ray.train

        from difforge.platform.datasets import url_to_fs

        fs, folder = url_to_fs(config["nodes_uri"])
        fs.makedirs(folder, exist_ok=True)
        rank = ray.train.get_context().get_world_rank()
        fs.pipe_file(f"{folder}/rank-{rank}", ray.get_runtime_context().get_node_id().encode())
        loop(config)

    run.__name__ = getattr(loop, "__name__", "train_loop")
    return run


def restore(default: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """Inside a worker: the state saved by the latest checkpoint, or `default`."""
    import ray.train
    import torch

    ckpt = ray.train.get_checkpoint()
    if not ckpt:
        return default
    with ckpt.as_directory() as d:
        return torch.load(os.path.join(d, "state.pt"), weights_only=False)


def report(metrics: dict[str, Any], state: dict[str, Any] | None) -> None:
    """Inside a worker: report metrics; rank 0 passes the state to checkpoint, others None."""
    import ray.train
    import torch

    if state is None:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as d:
        torch.save(state, os.path.join(d, "state.pt"))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


def final_state(result) -> dict[str, Any]:
    import torch

    with result.checkpoint.as_directory() as d:
        return torch.load(os.path.join(d, "state.pt"), weights_only=False)


def unwrap(model):
    return model.module if hasattr(model, "module") else model
