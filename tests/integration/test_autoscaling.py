"""An autoscaling cluster that starts from nothing: a head with 0 CPUs (as KubeRay's and the
cluster launcher's) and node types that scale from zero, run by Ray's own autoscaler with its
fake multi-node provider (each added node is a real raylet on this machine). Steps are fitted
against what the cluster can grow to, their demand reaches the autoscaler, the console says
that a step waits for nodes, and a wait no node type can end stops at its time-out."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import yaml

import difforge
from tests.conftest import difforge_cli, free_port, local_service, wait_for

# Node types: 1-CPU nodes (at most 2) and one "GPU" node: Ray schedules on its GPU resource,
# and the step computes on CPU, since no real GPU exists here (the device is torch's to find).
NODE_TYPES = {
    "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
    "cpu": {"resources": {"CPU": 1}, "node_config": {}, "min_workers": 0, "max_workers": 2},
    "gpu": {
        "resources": {"CPU": 1, "GPU": 1},
        "node_config": {},
        "min_workers": 0,
        "max_workers": 1,
    },
}
# the launcher's fields this provider leaves empty (Ray fills them from a defaults file that
# its wheel does not ship)
EMPTY = ("file_mounts", "docker")
NONE = ("cluster_synced_files", "rsync_exclude", "rsync_filter", "initialization_commands")
NONE += tuple(f"{who}_commands" for who in ("setup", "head_setup", "worker_setup"))
NONE += ("head_start_ray_commands", "worker_start_ray_commands")


# every node and driver on 127.0.0.1, listening there only: Ray otherwise replaces a loopback
# address with the machine's own (difforge/platform/runtime.py, loopback_only)
LOOPBACK = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


@pytest.fixture(scope="module")
def autoscaling_cluster():
    state = Path(tempfile.mkdtemp(prefix="difforge-autoscale-"))
    port = free_port()
    config = {
        "cluster_name": "difforge-fake",
        "max_workers": 3,
        "upscaling_speed": 10.0,
        "idle_timeout_minutes": 1,
        "provider": {
            "type": "fake_multinode",
            "gcs_address": f"127.0.0.1:{port}",
            "launch_multiple": True,
            "disable_launch_config_check": True,
            "disable_node_updaters": True,
            "foreground_node_launch": True,
        },
        "auth": {"ssh_user": "ray"},
        "available_node_types": NODE_TYPES,
        "head_node_type": "ray.head.default",
        "file_mounts_sync_continuously": False,
        **{k: {} for k in EMPTY},
        **{k: [] for k in NONE},
    }
    (state / "cluster.yaml").write_text(yaml.safe_dump(config))
    env = {
        "RAY_PORT": str(port),
        "RAY_DASHBOARD_PORT": str(free_port()),
        "RAY_AGENT_PORT": str(free_port()),
        "RAY_CLIENT_PORT": str(free_port()),
        "RAY_NUM_CPUS": "0",
        "RAY_TEMP_DIR": str(state / "ray"),
        "RAY_AUTOSCALING_CONFIG": str(state / "cluster.yaml"),
        "RAY_FAKE_CLUSTER": "1",  # Ray's provider for nodes on one machine
        **LOOPBACK,
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "3",
    }
    stop, _ = local_service("ray.sh", state, env)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        stop()
        end_processes_of(state)
        shutil.rmtree(state, ignore_errors=True)


def end_processes_of(state: Path) -> None:
    """The added nodes' processes the head's stop leaves (their log monitors outlive it): each
    names this cluster's own temp folder on its command line."""
    mine = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if str(state).encode() in (proc / "cmdline").read_bytes():
                mine.append(int(proc.name))
        except OSError:
            continue
    for pid in mine:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def pipeline(tmp_path: Path, name: str, steps: str) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(
        f"name: {name}\nstorage: {tmp_path / 'data'}\nsteps:\n" + textwrap.dedent(steps).strip()
    )
    return path


def run_on(address: str, path: Path, **env: str):
    """`difforge run PATH --address ADDRESS`, as a user on this machine would."""
    return difforge_cli(
        "run", str(path), "--address", address, env={**LOOPBACK, **env}, timeout=240
    )


def test_steps_wait_for_the_nodes_they_need_and_run_on_them(autoscaling_cluster, tmp_path):
    """From zero nodes: a source step gets a CPU node, a GPU-capable map step (`num_gpus:
    auto`, on a cluster whose head says its steps run on GPUs) a GPU node, and training with 2
    workers two CPU nodes; each wait is on the console; the requests end with the run."""
    path = pipeline(
        tmp_path,
        "grows",
        """
        - id: raw
          op: ingest.digits
          params: {limit: 400}
        - id: pixels
          op: encode.features
          inputs: [raw]
          params: {model: pixels}
        - id: clf
          op: train.classifier
          inputs: [raw]
          params: {epochs: 1, batch_size: 64}
          resources: {num_workers: 2, num_cpus: 1, num_gpus: 0}
        """,
    )
    done = run_on(autoscaling_cluster, path, DIFFORGE_DEVICE_CLASS="cuda")
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    assert "step raw: waiting for the autoscaler to add nodes for 1 x {CPU: 1}" in out
    assert "step pixels: waiting for the autoscaler to add nodes for 1 x {CPU: 1, GPU: 1}" in out
    assert "nodes ready after" in out
    pixels = committed(tmp_path, "grows", "pixels")
    assert pixels.manifest.producer["device"] == "cuda"  # placed on the GPU node's resource
    assert pixels.num_rows == 400
    clf = committed(tmp_path, "grows", "clf")
    assert len(clf.manifest.producer["nodes"]) >= 2  # its two workers, on two added nodes

    # the run's requests ended with it: nothing keeps the nodes up once idle (the autoscaler
    # reports every few seconds)
    wait_for(
        lambda: cluster_status(autoscaling_cluster)["load_metrics_report"]["request_demand"] == [],
        30,
        "the autoscaler's standing request cleared",
    )


def test_a_wait_no_node_type_can_end_stops_at_its_time_out(autoscaling_cluster, tmp_path):
    path = pipeline(
        tmp_path,
        "too-big",
        """
        - id: raw
          op: ingest.digits
          params: {limit: 100}
          resources: {num_cpus: 4}
        """,
    )
    done = run_on(autoscaling_cluster, path, DIFFORGE_SCALE_TIMEOUT_S="5")
    assert done.returncode != 0
    assert "step 'raw' waited 5 s for nodes to hold 1 x {CPU: 4}" in done.stderr, done.stderr
    assert "raise DIFFORGE_SCALE_TIMEOUT_S" in done.stderr


def committed(tmp_path: Path, name: str, step: str):
    (manifest,) = (tmp_path / "data" / name / step).glob("*/_manifest.json")  # one fingerprint
    return difforge.open_dataset(str(manifest.parent))


def cluster_status(address: str) -> dict:
    code = (
        f"import ray; ray.init(address={address!r}, logging_level='ERROR');"
        "from ray.experimental.internal_kv import _internal_kv_get;"
        "print(_internal_kv_get(b'__autoscaling_status').decode())"
    )
    env = {**os.environ, **LOOPBACK}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])
