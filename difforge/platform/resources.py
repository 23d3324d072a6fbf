"""What a step asks of the cluster (`Resources`: an operator's defaults, a step's
`resources:` in YAML), and fitting those requests to the cluster it runs on.

A request the cluster can never meet, as it is or as its autoscaler can grow it (capacity.py),
is an error at start, never a silent wait. `num_gpus: auto` takes GPUs where the cluster has or
can have them, so one YAML serves a laptop and a GPU cluster.
A training job with no `num_cpus` takes the largest node's CPUs, divided by its workers.
Actor pools never starve the tasks that feed them (FACTS.md: on a 2-CPU node, two 1-CPU
actors behind a Ray Data read leave no CPU for reading and wait forever). difforge's workers
read their own input shards, so no read tasks compete for CPUs; the pool is still capped so
that actors' CPUs never exceed the cluster's, whatever the YAML asks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from difforge.platform.capacity import Capacity
from difforge.platform.errors import ResourceError

DEFAULT_BATCH_SIZE = 1024


class Resources(BaseModel):
    """What a step asks of the cluster. Resources never change results: anything that does is a param."""

    model_config = ConfigDict(extra="forbid")

    num_cpus: float | None = Field(
        None, gt=0, description="CPUs per task, actor or training worker"
    )
    num_gpus: float | Literal["auto"] | None = Field(
        None,
        description="GPUs (or a fraction) per actor or worker; 'auto': where the cluster has them",
    )
    batch_size: int | None = Field(None, gt=0, description="rows per batch handed to the operator")
    min_actors: int | None = Field(
        None,
        ge=1,
        description="smallest actor pool (default: "
        "the largest, all started at once; less: it grows with "
        "the work queued)",
    )
    max_actors: int | None = Field(None, ge=1, description="largest actor pool")
    num_workers: int | None = Field(None, ge=1, description="training workers of a job operator")

    @field_validator("num_gpus")
    @classmethod
    def _gpus_not_negative(cls, v: float | str | None) -> float | str | None:
        if isinstance(v, float) and v < 0:
            raise ValueError("must be >= 0 or 'auto'")
        return v

    def merged(self, override: Resources | None) -> Resources:
        if override is None:
            return self
        return self.model_copy(update=override.model_dump(exclude_none=True))


@dataclass(frozen=True)
class Fitted:
    num_cpus: float
    num_gpus: float
    batch_size: int
    min_actors: int
    max_actors: int
    num_workers: int


def fit(step: str, res: Resources, cap: Capacity, gpus_when_available: float) -> Fitted:
    """A step's requests fitted to what the cluster holds, or can grow to where an autoscaler
    adds nodes (capacity.py); a request it can never meet is an error now."""
    num_gpus = _gpus(step, res, cap, gpus_when_available)
    cpus = cap.most("CPU")
    # sizes follow the nodes there are; on a cluster scaled to zero, one node of its kind
    node_cpus = cap.largest_node_cpus() or 1.0
    if res.num_cpus is not None:
        num_cpus = float(res.num_cpus)
    elif res.num_workers is not None:
        # a training job: its workers share the largest node's CPUs (its input is in memory,
        # so it needs none of its own); torch then runs as many threads as each worker got
        num_cpus = float(max(1, int(node_cpus // res.num_workers)))
    else:
        num_cpus = 1.0
    num_workers = res.num_workers or 1
    _check_group(step, cap, num_workers, num_cpus, num_gpus)
    # a pool as large as the nodes there are (an autoscaler adds more only where asked)
    pool_cpus = cap.cpus if cap.cpus >= num_cpus else node_cpus
    if num_gpus > 0:
        max_actors = res.max_actors or max(1, int(max(cap.gpus, 1.0) / num_gpus))
    else:
        max_actors = res.max_actors or max(1, int(pool_cpus / num_cpus))
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


def _gpus(step: str, res: Resources, cap: Capacity, gpus_when_available: float) -> float:
    """GPUs per worker: `auto` means the operator's share where the cluster can have GPUs;
    asking for more than any node has is an error."""
    gpus = cap.most("GPU")
    if res.num_gpus == "auto":
        num_gpus = gpus_when_available if cap.can_have_gpus() else 0.0
    else:
        num_gpus = float(res.num_gpus or 0.0)
    if num_gpus > 0 and gpus == 0:
        raise ResourceError(
            f"step '{step}' asks for num_gpus={res.num_gpus} but the cluster has no GPU; "
            "use `num_gpus: auto` to run on GPUs where they exist and on CPUs elsewhere"
        )
    if num_gpus > gpus:
        raise ResourceError(
            f"step '{step}' asks for num_gpus={num_gpus} per worker; the cluster has "
            f"{cap.describe('GPU')}"
        )
    return num_gpus


def _check_group(
    step: str, cap: Capacity, num_workers: int, num_cpus: float, num_gpus: float
) -> None:
    """A worker, and the group of them, within what the cluster holds or can grow to."""
    cpus, gpus = cap.most("CPU"), cap.most("GPU")
    if num_cpus > cpus:
        raise ResourceError(
            f"step '{step}' asks for num_cpus={num_cpus:g} per worker; the cluster has "
            f"{cap.describe('CPU')}"
        )
    if num_workers * num_cpus > cpus:
        raise ResourceError(
            f"step '{step}' asks for {num_workers} workers x {num_cpus:g} CPUs; the cluster has "
            f"{cap.describe('CPU')}. Lower resources.num_workers or resources.num_cpus"
        )
    if num_gpus > 0 and num_workers * num_gpus > gpus:
        raise ResourceError(
            f"step '{step}' asks for {num_workers} workers x {num_gpus:g} GPUs; the cluster has "
            f"{cap.describe('GPU')}"
        )


def demand(kind: str, stateful: bool, res: Resources, fitted: Fitted) -> list[dict[str, float]]:
    """The bundles a step needs placed before its work can start: a training job's workers,
    a model-holding map's smallest pool, else one task."""
    bundle = {"CPU": fitted.num_cpus}
    if fitted.num_gpus:
        bundle["GPU"] = fitted.num_gpus
    if kind == "job" and res.num_workers is not None:
        count = fitted.num_workers
    elif stateful:
        count = fitted.min_actors
    else:
        count = 1
    return [dict(bundle) for _ in range(count)]
