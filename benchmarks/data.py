"""Data operators benchmark, with Ray already running.

    .venv/bin/python benchmarks/data.py [--rows 200000]

(a) images/s of `curate.validate` + `image.resize` through difforge (the two steps run in
    one pass, each still committed) against a bare single-process PIL loop doing the same
    per-image work on the same images; and, for comparison, of the two steps each in a pass
    of its own (`fuse=False`);
(b) images/s of `encode.vae` against a bare torch loop with the same VAE and batch size;
(c) peak resident memory (the driver and every process of its private Ray, sampled every
    0.2 s) of the curation steps at 20k and at `--rows` rows.

Writes benchmarks/results/data.json and prints each figure with its ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.engine import make_input  # noqa: E402


class PeakMemory:
    """Peak summed RSS of this process and its descendants (the private Ray this benchmark
    starts: GCS, raylet, workers), sampled every 0.2 s; other processes on the machine, a
    stray Ray among them, are not counted."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        import psutil

        me = psutil.Process()
        total = me.memory_info().rss
        for p in me.children(recursive=True):
            try:
                total += p.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            time.sleep(0.2)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def bare_curation(input_uri: str) -> float:
    """validate's checks and resize's transform in one process, Parquet in and out."""
    import pyarrow.parquet as pq

    from difforge.operators.curate.validate import Params as VP
    from difforge.operators.curate.validate import check
    from difforge.operators.image.resize import Params as RP
    from difforge.operators.image.resize import Resize
    from difforge.platform.datasets import open_dataset
    from difforge.platform.imaging import encode_png

    vp, resize = VP(), Resize(RP(size=32, method="pad"))
    out_dir = tempfile.mkdtemp()
    t0 = time.perf_counter()
    n = 0
    for k, path in enumerate(open_dataset(input_uri).file_uris()):
        table = pq.read_table(path)
        images = []
        for data in table.column("image").to_pylist():
            reason, _, img = check(data, vp)
            if reason is None:
                images.append(encode_png(resize.transform(img)))
        import pyarrow as pa

        pq.write_table(pa.table({"image": images}), f"{out_dir}/{k}.parquet", compression="zstd")
        n += table.num_rows
    return n / (time.perf_counter() - t0)


def curation_spec(storage: str, input_uri: str) -> dict:
    return {
        "name": "bench-data",
        "storage": storage,
        "tracking": {"experiment": "benchmarks"},
        "steps": [
            {"id": "clean", "op": "curate.validate", "inputs": [input_uri]},
            {
                "id": "images",
                "op": "image.resize",
                "inputs": ["clean"],
                "params": {"size": 32, "method": "pad"},
            },
        ],
    }


def save_vae(folder: str) -> str:
    from difforge.models.vae import build_vae
    from difforge.operators.train.vae import Params

    build_vae(Params().model_dump(), 1, 32).save_pretrained(folder)
    return folder


def bare_encode(input_uri: str, vae_dir: str, batch_size: int) -> float:
    import numpy as np
    import pyarrow.parquet as pq
    import torch
    from diffusers import AutoencoderKL

    from difforge.platform.datasets import open_dataset
    from difforge.platform.imaging import to_array

    torch.set_num_threads(os.cpu_count() or 1)
    vae = AutoencoderKL.from_pretrained(vae_dir).eval()
    t0 = time.perf_counter()
    n = 0
    for path in open_dataset(input_uri).file_uris():
        images = pq.read_table(path, columns=["image"]).column("image").to_pylist()
        for s in range(0, len(images), batch_size):
            arr = np.stack([to_array(b, "L") for b in images[s : s + batch_size]])[:, None]
            with torch.no_grad():
                x = torch.from_numpy(arr).float().div_(127.5).sub_(1.0)
                vae.encode(x).latent_dist.mean.numpy()
            n += len(arr)
    return n / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--encode-rows", type=int, default=50_000)
    parser.add_argument("--skip-encode", action="store_true", help="measure curation only")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="difforge-bench-data-"))
    os.environ["DIFFORGE_HOME"] = str(work / "home")
    import ray

    import difforge

    results: dict = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}",
        "command": f"python benchmarks/data.py --rows {args.rows} "
        + ("--skip-encode" if args.skip_encode else f"--encode-rows {args.encode_rows}"),
    }
    big, small = str(work / "in-big"), str(work / "in-small")
    make_input(big, args.rows)
    make_input(small, 20_000)
    padded = str(work / "in-padded")

    bare = bare_curation(big)
    ray.init(address="local", include_dashboard=False)
    with PeakMemory() as mem_small:
        difforge.run(curation_spec(str(work / "s-small"), small))
    with PeakMemory() as mem_big:
        summary = difforge.run(curation_spec(str(work / "s-big"), big))
    seconds = sum(s.seconds for s in summary.steps)
    ours = args.rows / seconds
    # the same two steps, each in a pass of its own (what difforge did before fusing them)
    apart = difforge.run(curation_spec(str(work / "s-apart"), big), fuse=False)
    ours_apart = args.rows / sum(s.seconds for s in apart.steps)
    print(
        f"(a) curation: bare {bare:.0f} images/s, difforge {ours:.0f} images/s, "
        f"ratio {ours / bare:.2f}x (target 1.1x); each step in its own pass "
        f"{ours_apart:.0f} images/s, {ours_apart / bare:.2f}x"
    )
    print(
        f"(c) peak memory: 20k rows {mem_small.peak / 2**20:.0f} MiB, {args.rows} rows "
        f"{mem_big.peak / 2**20:.0f} MiB, ratio {mem_big.peak / mem_small.peak:.2f} (target 1.5)"
    )
    results["curation"] = {
        "rows": args.rows,
        "bare_images_per_s": round(bare),
        "difforge_images_per_s": round(ours),
        "ratio": round(ours / bare, 3),
        "unfused_images_per_s": round(ours_apart),
        "unfused_ratio": round(ours_apart / bare, 3),
        "peak_rss_mib_20k": round(mem_small.peak / 2**20),
        f"peak_rss_mib_{args.rows // 1000}k": round(mem_big.peak / 2**20),
        "peak_ratio": round(mem_big.peak / mem_small.peak, 3),
    }

    out = ROOT / "benchmarks" / "results" / "data.json"
    if args.skip_encode:
        previous = json.loads(out.read_text()) if out.exists() else {}
        # kept as measured, with the command of the run that measured it
        results["encode_vae"] = previous.get("encode_vae")
        if results["encode_vae"] and "command" not in results["encode_vae"]:
            results["encode_vae"]["command"] = previous.get("command")
        out.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {out} (encode_vae kept from the previous run)")
        ray.shutdown()
        return

    # (b) encoding: the padded 32x32 images of the curation run, first --encode-rows of them
    images_uri = summary.step("images").uri
    ds = difforge.open_dataset(images_uri)
    take, files = 0, []
    for f in ds.manifest.files:
        if take >= args.encode_rows:
            break
        files.append(f)
        take += f.rows
    from difforge.platform.outputs import open_output

    entries = [
        {"path": f.path, "rows": f.rows, "bytes": f.bytes, "schema": ds.manifest.arrow_schema}
        for f in files
    ]
    import shutil

    shutil.copytree(images_uri, padded, ignore=shutil.ignore_patterns("_manifest.json", "rejects"))
    open_output(padded).commit(entries, "bench-padded", {"benchmark": "data"})
    vae_dir = save_vae(str(work / "vae"))
    batch = 256
    bare_enc = bare_encode(padded, vae_dir, batch)
    spec = {
        "name": "bench-encode",
        "storage": str(work / "s-enc"),
        "tracking": {"experiment": "benchmarks"},
        "steps": [
            {
                "id": "latents",
                "op": "encode.vae",
                "inputs": [padded],
                "params": {"pretrained": vae_dir},
                "resources": {"batch_size": batch},
            }
        ],
    }
    enc = difforge.run(spec).step("latents")
    ours_enc = take / enc.seconds
    print(
        f"(b) encode.vae: bare torch {bare_enc:.0f} images/s, difforge {ours_enc:.0f} "
        f"images/s, ratio {ours_enc / bare_enc:.2f}x (target 0.9x) over {take} images"
    )
    results["encode_vae"] = {
        "command": results["command"],
        "rows": take,
        "batch_size": batch,
        "bare_images_per_s": round(bare_enc),
        "difforge_images_per_s": round(ours_enc),
        "ratio": round(ours_enc / bare_enc, 3),
    }
    ray.shutdown()
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
