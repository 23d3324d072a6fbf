"""Exact dedup benchmark: what `curate.dedup_exact` costs, small and large.

    .venv/bin/python benchmarks/dedup.py [--rows 1000000] [--small-rows 10000] [--repeats 3]

Ray is up and its worker processes started (a small untimed run first).

(a) At `--small-rows` rows (28x28 Fashion-MNIST PNGs), the `curate.dedup_exact` step's time
    against `curate.validate`'s on the same rows in the same pipeline run (both decode every
    image); `--repeats` runs, medians; target <= 1.5x.
(b) At `--rows` rows (distinct images: Fashion-MNIST with the row number stamped into the first
    pixels; 10% of the rows byte copies of earlier rows, 1% pixel copies re-encoded at another
    PNG compression level), the step against a `multiprocessing` pool over all cores doing the
    same work on the same shards: hash every image's decoded pixels and bytes (a task per
    shard), group by pixel hash in the parent and keep the lowest id of each group, then write
    each shard's kept rows (a task per shard). Rows/s of both, the ratio (target >= 0.8x), and
    whether the two dropped the same rows. One run of each (the data is large).

Writes benchmarks/results/dedup.json. The data is written under a temporary folder and
deleted at the end.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SHARD_ROWS = 5000


def _png(pixels, level: int = 6) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=level)
    return buf.getvalue()


@functools.cache
def _fashion():
    from difforge.operators.ingest.fashion_mnist import DEFAULT_ROOT, FILES, _load

    return _load(*(os.path.join(DEFAULT_ROOT, f) for f in FILES["train"]))[0]


def _make_shard(job: tuple[int, int, int, Any]) -> dict:
    """One shard of the large dataset, rows [start, stop) of `rows`, written by `out`."""
    import numpy as np
    import pyarrow as pa

    start, stop, rows, out = job
    images = _fashion()
    byte_copies, pixel_copies = rows // 10, rows // 100
    originals = rows - byte_copies - pixel_copies
    rng = np.random.default_rng(start)
    ids, data = [], []
    for i in range(start, stop):
        if i < originals:
            source, level = i, 6
        else:  # a copy of an earlier original: the same bytes, or the same pixels re-encoded
            source, level = int(rng.integers(0, originals)), 6 if i < originals + byte_copies else 1
        pixels = images[source % len(images)].copy()
        pixels[0, :4] = np.frombuffer(int(source).to_bytes(4, "big"), np.uint8)
        ids.append(f"row/{i:08d}")
        data.append(_png(pixels, level))
    return out.write(pa.table({"id": ids, "image": pa.array(data, pa.binary())}), f"{start:09d}")


def write_large(uri: str, rows: int) -> None:
    """The large dataset as a committed difforge dataset, its shards made by a process pool."""
    import multiprocessing

    from difforge.platform.outputs import open_output

    out = open_output(uri)
    jobs = [(s, min(s + SHARD_ROWS, rows), rows, out) for s in range(0, rows, SHARD_ROWS)]
    with multiprocessing.get_context("spawn").Pool(os.cpu_count()) as pool:
        entries = pool.map(_make_shard, jobs, chunksize=1)
    out.commit(entries, f"bench-dedup-{rows}", {"benchmark": "dedup"})


def _hash_shard(path: str) -> tuple[list, list, list]:
    import pyarrow.parquet as pq

    from difforge.operators.curate._hashes import content_hash, pixel_hash

    table = pq.read_table(path, columns=["id", "image"])
    images = table.column("image").to_pylist()
    return (
        table.column("id").to_pylist(),
        [pixel_hash(b) for b in images],
        [content_hash(b) for b in images],
    )


def _write_kept(job: tuple[str, str, set]) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path, out, dropped = job
    table = pq.read_table(path)
    keep = [i not in dropped for i in table.column("id").to_pylist()]
    table = table.filter(pa.array(keep))
    pq.write_table(table, out)
    return table.num_rows


def pool_dedup(uri: str, out_dir: str) -> tuple[float, set]:
    """The same work by hand over every core: (rows/s, the dropped ids)."""
    import multiprocessing

    from difforge.platform.datasets import open_dataset

    paths = open_dataset(uri).file_uris()
    os.makedirs(out_dir, exist_ok=True)
    with multiprocessing.get_context("spawn").Pool(os.cpu_count()) as pool:
        pool.map(abs, range(os.cpu_count() or 1))  # the workers are up
        t0 = time.perf_counter()
        first: dict[str, str] = {}
        shard_of: dict[str, int] = {}
        dropped_by_shard: list[set] = [set() for _ in paths]
        rows = 0
        for k, (ids, keys, _) in enumerate(pool.imap(_hash_shard, paths, chunksize=1)):
            rows += len(ids)
            for i, key in zip(ids, keys, strict=True):
                kept = first.get(key)
                if kept is None or i < kept:
                    if kept is not None:  # the earlier keeper is the duplicate now
                        dropped_by_shard[shard_of[kept]].add(kept)
                    first[key], shard_of[i] = i, k
                else:
                    dropped_by_shard[k].add(i)
        jobs = [
            (p, f"{out_dir}/part-{k:05d}.parquet", dropped_by_shard[k]) for k, p in enumerate(paths)
        ]
        sum(pool.map(_write_kept, jobs, chunksize=1))
        seconds = time.perf_counter() - t0
    return rows / seconds, set().union(*dropped_by_shard)


def small_input(uri: str, rows: int) -> None:
    from benchmarks.engine import make_input

    make_input(uri, rows)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--small-rows", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="difforge-bench-dedup-"))
    os.environ["DIFFORGE_HOME"] = str(work / "home")
    import ray

    import difforge

    results: dict = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}",
        "command": f"python benchmarks/dedup.py --rows {args.rows} --small-rows "
        f"{args.small_rows} --repeats {args.repeats}",
    }
    ray.init(address="local", include_dashboard=False)
    small = str(work / "small")
    small_input(small, args.small_rows)

    def both(name: str) -> tuple[float, float]:
        spec = {
            "name": "bench-dedup",
            "storage": str(work / name),
            "tracking": {"experiment": "benchmarks"},
            "steps": [
                {"id": "clean", "op": "curate.validate", "inputs": [small]},
                {"id": "unique", "op": "curate.dedup_exact", "inputs": [small]},
            ],
        }
        summary = difforge.run(spec)
        return summary.step("clean").seconds, summary.step("unique").seconds

    both("warm-up")  # Ray's worker processes start here, untimed
    runs = [both(f"small{r}") for r in range(args.repeats)]
    validate_s = statistics.median(r[0] for r in runs)
    dedup_s = statistics.median(r[1] for r in runs)
    print(
        f"(a) {args.small_rows} rows, medians of {args.repeats}: curate.dedup_exact "
        f"{dedup_s:.2f} s, curate.validate {validate_s:.2f} s, ratio "
        f"{dedup_s / validate_s:.2f}x (target <= 1.5x)"
    )
    results["small"] = {
        "rows": args.small_rows,
        "repeats": args.repeats,
        "validate_s": round(validate_s, 3),
        "dedup_exact_s": round(dedup_s, 3),
        "ratio": round(dedup_s / validate_s, 3),
        "runs_validate_dedup_s": [[round(a, 3), round(b, 3)] for a, b in runs],
    }

    large = str(work / "large")
    t0 = time.perf_counter()
    write_large(large, args.rows)
    print(f"wrote {args.rows} rows in {time.perf_counter() - t0:.0f} s")
    bare_rate, bare_dropped = pool_dedup(large, str(work / "pool-out"))
    spec = {
        "name": "bench-dedup-large",
        "storage": str(work / "large-run"),
        "tracking": {"experiment": "benchmarks"},
        "steps": [{"id": "unique", "op": "curate.dedup_exact", "inputs": [large]}],
    }
    step = difforge.run(spec).step("unique")
    ours = args.rows / step.seconds
    found = difforge.open_dataset(f"{step.uri}/duplicates").to_arrow()
    dropped = set(found.column("id").to_pylist())
    same = dropped == bare_dropped
    print(
        f"(b) {args.rows} rows: multiprocessing pool {bare_rate:,.0f} rows/s, difforge "
        f"{ours:,.0f} rows/s, ratio {ours / bare_rate:.2f}x (target >= 0.8x); dropped "
        f"{len(dropped):,} rows, the pool {len(bare_dropped):,}, the same: {same}"
    )
    results["large"] = {
        "rows": args.rows,
        "pool_rows_per_s": round(bare_rate),
        "difforge_rows_per_s": round(ours),
        "ratio": round(ours / bare_rate, 3),
        "dropped": len(dropped),
        "pool_dropped": len(bare_dropped),
        "same_rows_dropped": same,
    }
    ray.shutdown()
    shutil.rmtree(work, ignore_errors=True)
    out = ROOT / "benchmarks" / "results" / "dedup.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
