"""Manifest commit semantics: a dataset exists only once its manifest is written, exactly one
of two concurrent writers commits, and nothing else is visible."""

from __future__ import annotations

import threading

import pyarrow as pa
import pytest

from difforge.platform import datasets as D
from difforge.platform.errors import DatasetNotCommitted, DifforgeError


def shards(uri: str, attempt: str, n: int = 3) -> list[dict]:
    w = D.ShardWriter(uri, attempt)
    return [
        w.write(pa.table({"id": [f"r{i}-{k}" for k in range(4)], "x": list(range(4))}), f"s{i}")
        for i in range(n)
    ]


def test_uncommitted_dataset_does_not_exist(tmp_path):
    uri = str(tmp_path / "ds")
    shards(uri, D.attempt_id())
    assert not D.is_committed(uri)
    with pytest.raises(DatasetNotCommitted, match="no committed dataset here"):
        D.open_dataset(uri)


def test_commit_then_read_back(tmp_path):
    uri = str(tmp_path / "ds")
    entries = shards(uri, D.attempt_id())
    manifest, ours = D.commit(uri, entries, "fp1", {"step": "s"}, {"classes": ["a"]})
    assert ours and manifest.num_rows == 12
    ds = D.open_dataset(uri)
    assert ds.num_rows == 12 and ds.metadata == {"classes": ["a"]}
    assert ds.manifest.column_names == ["id", "x"]
    table = ds.to_arrow()
    assert table.num_rows == 12 and sorted(table.column("id").to_pylist())[0] == "r0-0"
    assert ds.to_arrow(columns=["x"]).column_names == ["x"]
    assert sum(b.num_rows for b in ds.iter_batches(batch_size=5)) == 12


def test_retried_shards_are_counted_once(tmp_path):
    uri = str(tmp_path / "ds")
    attempt = D.attempt_id()
    entries = shards(uri, attempt) + shards(uri, attempt)  # a task retried writes again
    manifest, _ = D.commit(uri, entries, "fp", {})
    assert manifest.num_rows == 12 and len(manifest.files) == 3


def test_second_commit_loses_and_gets_the_first(tmp_path):
    uri = str(tmp_path / "ds")
    first, ours1 = D.commit(uri, shards(uri, D.attempt_id(), 1), "fp", {"run": 1})
    second, ours2 = D.commit(uri, shards(uri, D.attempt_id(), 2), "fp", {"run": 2})
    assert ours1 and not ours2
    assert second.producer == {"run": 1} and D.open_dataset(uri).num_rows == 4


def test_concurrent_commits_exactly_one_wins(tmp_path):
    uri = str(tmp_path / "ds")
    results, barrier = [], threading.Barrier(8)

    def writer(k: int) -> None:
        entries = shards(uri, D.attempt_id() + f"-{k}", k % 3 + 1)
        barrier.wait()
        results.append(D.commit(uri, entries, "fp", {"writer": k}))

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [m for m, ours in results if ours]
    assert len(winners) == 1
    committed = D.read_manifest(uri)
    assert committed.producer == winners[0].producer
    assert all(m.producer == committed.producer for m, _ in results)
    assert D.open_dataset(uri).to_arrow().num_rows == committed.num_rows


def test_inconsistent_schemas_are_refused(tmp_path):
    uri = str(tmp_path / "ds")
    w = D.ShardWriter(uri, D.attempt_id())
    a = w.write(pa.table({"id": ["a"], "x": [1]}), "a")
    b = w.write(pa.table({"id": ["b"], "x": ["one"]}), "b")
    with pytest.raises(DifforgeError, match="different schemas"):
        D.commit(uri, [a, b], "fp", {"step": "s", "op": "o"})
    assert not D.is_committed(uri)


def test_empty_dataset_keeps_its_schema(tmp_path):
    uri = str(tmp_path / "ds")
    schema = pa.schema([("id", pa.string()), ("x", pa.int64())])
    entry = {"path": "", "rows": 0, "bytes": 0, "schema": D.encode_schema(schema)}
    D.commit(uri, [entry], "fp", {})
    table = D.open_dataset(uri).to_arrow()
    assert table.num_rows == 0 and table.schema == schema


def test_uncommit_and_stale_attempts(tmp_path):
    import time

    uri = str(tmp_path / "ds")
    old = "attempt-20000101T000000-deadbeef"
    shards(uri, old)
    manifest, _ = D.commit(uri, shards(uri, D.attempt_id()), "fp", {})
    D.remove_stale_attempts(uri, manifest, time.time())
    assert not (tmp_path / "ds" / old).exists()
    assert D.open_dataset(uri).num_rows == 12
    D.uncommit(uri)
    assert not D.is_committed(uri)
