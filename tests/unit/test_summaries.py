"""Column summaries a finalize computes a batch at a time: the same answer however the data is
cut into batches, exact where they promise to be, and bounded in what they keep."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa
import pytest

from difforge.platform.summaries import (
    class_count,
    column_max,
    column_sum,
    nearest_rows,
    numeric_summary,
    value_counts,
)


def batches(table: pa.Table, size: int) -> list[pa.RecordBatch]:
    return table.to_batches(max_chunksize=size)


def test_value_counts_add_up_across_batches_and_skip_nulls():
    reasons = ["truncated", None, "too_large", "truncated", "truncated", None, "too_large"]
    table = pa.table({"reason": reasons})
    for size in (1, 2, 7):
        assert value_counts(batches(table, size), "reason") == Counter(
            {"truncated": 3, "too_large": 2}
        )
    assert value_counts([], "reason") == Counter()


def test_numeric_summary_is_exact_below_its_limit():
    values = np.array([3.0, np.nan, 1.0, 2.0, np.inf, 5.0])
    s = numeric_summary(batches(pa.table({"x": values}), 4), "x", len(values))
    assert s.count == 4 and s.mean == pytest.approx(2.75)
    assert sorted(s.sample) == [1.0, 2.0, 3.0, 5.0]  # every finite value


def test_numeric_summary_above_its_limit_keeps_evenly_spaced_rows_whatever_the_batches():
    rng = np.random.default_rng(0)
    values = rng.normal(size=100_003)
    table = pa.table({"x": values})
    summaries = [
        numeric_summary(batches(table, size), "x", len(values), limit=1000)
        for size in (7, 4096, 100_003)
    ]
    for s in summaries:
        assert np.array_equal(s.sample, values[:: -(-len(values) // 1000)])  # rows 0, k, 2k...
        assert len(s.sample) <= 1000
        assert s.count == len(values) and s.mean == pytest.approx(values.mean(), abs=1e-12)
        assert s.quantiles([0.5])[0] == pytest.approx(np.median(values), abs=0.1)


def test_nearest_rows_match_a_sort_of_the_whole_table_and_keep_the_earlier_of_ties():
    rng = np.random.default_rng(1)
    scores = rng.uniform(0, 1, 5000)
    scores[[10, 20]] = 0.5  # a tie at the threshold: the earlier row comes first
    table = pa.table({"id": [f"r{i}" for i in range(len(scores))], "s": scores})
    order = np.argsort(np.abs(scores - 0.5), kind="stable")[:8]
    for size in (3, 1000, 5000):
        near = nearest_rows(batches(table, size), "s", 0.5, 8)
        assert near.column("id").to_pylist() == [f"r{i}" for i in order]
    assert near.column("id").to_pylist()[:2] == ["r10", "r20"]
    assert nearest_rows([], "s", 0.5, 8) is None


def test_column_max_over_batches():
    table = pa.table({"label": [3, None, 9, 1, None]})
    assert [column_max(batches(table, size), "label") for size in (1, 2, 5)] == [9, 9, 9]
    assert (
        column_max(batches(pa.table({"label": pa.array([None], pa.int64())}), 1), "label") is None
    )


def test_column_sum_counts_true_rows_across_batches():
    table = pa.table({"corrupted": [True, False, None, True, True]})
    assert [column_sum(batches(table, size), "corrupted") for size in (1, 2, 5)] == [3, 3, 3]
    assert column_sum([], "corrupted") == 0


def test_class_count_from_metadata_labels_or_neither(tmp_path):
    from difforge.platform.datasets import open_dataset
    from difforge.platform.outputs import write_dataset

    def dataset(name, table, metadata=None):
        write_dataset(str(tmp_path / name), table, name, metadata=metadata)
        return open_dataset(str(tmp_path / name))

    ids = pa.array(["a", "b", "c"])
    named = dataset(
        "named", pa.table({"id": ids, "label": [0, 1, 0]}), {"classes": ["shirt", "shoe", "bag"]}
    )
    assert class_count(named) == 3  # the names, though label 2 never occurs
    assert class_count(dataset("labels", pa.table({"id": ids, "label": [4, 1, 0]}))) == 5
    assert class_count(dataset("none", pa.table({"id": ids}))) == 0
