"""What workers report to the driver: a table describing the shards a batch's outputs were
written to, with a first `STATS` row counting the rows the batch took in, and the node it ran
on; `collect` turns those rows back into each output's shard entries."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from difforge.platform.errors import DifforgeError
from difforge.platform.lineage import saw_nodes, this_node
from difforge.platform.outputs import MAIN, Output

if TYPE_CHECKING:
    import pyarrow as pa

#: the row of a batch's description that counts the rows it took in (not a shard)
STATS = "__stats__"


def write_batch(
    result: pa.Table | dict[str, pa.Table | None],
    outputs: Mapping[str, Output],
    key: str,
    rows_in: int,
) -> pa.Table:
    """Write a batch's outputs (the main table, or a dict by output name) as shards named
    `key`; return a small table describing them, with a first `STATS` row counting `rows_in`."""
    import pyarrow as pa

    tables = result if isinstance(result, dict) else {MAIN: result}
    unknown = set(tables) - set(outputs)
    if unknown:
        raise DifforgeError(f"operator returned undeclared outputs: {sorted(unknown)}")
    node = this_node()  # where the work was done, recorded with the step
    rows: list[dict[str, Any]] = [
        {"output": STATS, "path": "", "rows": rows_in, "bytes": 0, "sha256": "", "schema": ""}
    ]
    for name, table in tables.items():
        if table is not None:
            rows += [{"output": name, **e} for e in outputs[name].write_batch(table, key)]
    return pa.Table.from_pylist([{**r, "node": node} for r in rows])


def collect(rows: Iterable[Mapping[str, Any]], names: Iterable[str]) -> dict[str, list[dict]]:
    """Shard entries by output name, from the rows `write_batch` described (STATS skipped)."""
    entries: dict[str, list[dict]] = {name: [] for name in names}
    for row in rows:
        saw_nodes([row.get("node")])
        if row["output"] != STATS:
            entries[row["output"]].append(dict(row))
    return entries
