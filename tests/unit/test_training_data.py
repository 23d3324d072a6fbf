"""The training stream's guarantees, on shards written here: each example once per epoch, an
order fixed by the seed, resuming at any step, mixed batches from class-sorted data, and a
bounded window in memory."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from difforge.diffusion.data import ShardStream, read_batches, with_kept_rows
from difforge.platform import columns as C
from difforge.platform.tensors import to_column

ROW = 4  # bytes of one decoded sample here: a float32 latent of 1x1x1


def write_shards(folder, labels_per_shard: list[list[int]]) -> list[dict]:
    """Shards of 1x1x1 latents whose value is the row's number, with labels."""
    folder.mkdir(parents=True, exist_ok=True)
    shards, start = [], 0
    for k, labels in enumerate(labels_per_shard):
        ids = np.arange(start, start + len(labels), dtype=np.float32)
        start += len(labels)
        table = pa.table(
            {
                C.ID: [str(int(i)) for i in ids],
                C.LATENT: to_column(ids.reshape(-1, 1, 1, 1)),
                C.LABEL: pa.array(labels, pa.int64()),
            }
        )
        path = folder / f"{k:03d}.parquet"
        pq.write_table(table, path)
        shards.append({"file": str(path), "rows": len(labels), "bytes": path.stat().st_size})
    return shards


def stream_rows(stream_of_rank, world: int, batches: int) -> list[int]:
    """The global order: micro batch i of rank 0, of rank 1, ..., then i + 1."""
    rows = []
    for i in range(batches):
        for r in range(world):
            rows += stream_of_rank[r].batch(i).x0.reshape(-1).astype(int).tolist()
    return rows


@pytest.fixture
def uneven(tmp_path):
    sizes = [7, 3, 12, 9, 1, 8, 10]  # 50 rows
    return write_shards(tmp_path / "uneven", [[0] * n for n in sizes])


@pytest.mark.parametrize("window", [1, 16, 1000])
def test_each_example_once_per_epoch_across_ranks(uneven, window):
    world, micro = 2, 3
    ranks = [ShardStream(uneven, C.LATENT, 7, micro, r, world, window * ROW) for r in range(world)]
    rows = stream_rows(ranks, world, 40)  # 240 rows: 4 epochs and a bit
    for epoch in range(4):
        assert sorted(rows[epoch * 50 : (epoch + 1) * 50]) == list(range(50))
    assert rows[:50] != rows[50:100]  # each epoch has its own order


def test_the_order_is_the_seeds_and_a_resumed_stream_continues_it(uneven):
    a = ShardStream(uneven, C.LATENT, 3, 4, 0, 1, 16 * ROW)
    first = [a.batch(i).x0.reshape(-1).tolist() for i in range(30)]
    again = ShardStream(uneven, C.LATENT, 3, 4, 0, 1, 16 * ROW)
    assert [again.batch(i).x0.reshape(-1).tolist() for i in range(30)] == first
    resumed = ShardStream(uneven, C.LATENT, 3, 4, 0, 1, 16 * ROW)  # a restart at step 17
    assert [resumed.batch(i).x0.reshape(-1).tolist() for i in range(17, 30)] == first[17:]
    other = ShardStream(uneven, C.LATENT, 4, 4, 0, 1, 16 * ROW)
    assert [other.batch(i).x0.reshape(-1).tolist() for i in range(30)] != first


def test_batches_from_class_sorted_shards_are_mixed(tmp_path):
    # a class-sorted folder: 10 classes of 100 rows, each written as 4 shards of 25 in order
    shards = write_shards(tmp_path / "sorted", [[c] * 25 for c in range(10) for _ in range(4)])

    def classes_per_batch(window: int) -> list[int]:
        s = ShardStream(shards, C.LATENT, 0, 32, 0, 1, window * ROW)
        return [len(set(s.batch(i).labels.tolist())) for i in range(31)]  # ~one epoch

    whole, eight_shards, one_shard = (classes_per_batch(w) for w in (1000, 200, 25))
    assert min(whole) >= 7  # a full shuffle: nearly every class in every batch of 32
    assert np.mean(eight_shards) >= 4  # a window of 8 shards mixes several classes
    assert np.mean(one_shard) <= 2.5  # one shard per window cannot mix: the knob matters
    s = ShardStream(shards, C.LATENT, 0, 32, 0, 1, 1000 * ROW)
    counts = np.bincount(np.concatenate([s.batch(i).labels for i in range(31)]), minlength=10)
    assert counts.min() >= 95 and counts.max() <= 105  # every class its share over an epoch


def test_memory_holds_a_window_or_two_and_waits_are_counted(tmp_path):
    shards = write_shards(tmp_path / "many", [[0] * 10 for _ in range(30)])
    s = ShardStream(shards, C.LATENT, 0, 8, 0, 1, 20 * ROW)
    for i in range(100):
        s.batch(i)
        assert len(s._cache) <= 2
    assert s.wait_s > 0
    assert (len(s), s.sample_shape, s.has_labels, s.cond_shape) == (300, (1, 1, 1), True, None)


def test_an_empty_input_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no rows"):
        ShardStream([{"file": str(tmp_path / "x"), "rows": 0}], C.LATENT, 0, 4)


def odd(ids: list) -> np.ndarray:
    return np.asarray([int(i) % 2 == 1 for i in ids])


def test_a_stream_of_kept_rows_and_a_bounded_read_of_the_others(uneven):
    """A classifier's split: training streams the kept rows only, each once per epoch;
    evaluation reads the others a shard at a time, up to a limit."""
    kept = with_kept_rows(uneven, odd)
    assert [s["rows"] for s in kept] == [3, 2, 6, 4, 1, 4, 5]  # odd ids of 0-6, 7-9, ...
    world, micro = 2, 2
    ranks = [
        ShardStream(kept, C.LATENT, 1, micro, r, world, 8 * ROW, keep=odd) for r in range(world)
    ]
    rows = stream_rows(ranks, world, 25)  # 100 rows: 4 epochs of the 25 odd rows
    for epoch in range(4):
        assert sorted(rows[epoch * 25 : (epoch + 1) * 25]) == list(range(1, 50, 2))
    evens = [
        b.x0.reshape(-1).astype(int).tolist()
        for b in read_batches(uneven, C.LATENT, limit=10, keep=lambda ids: ~odd(ids))
    ]
    assert [len(b) for b in evens] == [4, 1, 5]  # shard by shard, stopped at the limit
    assert sum(evens, []) == list(range(0, 20, 2))
