"""Faults the way they happen on a cluster, on the multi-host harness (its head sees a silent
node as dead in about 10 s): after each, the committed ids equal the source's, no id is in two
shards, no MLflow run is RUNNING, and `difforge jobs` says what happened. Each test leaves the
cluster as `up` made it."""

from __future__ import annotations

import time

from tests.cluster.test_across_hosts import (
    INSPECT,
    address,
    hosts_command,
    run_statuses,
    submitted,
    write,
)
from tests.conftest import NEEDS_S3

# Python on `head`: wait until a task runs on worker2 (Ray's state API), then print true
BUSY = """
import json, time
from ray.util.state import list_nodes, list_tasks
api = "http://difforge-head-svc:8265"
deadline, busy = time.time() + 90, False
while not busy and time.time() < deadline:
    ip = {n.node_id: n.node_ip for n in list_nodes(address=api)}
    running = list_tasks(address=api, filters=[("state", "=", "RUNNING")], detail=True)
    busy = any(ip.get(t.node_id) == WORKER and t.name == "_call" for t in running)
    time.sleep(0.2)
print(json.dumps(busy))
"""


def test_a_worker_host_cut_off_mid_pass_leaves_its_work_to_the_other(cluster):
    """worker2's cable pulled while a map pass runs on both workers: the head declares its node
    dead, the tasks it held run again on worker1, and the step commits every row once."""
    path = write(
        cluster,
        "cut-pass",
        """
          - id: raw
            op: ingest.digits
            params: {limit: 240}
            resources: {batch_size: 40}
          - id: slow
            op: test.slow
            inputs: [raw]
            params: {seconds_per_batch: 2.0}
            resources: {batch_size: 20}
        """,
    )
    job = submitted(cluster.run("client", "difforge", "submit", path, *NEEDS_S3))
    try:
        code = f"WORKER = {address('worker2')!r}\n" + BUSY
        assert cluster.python("head", code, timeout=120), "worker2 never ran a task"
        hosts_command(cluster, "link", "worker2", "down")  # in the middle of its item
        ended = cluster.run("client", "difforge", "jobs", "logs", job, "--follow", timeout=180)
    finally:
        hosts_command(cluster, "link", "worker2", "up")
        hosts_command(cluster, "restart", "worker2")  # its node was declared dead: a new one
    assert f"job {job}: SUCCEEDED" in ended.stdout, ended.stdout[-4000:]
    # the loss happened during the job: Ray's own word, in the job's log
    assert f"address: {address('worker2')}" in ended.stdout and "marked dead" in ended.stdout

    seen = cluster.python("client", f"EXPERIMENT = 'cut-pass'; JOB = '{job}'\n" + INSPECT)
    assert seen["parent"] == "FINISHED"
    assert all(s["status"] == "FINISHED" for s in seen["steps"].values())
    raw, slow = seen["steps"]["raw"], seen["steps"]["slow"]
    assert raw["rows"] == slow["rows"] == 240  # every row once: no id in two shards
    assert slow["ids"] == raw["ids"] and len(set(slow["ids"])) == 240
    status = cluster.run("client", "difforge", "jobs", "status", job)
    assert f"{job}: SUCCEEDED" in status.stdout


# Python on `client`: wait until the training step's first checkpoint is on S3, print them all
CHECKPOINTS = """
import json, sys, time, s3fs
fs, deadline = s3fs.S3FileSystem(), time.time() + 120
pattern = "difforge-datasets/cut-train/cut-train/model/*/_work/*/ray-train/checkpoint_2*"
while not fs.glob(pattern) and time.time() < deadline and WAIT:
    time.sleep(0.5)
    fs.invalidate_cache()
print(json.dumps(fs.glob(pattern)))
"""


def test_a_worker_host_cut_off_mid_training_fails_the_step_by_name_and_keeps_its_checkpoints(
    cluster,
):
    """Two Ray Train workers, one on each 1-CPU worker host (a classifier, checkpointed every
    epoch); worker2's cable pulled after the first checkpoint: Ray Train would ask for the
    group again and again (the hosts left cannot hold it), and the step waited for good. It
    fails naming the lost host, its checkpoints kept for a rerun, its runs ended."""
    path = write(
        cluster,
        "cut-train",
        """
          - id: raw
            op: ingest.digits
            params: {limit: 600}
          - id: model
            op: train.classifier
            inputs: [raw]
            params: {epochs: 100000, batch_size: 64, width: 8}
            resources: {num_workers: 2, num_cpus: 1}
        """,
    )
    job = submitted(cluster.run("client", "difforge", "submit", path, *NEEDS_S3))
    try:
        kept = cluster.python("client", "WAIT = True\n" + CHECKPOINTS, timeout=180)
        assert kept, "no checkpoint appeared"
        hosts_command(cluster, "link", "worker2", "down")
        ended = cluster.run("client", "difforge", "jobs", "logs", job, "--follow", timeout=120)
    finally:
        hosts_command(cluster, "link", "worker2", "up")
        hosts_command(cluster, "restart", "worker2")
    assert f"job {job}: FAILED" in ended.stdout, ended.stdout[-4000:]
    assert f"error: step 'model': lost {address('worker2')}" in ended.stdout, ended.stdout[-3000:]
    assert "the nodes left cannot hold its workers (2 x {CPU: 1})" in ended.stdout
    assert set(kept) <= set(cluster.python("client", "WAIT = False\n" + CHECKPOINTS))
    statuses = run_statuses(cluster, "cut-train")
    assert "RUNNING" not in statuses and "FAILED" in statuses
    status = cluster.run("client", "difforge", "jobs", "status", job)
    assert f"{job}: FAILED" in status.stdout and "lost" in status.stdout, status.stdout

    # worker2 back: a rerun continues from the last checkpoint (stopped once it says so)
    rerun = submitted(cluster.run("client", "difforge", "submit", path, *NEEDS_S3))
    said = wait_for_log(cluster, rerun, "model: continues from ")
    cluster.run("client", "difforge", "jobs", "stop", rerun)
    resumed = said.split("model: continues from ")[1].split(",")[0]
    names = {
        k.rstrip("/").rsplit("/", 1)[1]
        for k in cluster.python("client", "WAIT = False\n" + CHECKPOINTS)
    }
    assert resumed in names and resumed >= max(k.rsplit("/", 1)[1] for k in kept), said[-2000:]


def wait_for_log(cluster, job: str, text: str, seconds: float = 120) -> str:
    """The job's log once it contains `text`."""
    deadline = time.time() + seconds
    while True:
        said = cluster.run("client", "difforge", "jobs", "logs", job).stdout
        if text in said:
            return said
        assert time.time() < deadline, f"{text!r} never in the log of {job}:\n{said[-3000:]}"
        time.sleep(1)


def test_s3_lost_between_a_steps_two_commits_loses_no_row_and_a_rerun_completes(cluster):
    """The S3 server stopped after a filter committed its `rejects` and before its main output,
    and started again 3 s later: the step's commit goes through once S3 is back, or the step
    fails (nothing half-committed taken for done); after one rerun, kept + rejected rows are
    the source's ids, each once, and no run is RUNNING."""
    gate = cluster.state / "client" / "gate"
    gate.mkdir()
    path = write(
        cluster,
        "cut-s3",
        f"""
          - id: raw
            op: ingest.digits
            params: {{limit: 300}}
          - id: split
            op: test.gate
            inputs: [raw]
            params: {{folder: {gate}}}
        """,
    )
    job = submitted(cluster.run("client", "difforge", "submit", path, *NEEDS_S3))
    try:
        deadline = time.time() + 120
        while not (gate / "reached").exists():
            said = cluster.run("client", "difforge", "jobs", "logs", job).stdout
            assert time.time() < deadline, f"the step never reached its gate:\n{said[-3000:]}"
            time.sleep(0.5)
        hosts_command(cluster, "stop", "s3")
        (gate / "go").touch()
        time.sleep(3)  # the main output's commit meets no S3 server
    finally:
        hosts_command(cluster, "start", "s3")
    ended = cluster.run("client", "difforge", "jobs", "logs", job, "--follow", timeout=180)
    # its client's retries may outlast the outage (the commit then goes through), or not (the
    # step fails, its main output uncommitted): either way, never half a dataset taken as done
    said = ended.stdout
    assert f"job {job}: SUCCEEDED" in said or "error: step 'split'" in said, said[-4000:]
    (gate / "reached").unlink()
    again = cluster.run("client", "difforge", "submit", path, *NEEDS_S3, "--wait", timeout=300)
    assert "SUCCEEDED" in again.stdout, again.stdout[-4000:]
    rerun = submitted(again)

    seen = cluster.python("client", f"EXPERIMENT = 'cut-s3'; JOB = '{rerun}'\n" + INSPECT)
    raw, split = seen["steps"]["raw"], seen["steps"]["split"]
    rejects = cluster.python(
        "client",
        "import json, difforge; "
        f"t = difforge.open_dataset({split['uri'] + '/rejects'!r}).to_arrow(); "
        "print(json.dumps(t.column('id').to_pylist()))",
    )
    assert rejects and split["ids"]
    assert sorted(split["ids"] + rejects) == raw["ids"]  # every id once, kept or rejected
    statuses = run_statuses(cluster, "cut-s3")
    assert "RUNNING" not in statuses
