"""Fitting a step's resource requests to the cluster it runs on.

A request the cluster can never meet is an error at start, never a silent wait. `num_gpus:
auto` takes GPUs where the cluster has them, so one YAML serves a laptop and a GPU cluster.
A training job with no `num_cpus` takes the largest node's CPUs, divided by its workers.
Actor pools never starve the tasks that feed them (FACTS.md: on a 2-CPU node, two 1-CPU
actors behind a Ray Data read leave no CPU for reading and wait forever). difforge's workers
read their own input shards, so no read tasks compete for CPUs; the pool is still capped so
that actors' CPUs never exceed the cluster's, whatever the YAML asks.
"""

from __future__ import annotations

from dataclasses import dataclass

from difforge.platform.errors import ResourceError
from difforge.platform.spec import Resources

DEFAULT_BATCH_SIZE = 1024


@dataclass(frozen=True)
class Fitted:
    num_cpus: float
    num_gpus: float
    batch_size: int
    min_actors: int
    max_actors: int
    num_workers: int


def fit(step: str, res: Resources, cluster: dict[str, float], gpus_when_available: float) -> Fitted:
    cpus = float(cluster.get("CPU", 0))
    gpus = float(cluster.get("GPU", 0))
    if res.num_gpus == "auto":
        num_gpus = gpus_when_available if gpus > 0 else 0.0
    else:
        num_gpus = float(res.num_gpus or 0.0)
    if num_gpus > 0 and gpus == 0:
        raise ResourceError(
            f"step '{step}' asks for num_gpus={res.num_gpus} but the cluster has no GPU; "
            "use `num_gpus: auto` to run on GPUs where they exist and on CPUs elsewhere"
        )
    if num_gpus > gpus:
        raise ResourceError(
            f"step '{step}' asks for num_gpus={num_gpus} per worker; the cluster has {gpus:g}"
        )
    node_cpus = float(cluster.get("node_cpus", cpus))
    if res.num_cpus is not None:
        num_cpus = float(res.num_cpus)
    elif res.num_workers is not None:
        # a training job: its workers share the largest node's CPUs (its input is in memory,
        # so it needs none of its own); torch then runs as many threads as each worker got
        num_cpus = float(max(1, int(node_cpus // res.num_workers)))
    else:
        num_cpus = 1.0
    if num_cpus > cpus:
        raise ResourceError(
            f"step '{step}' asks for num_cpus={num_cpus:g} per worker; the cluster has {cpus:g}"
        )
    num_workers = res.num_workers or 1
    if num_workers * num_cpus > cpus:
        raise ResourceError(
            f"step '{step}' asks for {num_workers} workers x {num_cpus:g} CPUs; the cluster has "
            f"{cpus:g} CPUs. Lower resources.num_workers or resources.num_cpus"
        )
    if num_gpus > 0 and num_workers * num_gpus > gpus:
        raise ResourceError(
            f"step '{step}' asks for {num_workers} workers x {num_gpus:g} GPUs; the cluster has "
            f"{gpus:g} GPUs"
        )
    if num_gpus > 0:
        max_actors = res.max_actors or max(1, int(gpus / num_gpus))
    else:
        max_actors = res.max_actors or max(1, int(cpus / num_cpus))
        if max_actors * num_cpus > cpus:
            # more actors than fit: share the CPUs rather than wait for ones that never free up
            num_cpus = cpus / max_actors
    # a fixed pool by default: every actor loads its model at once, where a growing pool
    # would start one and add the others only once work queues (seconds later each)
    min_actors = min(res.min_actors or max_actors, max_actors)
    return Fitted(
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        batch_size=res.batch_size or DEFAULT_BATCH_SIZE,
        min_actors=min_actors,
        max_actors=max_actors,
        num_workers=num_workers,
    )
