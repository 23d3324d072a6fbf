"""Engine benchmark: what difforge costs and gains over doing the same work by hand.

    .venv/bin/python benchmarks/engine.py [--rows 200000] [--quickstart-storage DIR]

(`--quickstart-storage`: a storage where the quickstart has already run, e.g. ./difforge-data
after `make demo`, so (c) does not compute it all again first.)

(a) a map step that decodes 28x28 PNGs, pads them to 32x32 and re-encodes them, Parquet in
    and out, default resources: difforge (`image.resize`) against the same per-image code in a
    bare single-process loop on the same data, a `multiprocessing` pool over all cores doing
    the same work shard by shard (the practical limit on one node), and plain Ray Data
    (`read_parquet -> map_batches -> write_parquet`); rows/s of each and the ratios, with Ray
    already running and including Ray's start-up (a fresh `difforge run` process);
(b) the wall time of a step that does nothing (the fixed cost of a step);
(c) a fully cached rerun of the quickstart (`difforge run`, a fresh process);
(d) `difforge validate` (a fresh process).

Writes benchmarks/results/engine.json and prints every figure with its ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
sys.path.insert(0, str(ROOT))


def make_input(uri: str, rows: int) -> None:
    """A committed dataset of `rows` 28x28 PNGs, cycled from Fashion-MNIST, 5,000 per shard."""
    import pyarrow as pa

    from difforge.operators.ingest.fashion_mnist import DEFAULT_ROOT, FILES, _load
    from difforge.platform.imaging import encode_png
    from difforge.platform.outputs import open_output

    images, labels = _load(*(os.path.join(DEFAULT_ROOT, f) for f in FILES["train"]))
    pngs = [encode_png(images[i]) for i in range(len(images))]
    out = open_output(uri)
    entries = []
    for start in range(0, rows, 5000):
        idx = [i % len(pngs) for i in range(start, min(start + 5000, rows))]
        n = len(idx)
        table = pa.table(
            {
                "id": [f"bench/{i:07d}" for i in range(start, start + n)],
                "image": pa.array([pngs[i] for i in idx], pa.binary()),
                "format": ["png"] * n,
                "width": pa.array([28] * n, pa.int32()),
                "height": pa.array([28] * n, pa.int32()),
                "mode": ["L"] * n,
                "label": pa.array(labels[idx], pa.int64()),
            }
        )
        entries.append(out.write(table, f"{start:08d}"))
    out.commit(entries, f"bench-input-{rows}", {"benchmark": "engine"})


def bare_loop(input_uri: str, out_dir: str) -> float:
    """The same work by hand: one process, read each shard, transform each image, write."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from difforge.operators.image.resize import Params, Resize
    from difforge.platform.datasets import open_dataset
    from difforge.platform.imaging import decode, encode_png

    op = Resize(Params(size=32, method="pad"))
    ds = open_dataset(input_uri)
    os.makedirs(out_dir, exist_ok=True)
    t0 = time.perf_counter()
    n = 0
    for k, path in enumerate(ds.file_uris()):
        table = pq.read_table(path)
        out = [encode_png(op.transform(decode(b))) for b in table.column("image").to_pylist()]
        table = table.set_column(1, "image", pa.array(out, pa.binary()))
        pq.write_table(table, f"{out_dir}/part-{k:05d}.parquet", compression="zstd")
        n += table.num_rows
    return n / (time.perf_counter() - t0)


def _pad_shard(job: tuple[str, str]) -> int:
    """One shard of the bare loop's work (a pool worker's task)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from difforge.operators.image.resize import Params, Resize
    from difforge.platform.imaging import decode, encode_png

    path, out = job
    op = Resize(Params(size=32, method="pad"))
    table = pq.read_table(path)
    images = [encode_png(op.transform(decode(b))) for b in table.column("image").to_pylist()]
    table = table.set_column(1, "image", pa.array(images, pa.binary()))
    pq.write_table(table, out, compression="zstd")
    return table.num_rows


def process_pool(input_uri: str, out_dir: str) -> float:
    """The bare loop's work spread over every core, a shard per task (workers started first)."""
    import multiprocessing

    from difforge.platform.datasets import open_dataset

    os.makedirs(out_dir, exist_ok=True)
    jobs = [
        (p, f"{out_dir}/part-{k:05d}.parquet")
        for k, p in enumerate(open_dataset(input_uri).file_uris())
    ]
    with multiprocessing.get_context("spawn").Pool(os.cpu_count()) as pool:
        pool.map(abs, range(os.cpu_count() or 1))  # the workers are up
        t0 = time.perf_counter()
        n = sum(pool.map(_pad_shard, jobs, chunksize=1))
        return n / (time.perf_counter() - t0)


def plain_ray_data(input_uri: str, out_dir: str) -> float:
    """The same work as a plain Ray Data program (Ray already running)."""
    import ray.data

    from difforge.operators.image.resize import Params, Resize
    from difforge.platform.datasets import open_dataset
    from difforge.platform.imaging import decode, encode_png

    op = Resize(Params(size=32, method="pad"))

    def pad(batch):
        import pyarrow as pa

        images = [encode_png(op.transform(decode(b))) for b in batch.column("image").to_pylist()]
        return batch.set_column(
            batch.schema.get_field_index("image"), "image", pa.array(images, pa.binary())
        )

    t0 = time.perf_counter()
    data = ray.data.read_parquet(open_dataset(input_uri).file_uris())
    data.map_batches(pad, batch_format="pyarrow").write_parquet(out_dir)
    rows = sum(pq_rows(p) for p in Path(out_dir).glob("*.parquet"))
    return rows / (time.perf_counter() - t0)


def pq_rows(path) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows


def pipeline(storage: str, input_uri: str, op: str = "image.resize") -> dict:
    params = {"size": 32, "method": "pad"} if op == "image.resize" else {}
    return {
        "name": "bench",
        "storage": storage,
        "tracking": {"experiment": "benchmarks"},
        "steps": [{"id": "step", "op": op, "inputs": [input_uri], "params": params}],
    }


def timed_cli(*args: str, env: dict | None = None) -> float:
    t0 = time.perf_counter()
    out = subprocess.run(
        [str(BIN / "difforge"), *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
    )
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--quickstart-storage", help="where the quickstart has run already")
    parser.add_argument("--skip-quickstart", action="store_true", help="(a) and (b) only")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="difforge-bench-"))
    os.environ["DIFFORGE_HOME"] = str(work / "home")
    results: dict = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}",
        "rows": args.rows,
        "command": f"python benchmarks/engine.py --rows {args.rows}"
        + (f" --quickstart-storage {args.quickstart_storage}" if args.quickstart_storage else "")
        + (" --skip-quickstart" if args.skip_quickstart else ""),
    }
    input_uri = str(work / "input")
    t0 = time.perf_counter()
    make_input(input_uri, args.rows)
    print(f"input: {args.rows} PNG rows in {time.perf_counter() - t0:.1f}s")

    bare = bare_loop(input_uri, str(work / "bare"))
    print(f"(a) bare single-process loop:        {bare:9.0f} rows/s")
    pool = process_pool(input_uri, str(work / "pool"))
    print(f"(a) multiprocessing pool, all cores: {pool:9.0f} rows/s")

    # including Ray's start-up: a fresh process, as a user runs it
    spec_path = work / "cold.yaml"
    import yaml

    spec_path.write_text(yaml.safe_dump(pipeline(str(work / "cold"), input_uri)))
    cold_s = timed_cli("run", str(spec_path))
    cold = args.rows / cold_s

    import ray

    import difforge

    ray.init(address="local", include_dashboard=False)
    warm_summary = difforge.run(pipeline(str(work / "warm"), input_uri))
    step = warm_summary.step("step")
    warm = args.rows / step.seconds
    plain = plain_ray_data(input_uri, str(work / "plain"))
    print(f"(a) plain Ray Data, Ray running:     {plain:9.0f} rows/s")
    print(
        f"(a) difforge, Ray running:           {warm:9.0f} rows/s  {warm / bare:.2f}x the "
        f"loop, {warm / pool:.2f}x the pool, {warm / plain:.2f}x plain Ray Data"
    )
    print(f"(a) difforge, with Ray start-up:     {cold:9.0f} rows/s  ratio {cold / bare:.2f}x")
    results["map_step"] = {
        "bare_rows_per_s": round(bare),
        "pool_rows_per_s": round(pool),
        "plain_ray_data_rows_per_s": round(plain),
        "difforge_rows_per_s_ray_running": round(warm),
        "difforge_rows_per_s_with_startup": round(cold),
        "ratio_ray_running": round(warm / bare, 3),
        "ratio_to_pool": round(warm / pool, 3),
        "ratio_to_plain_ray_data": round(warm / plain, 3),
        "ratio_with_startup": round(cold / bare, 3),
        "targets": {"ratio_ray_running": 1.1, "ratio_with_startup": 0.8, "ratio_to_pool": 0.85},
    }

    # (b) a step that does nothing: ten rows through a pass-through map
    tiny = str(work / "tiny")
    make_input(tiny, 10)
    from benchmarks.noop import register_noop

    register_noop()
    times = []
    for k in range(3):
        s = difforge.run(pipeline(str(work / f"noop{k}"), tiny, op="bench.noop"))
        times.append(s.step("step").seconds)
    noop = sorted(times)[1]
    print(f"(b) fixed cost of a step (median of 3): {noop:.2f}s")
    results["noop_step_seconds"] = round(noop, 3)
    ray.shutdown()

    # (c) fully cached rerun of the quickstart, and (d) validate, each a fresh process
    if not args.skip_quickstart:
        qs = str(ROOT / "pipelines" / "quickstart.yaml")
        if args.quickstart_storage:  # computed already: the cache lives in the storage
            storage = f"storage={Path(args.quickstart_storage).resolve()}"
        else:
            storage = f"storage={work / 'quickstart'}"
        timed_cli("run", qs, "--set", storage)
        cached = min(timed_cli("run", qs, "--set", storage) for _ in range(3))
        validate = min(timed_cli("validate", qs, "--set", storage) for _ in range(3))
        print(f"(c) fully cached quickstart rerun:   {cached:.2f}s (target < 5 s)")
        print(f"(d) difforge validate:               {validate:.2f}s (target < 2 s)")
        results["cached_quickstart_seconds"] = round(cached, 2)
        results["validate_seconds"] = round(validate, 2)

    out = ROOT / "benchmarks" / "results" / "engine.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
