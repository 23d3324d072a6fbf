"""Fusion: one pure rule over the plan, applied apart from execution: which consecutive steps
share a pass over the data. Unit-tested without Ray."""

from __future__ import annotations

from difforge.platform.operator import MAIN, MapOperator, SourceOperator
from difforge.platform.plan import PlannedStep


def plain_map(op_cls: type) -> bool:
    """A map operator that holds no model, keeps no per-shard progress and does not read its
    input whole: fusable."""
    return (
        issubclass(op_cls, MapOperator)
        and not getattr(op_cls, "stateful", False)
        and not getattr(op_cls, "resumable", False)
        and not getattr(op_cls, "reads_whole_input", False)
    )


def _cpu_only(step: PlannedStep) -> bool:
    gpus = step.resources.num_gpus
    return gpus in (None, 0, 0.0) or (gpus == "auto" and not step.op_cls.gpus_when_available)


def fusable(a: PlannedStep, b: PlannedStep) -> bool:
    """Can `b` run in the same pass as `a`, on `a`'s batches while they are in memory?

    Both must compute (neither cached), `a` a source or a plain map and `b` a plain map whose
    only input is `a`'s main output, both on CPUs with the same CPUs per task.
    """
    if a.cached or b.cached or not (plain_map(a.op_cls) or issubclass(a.op_cls, SourceOperator)):
        return False
    if not plain_map(b.op_cls) or len(b.inputs) != 1:
        return False
    ref = b.inputs[0]
    return (
        ref.step == a.id
        and ref.output == MAIN
        and _cpu_only(a)
        and _cpu_only(b)
        and (a.resources.num_cpus or 1.0) == (b.resources.num_cpus or 1.0)
    )


def passes(steps: list[PlannedStep], fuse: bool = True) -> list[list[PlannedStep]]:
    """Group the plan's steps into passes: a step joins the pass whose last step is its input
    when the two are fusable; every other step is a pass of its own. Order stays topological
    (a fused step depends on nothing but the step before it)."""
    groups: list[list[PlannedStep]] = []
    for step in steps:
        host = next((g for g in groups if fuse and fusable(g[-1], step)), None)
        if host is not None:
            host.append(step)
        else:
            groups.append([step])
    return groups
