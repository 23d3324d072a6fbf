"""Node lineage: which Ray nodes a step's work ran on. Writers report their node with each shard
they describe; the executor collects them for the running step (`nodes_seen`) and records them
in its manifest and MLflow run."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar


def this_node() -> str:
    """The Ray node id of this process ("" outside Ray)."""
    import sys

    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return ""
    return ray.get_runtime_context().get_node_id()


#: the nodes whose work the running step's writers reported (see `nodes_seen`)
_NODES: ContextVar[set[str] | None] = ContextVar("difforge_nodes", default=None)


@contextmanager
def nodes_seen() -> Iterator[set[str]]:
    """Within: every shard description collected (and `saw_nodes`) adds the node it was
    written on to the set yielded, which the executor records with the step."""
    token = _NODES.set(set())
    try:
        yield _NODES.get()
    finally:
        _NODES.reset(token)


def saw_nodes(nodes: Iterable[str | None]) -> None:
    seen = _NODES.get()
    if seen is not None:
        seen.update(n for n in nodes if n)
