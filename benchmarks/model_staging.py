"""Staging a model folder for its MLflow model (`difforge.diffusion.serving`): the folder
copied under its artifact name (before), against hard-linked there (now; MLflow then copies the
weights once, into the MLflow model). 512 MiB of weights, the two alternated 3 times in one
run; prints each one's median seconds and their ratio.

    python benchmarks/model_staging.py
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time

from difforge.diffusion.serving import _link_or_copy


def main() -> None:
    root = tempfile.mkdtemp()
    src = os.path.join(root, "folder", "model")
    os.makedirs(src)
    with open(os.path.join(src, "diffusion_pytorch_model.safetensors"), "wb") as f:
        f.write(os.urandom(512 << 20))
    times: dict[str, list[float]] = {"copy": [], "link": []}
    try:
        for _ in range(3):
            for name, fn in (("copy", shutil.copy2), ("link", _link_or_copy)):
                dst = os.path.join(root, f"staged-{name}")
                t = time.perf_counter()
                shutil.copytree(os.path.dirname(src), dst, copy_function=fn)
                os.sync()
                times[name].append(time.perf_counter() - t)
                shutil.rmtree(dst)
    finally:
        shutil.rmtree(root)
    copy, link = statistics.median(times["copy"]), statistics.median(times["link"])
    print(f"staging 512 MiB: copy {copy:.3f} s, hard links {link:.4f} s ({copy / link:.0f}x)")


if __name__ == "__main__":
    main()
