"""`difforge submit` and `difforge jobs` against a real two-node Ray cluster (a head started by
infra/local/ray.sh with its dashboard on a free loopback port, plus a second node that joins it),
with Ray's token authentication on, S3 storage and an MLflow server."""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import tempfile
import textwrap
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

import difforge
from difforge.jobs import cluster as jobs
from tests.conftest import (
    NEEDS_S3,
    RAY_TOKEN,
    S3_SECRET,
    SLOW_PLUGIN,
    difforge_cli,
    free_port,
    local_service,
    make_plugin,
    wait_for,
)

RAY_TEMP: dict[str, Path] = {}  # the cluster's Ray temp folder (its session logs, packages)


@pytest.fixture(scope="module")
def ray_cluster(s3_server):
    """Head + one worker node. The cluster's processes hold the S3 credentials in their own
    environment (as Ray pods do from a Kubernetes Secret) and have a plugin operator installed
    (test.slow)."""
    state = Path(tempfile.mkdtemp(prefix="difforge-cluster-"))
    plugin = state / "plugin"
    plugin.mkdir()
    plugin_env = make_plugin(plugin, SLOW_PLUGIN, "test.slow = difforge_plugin:Slow")
    env = {
        "RAY_PORT": str(free_port()),
        "RAY_DASHBOARD_PORT": str(free_port()),
        "RAY_AGENT_PORT": str(free_port()),
        "RAY_WORKER_AGENT_PORT": str(free_port()),
        "RAY_CLIENT_PORT": str(free_port()),
        "RAY_NUM_CPUS": "1",
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "3",  # stop without waiting out 30 s
        "RAY_TEMP_DIR": str(state / "ray"),
        "PYTHONPATH": plugin_env["PYTHONPATH"],
    }
    RAY_TEMP["dir"] = state / "ray"
    stop, full_env = local_service("ray.sh", state, env)
    worker = subprocess.run(
        [str(Path(__file__).parents[2] / "infra/local/ray.sh"), "worker", "w1"],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    url = f"http://127.0.0.1:{env['RAY_DASHBOARD_PORT']}"
    try:
        assert worker.returncode == 0, worker.stderr
        wait_for(lambda: len(alive_nodes(url)) == 2, 60, "the second Ray node")
        yield url
    finally:
        stop()
        shutil.rmtree(state, ignore_errors=True)


def alive_nodes(url: str) -> list[dict]:
    request = urllib.request.Request(
        f"{url}/api/v0/nodes", headers={"Authorization": f"Bearer {RAY_TOKEN.read_text()}"}
    )
    result = json.load(urllib.request.urlopen(request))["data"]["result"]["result"]
    return [n for n in result if n["state"] == "ALIVE"]


def pipeline(tmp_path: Path, mlflow_url: str, name: str, steps: str) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(
        textwrap.dedent(f"""
        name: {name}
        storage: s3://datasets/cluster-{secrets.token_hex(4)}
        tracking: {{uri: "{mlflow_url}", experiment: cluster-tests}}
        steps:
        """).lstrip()
        + textwrap.indent(textwrap.dedent(steps).strip() + "\n", "  ")
    )
    return path


def submit(path: Path, url: str, *extra: str) -> str:
    out = difforge_cli("submit", str(path), "--cluster", url, *NEEDS_S3, *extra, timeout=120)
    assert out.returncode == 0, out.stderr
    line = next(x for x in out.stdout.splitlines() if x.startswith("submitted job"))
    return line.split()[2]


def test_the_cluster_refuses_requests_without_the_token(ray_cluster):
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"{ray_cluster}/api/jobs/")
    assert err.value.code == 401


def test_a_pipeline_spreads_over_both_nodes_and_every_dataset_is_whole(
    ray_cluster, mlflow_server, tmp_path
):
    """Ingestion and curation submitted to the two-node cluster with storage on S3 and an
    override: each step records the nodes its work ran on, both nodes worked, every dataset
    reads back whole (every shard with its manifest's size and checksum), and the S3 secrets
    travelled by name only. (Training, sampling and evaluation across hosts:
    tests/cluster/test_across_hosts.py.)"""
    path = pipeline(
        tmp_path,
        mlflow_server,
        "two-nodes",
        """
        - id: raw
          op: ingest.digits
          resources: {batch_size: 100}
        - id: clean
          op: curate.validate
          inputs: [raw]
        """,
    )
    out = difforge_cli(
        "submit",
        str(path),
        "--cluster",
        ray_cluster,
        *NEEDS_S3,
        "--set",
        "raw.params.limit=1200",
        "--wait",
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    job_id = next(x for x in out.stdout.splitlines() if x.startswith("submitted job")).split()[2]
    assert f"job {job_id}: SUCCEEDED" in out.stdout
    assert "difforge jobs logs" in out.stdout  # where to follow it

    # secrets never travelled: the job names the variables it needs from the cluster's own
    # environment; the value is nowhere in what the dashboard shows, in the job's log, in Ray's
    # session folders (logs, the uploaded package on every node) or in MLflow
    info = jobs.job_info(ray_cluster, job_id)
    shown = json.dumps([info["entrypoint"], info["metadata"], info["runtime_env"]])
    assert S3_SECRET not in shown
    assert "AWS_SECRET_ACCESS_KEY" in info["metadata"]["difforge.required_env"]
    assert info["entrypoint"].startswith("difforge run pipeline.yaml")
    assert S3_SECRET not in jobs.client(ray_cluster).get_job_logs(job_id)
    assert any(RAY_TEMP["dir"].glob("session_*/runtime_resources")), "the uploaded package's home"
    holding = subprocess.run(
        ["grep", "-rlaF", S3_SECRET, str(RAY_TEMP["dir"])], capture_output=True, text=True
    )
    assert holding.stdout == "", f"the secret is on disk in {holding.stdout}"
    listed = difforge_cli("jobs", "list", "--cluster", ray_cluster)
    assert job_id in listed.stdout and "SUCCEEDED" in listed.stdout

    # its MLflow run is tagged with the job; every dataset is on S3 and reads back whole
    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("cluster-tests")
    (run,) = client.search_runs([exp.experiment_id], f"tags.`difforge.job_id` = '{job_id}'")
    assert run.info.status == "FINISHED"
    steps = {
        r.data.tags["difforge.step"]: r
        for r in client.search_runs(
            [exp.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}'"
        )
    }
    assert set(steps) == {"raw", "clean"}
    both = {n["node_id"] for n in alive_nodes(ray_cluster)}
    nodes = {}
    for name, r in steps.items():
        ds = difforge.open_dataset(r.data.tags["difforge.uri"])
        assert ds.uri.startswith("s3://datasets/cluster-")
        assert ds.to_arrow().num_rows == ds.num_rows  # every shard read and checked
        nodes[name] = set(ds.manifest.producer["nodes"])
        assert nodes[name] == set(r.data.tags["difforge.nodes"].split(",")) and nodes[name] <= both
    assert set().union(*nodes.values()) == both  # 12 read tasks and their curation, 2 CPUs
    raw = difforge.open_dataset(steps["raw"].data.tags["difforge.uri"])
    assert raw.num_rows == 1200  # the override applied
    for r in [run, *steps.values()]:
        assert S3_SECRET not in json.dumps([r.data.params, r.data.tags])


def test_a_variable_the_cluster_lacks_fails_the_job_by_name(ray_cluster, mlflow_server, tmp_path):
    path = pipeline(tmp_path, mlflow_server, "lacking", "- id: raw\n  op: ingest.digits\n")
    job_id = submit(path, ray_cluster, "--env", "DIFFORGE_NOT_ON_THE_CLUSTER")
    assert jobs.wait(ray_cluster, job_id, timeout=180) == "FAILED"
    logs = jobs.client(ray_cluster).get_job_logs(job_id)
    assert "needs DIFFORGE_NOT_ON_THE_CLUSTER, which this cluster's environment does not" in logs


def test_a_failing_pipeline_reports_failure_and_its_error(ray_cluster, mlflow_server, tmp_path):
    path = pipeline(
        tmp_path,
        mlflow_server,
        "broken",
        """
        - id: raw
          op: ingest.images
          params: {path: /nonexistent/folder}
        """,
    )
    job_id = submit(path, ray_cluster)
    assert jobs.wait(ray_cluster, job_id, timeout=180) == "FAILED"
    status = difforge_cli("jobs", "status", job_id, "--cluster", ray_cluster)
    assert status.returncode == 1 and "FAILED" in status.stdout
    logs = difforge_cli("jobs", "logs", job_id, "--cluster", ray_cluster)
    assert "/nonexistent/folder" in logs.stdout and "error:" in logs.stdout


def test_a_step_a_fixed_cluster_cannot_hold_fails_at_start(ray_cluster, mlflow_server, tmp_path):
    """This cluster has no autoscaler (its head's monitor reports only the nodes there are), so
    a step asking for more than its nodes hold fails at start instead of waiting for nodes."""
    path = pipeline(
        tmp_path,
        mlflow_server,
        "too-big",
        """
        - id: raw
          op: ingest.digits
          resources: {num_cpus: 4}
        """,
    )
    job_id = submit(path, ray_cluster)
    assert jobs.wait(ray_cluster, job_id, timeout=120) == "FAILED"
    logs = jobs.client(ray_cluster).get_job_logs(job_id)
    assert "asks for num_cpus=4 per worker; the cluster has 2 CPUs" in logs, logs[-2000:]
    assert "waiting for the autoscaler" not in logs


def test_stop_stops_a_running_job(ray_cluster, mlflow_server, tmp_path):
    path = pipeline(
        tmp_path,
        mlflow_server,
        "slow",
        """
        - id: raw
          op: ingest.digits
        - id: slow
          op: test.slow
          inputs: [raw]
          params: {seconds_per_batch: 5}
          resources: {batch_size: 20}
        """,
    )
    job_id = submit(path, ray_cluster)
    # (the slow step runs in one pass with the source it reads)
    wait_for(
        lambda: "slow (test.slow): running" in jobs.client(ray_cluster).get_job_logs(job_id),
        180,
        "the slow step",
    )
    stopped = difforge_cli("jobs", "stop", job_id, "--cluster", ray_cluster)
    assert stopped.returncode == 0, stopped.stderr
    assert jobs.wait(ray_cluster, job_id, timeout=60) == "STOPPED"
    # the pipeline's MLflow run ended as KILLED (SIGTERM ends it like Ctrl-C), not RUNNING
    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("cluster-tests")
    (run,) = client.search_runs([exp.experiment_id], f"tags.`difforge.job_id` = '{job_id}'")
    assert run.info.status == "KILLED", jobs.client(ray_cluster).get_job_logs(job_id)[-3000:]


def test_a_local_run_does_not_join_the_cluster(ray_cluster, tmp_path):
    before = {j["job_id"] for j in jobs.list_jobs(ray_cluster)}
    spec = tmp_path / "local.yaml"
    spec.write_text(
        f"name: local\nstorage: {tmp_path / 'storage'}\nsteps:\n  - id: raw\n    op: ingest.digits\n"
    )
    out = difforge_cli("run", str(spec), timeout=300)
    assert out.returncode == 0, out.stderr
    assert "starting Ray (address=local)" in out.stderr
    after = jobs.list_jobs(ray_cluster)
    assert {j["job_id"] for j in after} == before, "a local run showed up on the cluster"


def test_submit_refuses_tracking_the_cluster_cannot_reach(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    spec = tmp_path / "p.yaml"
    spec.write_text(
        "name: p\nstorage: s3://datasets/p\nsteps:\n  - id: raw\n    op: ingest.digits\n"
    )
    out = difforge_cli("submit", str(spec), "--cluster", "http://127.0.0.1:1")
    assert out.returncode == 2 and "needs an MLflow server" in out.stderr
    spec.write_text(spec.read_text() + "tracking: {uri: 'sqlite:////tmp/x.db'}\n")
    out = difforge_cli("submit", str(spec), "--cluster", "http://127.0.0.1:1")
    assert out.returncode == 2 and "local store the cluster cannot share" in out.stderr
    spec.write_text(spec.read_text().replace("s3://datasets/p", "runs"))
    out = difforge_cli("submit", str(spec), "--cluster", "http://127.0.0.1:1")
    assert out.returncode == 2 and "relative path" in out.stderr
    out = difforge_cli("submit", str(spec))
    assert out.returncode == 2 and "no cluster" in out.stderr
