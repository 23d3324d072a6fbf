"""Feature statistics in bounded memory equal the whole-array ones, and the rows a metric
chooses are chosen once, by the seed, and read alone."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from difforge.models.features import choose_rows
from difforge.models.metrics import FeatureStats, frechet_distance, frechet_from_stats
from difforge.platform import datasets as D
from difforge.platform.outputs import write_dataset
from difforge.platform.parallel import shard_batches


def test_streamed_statistics_equal_the_whole_arrays():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(3000, 16)) @ rng.normal(size=(16, 16))
    b = rng.normal(1.0, 2.0, size=(2000, 16))
    stats = []
    for x in (a, b):
        s = FeatureStats(len(x), keep=500, seed=3)
        for start in range(0, len(x), 77):  # uneven batches, as shards come
            s.add(x[start : start + 77])
        np.testing.assert_allclose(s.mean, x.mean(0), rtol=1e-10)
        np.testing.assert_allclose(s.cov, np.cov(x, rowvar=False), rtol=1e-8, atol=1e-10)
        assert s.subset.shape == (500, 16) and s.n == len(x)
        assert {tuple(r) for r in s.subset} <= {tuple(r) for r in x}  # rows of the set
        stats.append(s)
    fd = frechet_from_stats(stats[0].mean, stats[0].cov, stats[1].mean, stats[1].cov)
    assert abs(fd - frechet_distance(a, b)) < 1e-6 * fd


def test_chosen_rows_are_fixed_by_the_seed_and_read_alone(tmp_path):
    table = pa.table({"id": [str(i) for i in range(1000)], "x": np.arange(1000)})
    write_dataset(str(tmp_path / "d"), table, "fp", shard_rows=300)
    ds = D.Dataset(str(tmp_path / "d"))
    take = choose_rows(ds, 100, seed=5)
    assert take == choose_rows(ds, 100, seed=5) and take != choose_rows(ds, 100, seed=6)
    assert len(take) == 4 and sum(len(t) for t in take) == 100  # per shard, 100 in all
    assert choose_rows(ds, 1000, seed=5) is None  # all rows: nothing to choose
    got = []
    for shard, rows in zip(ds.shards(), take, strict=True):
        for batch in shard_batches({**shard, "take": rows}, 64, ["x"]):
            got += batch.column("x").to_pylist()
    starts = [0, 300, 600, 900]
    assert got == [s + r for s, rows in zip(starts, take, strict=True) for r in rows]
