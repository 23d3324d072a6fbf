"""Summaries of a column that a step's finalize computes on the driver one batch at a time,
in memory bounded whatever the data's size: the counts of its values, an evenly spaced sample
of a numeric column (for its histogram and quantiles) with its exact mean, and the rows whose
value is nearest a threshold.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

#: values a numeric summary keeps: every value below this many rows, evenly spaced rows above
SAMPLE_LIMIT = 1 << 20


def value_counts(tables: Iterable[pa.Table | pa.RecordBatch], column: str) -> Counter:
    """How often each value of `column` occurs (nulls left out)."""
    import pyarrow.compute as pc

    counts: Counter = Counter()
    for t in tables:
        for item in pc.value_counts(t.column(column)).to_pylist():
            if item["values"] is not None:
                counts[item["values"]] += item["counts"]
    return counts


def column_max(tables: Iterable[pa.Table | pa.RecordBatch], column: str):
    """The largest value of `column` (None if it has none)."""
    import pyarrow.compute as pc

    maxima = [m for t in tables if (m := pc.max(t.column(column)).as_py()) is not None]
    return max(maxima, default=None)


def column_sum(tables: Iterable[pa.Table | pa.RecordBatch], column: str):
    """The sum of `column` (a boolean column: how many rows are true)."""
    import pyarrow.compute as pc

    return sum(pc.sum(t.column(column)).as_py() or 0 for t in tables)


def class_count(dataset) -> int:
    """A dataset's classes: its `classes` metadata, else its largest label + 1 (the label
    column read a batch at a time), else 0 where it has no labels."""
    from difforge.platform import columns as C

    if classes := dataset.metadata.get("classes"):
        return len(classes)
    if C.LABEL not in dataset.manifest.column_names:
        return 0
    return (column_max(dataset.iter_batches(columns=[C.LABEL]), C.LABEL) or -1) + 1


@dataclass
class NumericSummary:
    """A numeric column's exact count and mean of its finite values, and `sample`: all of them
    up to `SAMPLE_LIMIT` rows, every k-th row beyond (k fixed by the row count, so the same data
    gives the same sample), from which histograms and quantiles are drawn."""

    count: int
    mean: float
    sample: np.ndarray

    def quantiles(self, qs: list[float]) -> np.ndarray:
        return np.quantile(self.sample, qs)


def numeric_summary(
    tables: Iterable[pa.Table | pa.RecordBatch], column: str, rows: int, limit: int = SAMPLE_LIMIT
) -> NumericSummary:
    """`column` over `tables` (`rows` in all, as the manifest says), a batch at a time."""
    stride = max(1, -(-rows // limit))
    seen = count = 0
    total = 0.0
    kept: list[np.ndarray] = []
    for t in tables:
        values = t.column(column).to_numpy(zero_copy_only=False).astype(np.float64)
        first = (-seen) % stride  # the batch's first row at a multiple of the stride
        picked = values[first::stride]
        kept.append(picked[np.isfinite(picked)])
        finite = values[np.isfinite(values)]
        count += len(finite)
        total += float(finite.sum())
        seen += len(values)
    sample = np.concatenate(kept) if kept else np.zeros(0)
    return NumericSummary(count, total / count if count else float("nan"), sample)


def nearest_rows(
    tables: Iterable[pa.Table | pa.RecordBatch], column: str, t: float, n: int
) -> pa.Table | None:
    """The `n` rows whose `column` is nearest `t` (ties: the earlier row), keeping at most
    2n rows at any time."""
    import pyarrow.compute as pc

    best = None
    for batch in tables:
        table = batch if isinstance(batch, pa.Table) else pa.Table.from_batches([batch])
        if best is not None:
            table = pa.concat_tables([best, table.select(best.column_names)])
        order = pc.sort_indices(pc.abs(pc.subtract(table.column(column), t)))
        best = table.take(order.slice(0, n))
    return best
