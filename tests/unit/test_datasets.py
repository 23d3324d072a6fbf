"""Manifest commit semantics: a dataset exists only once its manifest is written, exactly one
of two concurrent writers commits, and nothing else is visible."""

from __future__ import annotations

import threading
import time

import pyarrow as pa
import pytest

from difforge.platform import datasets as D
from difforge.platform.errors import DatasetNotCommitted, DifforgeError
from difforge.platform.gc import collect_garbage
from difforge.platform.outputs import Output, new_attempt, open_output


def shards(uri: str, attempt: str, n: int = 3) -> list[dict]:
    w = Output(uri, attempt)
    return [
        w.write(pa.table({"id": [f"r{i}-{k}" for k in range(4)], "x": list(range(4))}), f"s{i}")
        for i in range(n)
    ]


def test_uncommitted_dataset_does_not_exist(tmp_path):
    uri = str(tmp_path / "ds")
    shards(uri, new_attempt())
    assert not D.is_committed(uri)
    with pytest.raises(DatasetNotCommitted, match="no committed dataset here"):
        D.open_dataset(uri)


def test_commit_then_read_back(tmp_path):
    uri = str(tmp_path / "ds")
    out = open_output(uri)
    manifest, ours = out.commit(shards(uri, out.attempt), "fp1", {"step": "s"}, {"classes": ["a"]})
    assert ours and manifest.num_rows == 12
    ds = D.open_dataset(uri)
    assert ds.num_rows == 12 and ds.metadata == {"classes": ["a"]}
    assert ds.manifest.column_names == ["id", "x"]
    table = ds.to_arrow()
    assert table.num_rows == 12 and sorted(table.column("id").to_pylist())[0] == "r0-0"
    assert ds.to_arrow(columns=["x"]).column_names == ["x"]
    assert sum(b.num_rows for b in ds.iter_batches(batch_size=5)) == 12


def test_a_commit_refuses_shards_its_process_cannot_see(tmp_path):
    """A shard written where the committing process does not see it (another host's disk), or
    of another size there, is never listed in a manifest: the commit fails and nothing is
    committed."""
    uri = str(tmp_path / "ds")
    out = open_output(uri)
    entries = shards(uri, out.attempt)
    (tmp_path / "ds" / entries[1]["path"]).unlink()
    with pytest.raises(DifforgeError, match=r"1 shard\(s\) this attempt wrote are not where"):
        out.commit(entries, "fp", {})
    with pytest.raises(DatasetNotCommitted):
        D.open_dataset(uri)
    other = open_output(uri)
    entries = shards(uri, other.attempt)
    with open(tmp_path / "ds" / entries[0]["path"], "ab") as f:
        f.write(b"more")
    with pytest.raises(DifforgeError, match=r"bytes listed, \d+ found"):
        other.commit(entries, "fp", {})


def test_retried_shards_are_counted_once(tmp_path):
    uri = str(tmp_path / "ds")
    out = open_output(uri)
    entries = shards(uri, out.attempt) + shards(uri, out.attempt)  # a task retried writes again
    manifest, _ = out.commit(entries, "fp", {})
    assert manifest.num_rows == 12 and len(manifest.files) == 3


def test_second_commit_loses_and_gets_the_first(tmp_path):
    uri = str(tmp_path / "ds")
    a, b = open_output(uri), open_output(uri)
    first, ours1 = a.commit(shards(uri, a.attempt, 1), "fp", {"run": 1})
    second, ours2 = b.commit(shards(uri, b.attempt, 2), "fp", {"run": 2})
    assert ours1 and not ours2
    assert second.producer == {"run": 1} and D.open_dataset(uri).num_rows == 4
    assert not (tmp_path / "ds" / b.attempt).exists()  # the loser's files are gone
    assert (tmp_path / "ds" / a.attempt).exists()


def test_concurrent_commits_exactly_one_wins(tmp_path):
    uri = str(tmp_path / "ds")
    results, barrier = [], threading.Barrier(8)

    def writer(k: int) -> None:
        out = open_output(uri)
        entries = shards(uri, out.attempt, k % 3 + 1)
        barrier.wait()
        results.append(out.commit(entries, "fp", {"writer": k}))

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
    folders = {p.name for p in (tmp_path / "ds").iterdir() if p.name.startswith("attempt-")}
    assert folders == set(committed.attempts())  # the seven losers cleaned up after themselves


def test_inconsistent_schemas_are_refused(tmp_path):
    uri = str(tmp_path / "ds")
    w = open_output(uri)
    a = w.write(pa.table({"id": ["a"], "x": [1]}), "a")
    b = w.write(pa.table({"id": ["b"], "x": ["one"]}), "b")
    with pytest.raises(DifforgeError, match="different schemas"):
        w.commit([a, b], "fp", {"step": "s", "op": "o"})
    assert not D.is_committed(uri)


def test_empty_dataset_keeps_its_schema(tmp_path):
    uri = str(tmp_path / "ds")
    schema = pa.schema([("id", pa.string()), ("x", pa.int64())])
    open_output(uri).commit([Output.empty(schema)], "fp", {})
    table = D.open_dataset(uri).to_arrow()
    assert table.num_rows == 0 and table.schema == schema


def test_stale_attempts_go_and_a_replace_keeps_the_old_commit_until_its_swap(tmp_path):
    import time

    uri = str(tmp_path / "ds")
    old = "attempt-20000101T000000-deadbeef"  # a crashed run's
    shards(uri, old)
    first = open_output(uri)
    manifest, _ = first.commit(shards(uri, first.attempt), "fp", {}, stale_before=time.time())
    assert not (tmp_path / "ds" / old).exists()
    assert D.open_dataset(uri).num_rows == 12
    forced = open_output(uri)
    entries = shards(uri, forced.attempt, 1)
    assert D.open_dataset(uri).num_rows == 12  # visible until the new commit replaces it
    replaced, ours = forced.commit(entries, "fp", {"run": "forced"}, replace=True)
    assert ours and D.open_dataset(uri).num_rows == 4
    assert (tmp_path / "ds" / first.attempt).exists()  # a reader of the old commit may be busy


def test_a_shard_changed_after_its_commit_is_detected(tmp_path):
    uri = str(tmp_path / "ds")
    out = open_output(uri)
    manifest, _ = out.commit(shards(uri, out.attempt, 1), "fp", {})
    path = tmp_path / "ds" / manifest.files[0].path
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(DifforgeError, match="checksum differs"):
        D.open_dataset(uri).to_arrow()
    path.write_bytes(bytes(data[:-1]))
    with pytest.raises(DifforgeError, match="changed after its commit"):
        D.open_dataset(uri).to_arrow()


def test_gc_removes_what_no_commit_uses_and_keeps_what_a_rerun_needs(tmp_path):
    from tests.conftest import difforge_cli

    storage = tmp_path / "storage"
    step = storage / "pipe" / "step"
    v1, v2 = str(step / "00000000000000a1"), str(step / "00000000000000a2")
    out = open_output(v1)
    out.commit(shards(v1, out.attempt), "a1", {})
    crashed = "attempt-20000101T000000-deadbeef"
    shards(v1, crashed)
    racing = open_output(v1).attempt  # a run still writing: young
    shards(v1, racing)
    (step / "00000000000000a1" / "_work").mkdir()
    unfinished = storage / "pipe" / "other" / "00000000000000b1"
    shards(str(unfinished), crashed)
    (unfinished / "_work").mkdir()  # a crashed run's checkpoints: a rerun resumes from them

    done = difforge_cli("gc", str(storage), "--older-than", "1h")
    assert done.returncode == 0, done.stderr
    assert "removed 2 folder(s); 1 committed dataset(s) kept" in done.stdout
    assert (
        not (step / "00000000000000a1" / crashed).exists() and not (unfinished / crashed).exists()
    )
    assert (step / "00000000000000a1" / racing).exists() and (unfinished / "_work").exists()

    dry = difforge_cli("gc", str(storage), "--older-than", "0", "--dry-run")
    assert "would remove 2 folder(s)" in dry.stdout, dry.stdout  # the racing attempt, _work
    assert (step / "00000000000000a1" / racing).exists()

    out2 = open_output(v2)
    out2.commit(shards(v2, out2.attempt), "a2", {})
    report = collect_garbage(str(storage), older_than=0, keep_last=1, now=time.time() + 1)
    assert D.open_dataset(v2).num_rows == 12 and not D.is_committed(v1)
    assert report.kept == 1 and not (step / "00000000000000a1").exists()
    assert (unfinished / "_work").exists()


def test_writers_cut_bounded_shards_and_enough_of_them(tmp_path, monkeypatch):
    """Neither one huge file nor a million small ones: a table is cut by rows and by bytes,
    and a whole table a job returns gets at least two shards per CPU where rows allow."""
    import numpy as np

    from difforge.platform import sizing

    monkeypatch.setattr(sizing, "cluster_cpus", lambda: 2)
    assert sizing.rows_per_shard(1_000_000) == 62_500  # 16 shards of 65,536 rows at most
    assert sizing.rows_per_shard(1_000, nbytes=1_000 * (1 << 20)) == 125  # 1 MiB rows: 128 MiB
    assert sizing.rows_per_shard(10_000, spread=True) == 2_500  # 4 shards keep 2 CPUs busy
    assert sizing.rows_per_shard(300, spread=True) == 300  # too few rows to cut in 256s: one
    out = open_output(str(tmp_path / "ds"))
    table = pa.table({"id": [str(i) for i in range(1000)], "x": np.arange(1000)})
    entries = out.write_batch(table, "000000", spread=True)
    assert [e["rows"] for e in entries] == [334, 334, 332]  # 3 shards of 256 rows at least
    assert len({e["path"] for e in entries}) == 3
    assert [e["rows"] for e in out.write_batch(table, "000001")] == [1000]  # a pass's batch
    out.commit(entries, "fp", {})
    ds = D.Dataset(str(tmp_path / "ds"))
    assert ds.to_arrow().column("id").to_pylist() == table.column("id").to_pylist()


def test_a_pass_splits_too_few_input_shards_into_row_ranges(tmp_path):
    """A one-shard input still keeps every core busy: its rows are cut into ranges, each read
    alone, together exactly the shard's rows."""
    import numpy as np

    from difforge.platform.outputs import write_dataset
    from difforge.platform.parallel import shard_batches
    from difforge.platform.passes import split_shards
    from difforge.platform.sizing import MIN_SHARD_ROWS

    table = pa.table({"id": [str(i) for i in range(1024)], "x": np.arange(1024)})
    write_dataset(str(tmp_path / "one"), table, "fp")
    shards = D.Dataset(str(tmp_path / "one")).shards()
    assert len(shards) == 1
    items = split_shards(shards, want=4)
    assert [(i["start"], i["stop"]) for i in items] == [
        (0, 256),
        (256, 512),
        (512, 768),
        (768, 1024),
    ]
    rows = [x for i in items for b in shard_batches(i, 100) for x in b.column("x").to_pylist()]
    assert rows == list(range(1024))
    assert len(split_shards(shards, want=8)) == 4  # not cut below MIN_SHARD_ROWS rows
    assert split_shards(shards * 4, want=4) == shards * 4  # enough shards: untouched
    assert len(split_shards([{**shards[0], "rows": MIN_SHARD_ROWS}], want=8)) == 1
