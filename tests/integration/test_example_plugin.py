"""The example plugin (examples/difforge-example-plugin), as a user installs and runs it: it
appears in `difforge ops` through its entry point, and runs in a pipeline (its filter fused
with its neighbours and alone, its model-holding map as an actor pool), writing the same
datasets either way."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from ray import cloudpickle

import difforge
from difforge.platform import registry
from tests.conftest import BIN, ROOT

PLUGIN = ROOT / "examples" / "difforge-example-plugin"


@pytest.fixture
def installed(tmp_path, monkeypatch):
    """The plugin installed the way pip would: its package on the path and a dist-info with
    its entry point (no network, no build)."""
    info = tmp_path / "site" / "difforge_example_plugin-0.1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: difforge-example-plugin\nVersion: 0.1.0\n"
    )
    text = (PLUGIN / "pyproject.toml").read_text()
    section = text.split('[project.entry-points."difforge.operators"]', 1)[1].split("\n[", 1)[0]
    lines = [x for x in section.strip().splitlines() if x and not x.startswith("#")]
    (info / "entry_points.txt").write_text(
        "[difforge.operators]\n"
        + "\n".join(x.replace('"', "").replace(" ", "") for x in lines)
        + "\n"
    )
    paths = f"{PLUGIN / 'src'}:{tmp_path / 'site'}"
    monkeypatch.syspath_prepend(str(PLUGIN / "src"))
    from difforge_example import brightness, sharpness

    for module in (brightness, sharpness):
        cloudpickle.register_pickle_by_value(module)  # Ray's workers get it by value
    registry.register(brightness.MinBrightness)
    registry.register(sharpness.Sharpness)
    yield paths
    registry.unregister("example.min_brightness")
    registry.unregister("example.sharpness")


def test_it_is_listed_by_difforge_ops(installed):
    env = {**os.environ, "PYTHONPATH": installed}
    done = subprocess.run(
        [str(BIN / "difforge"), "ops", "example.min_brightness"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    assert "example.min_brightness  (v1, filter)  Rejects images darker" in done.stdout
    assert "threshold: float (default 20.0)" in done.stdout


def test_it_runs_fused_and_alone_with_the_same_output(ray_session, installed, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        top = 10 if i % 4 == 0 else 255
        Image.fromarray(rng.integers(0, top, (8, 8, 3), np.uint8)).save(folder / f"{i}.png")

    def spec(storage):
        return {
            "name": "plugin",
            "storage": str(storage),
            "steps": [
                {
                    "id": "raw",
                    "op": "ingest.images",
                    "params": {"path": str(folder)},
                    "resources": {"batch_size": 5},
                },
                {"id": "clean", "op": "curate.validate", "inputs": ["raw"]},
                {"id": "sharp", "op": "example.sharpness", "inputs": ["clean"]},  # actors
                {
                    "id": "bright",
                    "op": "example.min_brightness",
                    "inputs": ["sharp"],
                    "params": {"threshold": 30},
                    "resources": {"batch_size": 4},
                },
            ],
        }

    fused = difforge.run(spec(tmp_path / "a"))
    alone = difforge.run(spec(tmp_path / "b"), fuse=False)
    for out in ("", "/rejects"):
        a = difforge.open_dataset(fused.step("bright").uri + out).to_arrow().sort_by("id")
        b = difforge.open_dataset(alone.step("bright").uri + out).to_arrow().sort_by("id")
        assert a.equals(b)
    assert fused.step("bright").rows_out == 9 and fused.step("bright").side_rows == {"rejects": 3}
    scores = difforge.open_dataset(fused.step("sharp").uri).to_arrow().column("sharpness")
    assert scores.null_count == 0 and min(scores.to_pylist()) > 0  # noise is anything but flat


def test_its_own_tests_pass():
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(PLUGIN / "tests")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=PLUGIN,
    )
    assert done.returncode == 0, done.stdout + done.stderr
