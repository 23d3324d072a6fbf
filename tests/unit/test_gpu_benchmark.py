"""`benchmarks/gpu.py` runs on a lent GPU machine, a few minutes at a time: a script that breaks
there wastes them. Its --smoke mode (tiny models and sizes, any device) runs every part here,
so a change to the recipe or the models it measures cannot break it unseen."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PARTS = ("peak", "encode", "train", "diagnose", "compile")


def run_benchmark(out: Path, *args: str, timeout: float) -> dict:
    """`benchmarks/gpu.py ARGS` as the lent machine runs it; the results it wrote to `out`."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu.py"), *args],
        env={**os.environ, "OUT": str(out)},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / "gpu.json").read_text())


@pytest.mark.slow
def test_every_part_of_the_gpu_benchmark_runs(tmp_path):
    only = [arg for part in PARTS for arg in ("--only", part)]
    results = run_benchmark(tmp_path, "--smoke", *only, timeout=600)
    broken = {part: results[part]["error"] for part in PARTS if "error" in results[part]}
    assert not broken, broken
    train = results["train"]
    assert train["recipe_samples_per_s"] > 0 and train["gflop_per_sample"] > 0
    # each variant of the recipe ran (a failed one is reported as its error text)
    variants = train["recipe_variants_samples_per_s"]
    assert set(variants) == {"no_ema", "zero_stage_0", "fp32_weights_bf16_autocast"}
    assert all(isinstance(v, float) and v > 0 for v in variants.values()), variants
    assert results["encode"]["operator_images_per_s"] > 0
    # the profile holds the 2 steady steps it was scheduled for (counted from its optimizer
    # steps), not start-up or the run's other 3; their ops and copies listed
    diagnose = results["diagnose"]
    assert diagnose["profiled_steps"] == 2 and diagnose["device_busy_s"] > 0
    assert diagnose["copies_by_shape"] and (tmp_path / "profile.txt").read_text().strip()


@pytest.mark.gpu
def test_on_a_gpu_the_recipe_trains_at_its_real_sizes_and_reports_its_mfu(tmp_path):
    """Where a CUDA GPU is present (a lent machine), the benchmark's training part at its real
    sizes: the recipe runs and its throughput is a measured fraction of the device's peak."""
    results = run_benchmark(tmp_path, "--only", "peak", "--only", "train", timeout=900)
    train = results["train"]
    assert "error" not in train and train["achieved_tflops"] > 0, train
    # a fraction of the datasheet's dense bf16 peak where the card is known, else of the
    # matmul peak measured on it
    assert 0 < train.get("mfu", train.get("of_measured_matmul", 0)) < 1, train
