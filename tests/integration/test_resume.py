"""A run killed mid-step resumes from the last committed step, and a pass of fused steps from
its finished input shards; Ctrl-C stops cleanly."""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path

from mlflow.tracking import MlflowClient

from tests.conftest import BIN, slow_pipeline, wait_for


def start(path: Path, env: dict, home: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [str(BIN / "difforge"), "run", str(path)],
        env={**env, "DIFFORGE_HOME": str(home)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: we can kill the driver and its Ray
    )


def step_dir(tmp_path: Path, step: str) -> Path:
    (d,) = (tmp_path / "storage" / "slow" / step).iterdir()
    return d


def slow_step_started(tmp_path: Path) -> bool:
    base = tmp_path / "storage" / "slow" / "slow"
    return base.exists() and any(base.glob("*/**/part-*.parquet"))


def ray_processes_of(session: int) -> list[str]:
    """Ray's processes (gcs, raylet, workers) that the run started, in its own session."""
    out = subprocess.run(
        ["ps", "-ww", "-eo", "sid,pid,args"], capture_output=True, text=True
    ).stdout
    rows = [line.split(None, 2) for line in out.splitlines()[1:]]
    return [r[2] for r in rows if len(r) == 3 and r[0] == str(session) and "ray" in r[2].lower()]


def listeners_of(session: int) -> list[tuple[str, str]]:
    """(address, process) of every listening TCP socket of the processes of a session."""
    import psutil

    names = {}
    for p in psutil.process_iter(["pid", "name"]):
        try:
            if os.getsid(p.info["pid"]) == session:
                names[p.info["pid"]] = p.info["name"]
        except OSError:
            continue
    return [
        (c.laddr.ip, names[c.pid])
        for c in psutil.net_connections("inet")
        if c.status == psutil.CONN_LISTEN and c.pid in names
    ]


def test_killed_run_resumes_from_last_committed_step(tmp_path):
    """kill -9 of the driver alone: its Ray's processes end with it (none stays orphaned), and
    the next run marks the killed run FAILED in MLflow, then continues its work."""
    path, env = slow_pipeline(tmp_path, seconds_per_batch=1.5)
    home = tmp_path / "home"
    proc = start(path, env, home)
    try:
        wait_for(lambda: slow_step_started(tmp_path), 120, "the slow step")
        assert (step_dir(tmp_path, "raw") / "_manifest.json").exists()
        # its private Ray listens on the loopback interface only, every process of it
        listening = listeners_of(proc.pid)
        assert listening and all(ip in ("127.0.0.1", "::ffff:127.0.0.1") for ip, _ in listening), (
            listening
        )
        os.kill(proc.pid, signal.SIGKILL)  # the driver dies mid-step, without warning
        proc.wait(timeout=30)
        wait_for(lambda: ray_processes_of(proc.pid) == [], 30, "Ray's processes to end")
    finally:
        if ray_processes_of(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
    assert not (step_dir(tmp_path, "slow") / "_manifest.json").exists()  # nothing half-visible
    client = MlflowClient(f"sqlite:///{home}/mlflow.db")
    exp = client.get_experiment_by_name("slow-tests")
    runs = client.search_runs([exp.experiment_id], "tags.`difforge.pipeline` = 'slow'")
    (killed,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert killed.info.status == "RUNNING"  # nobody could tell it was killed, yet

    rerun = start(path, env, home)
    out, _ = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, out
    assert client.get_run(killed.info.run_id).info.status == "FAILED"
    steps = client.search_runs(
        [exp.experiment_id], f"tags.`mlflow.parentRunId` = '{killed.info.run_id}'"
    )
    assert {r.data.tags["difforge.step"]: r.info.status for r in steps}["slow"] == "FAILED"
    lines = [line for line in out.splitlines() if line.startswith(("raw ", "dedup ", "slow "))]
    assert [line.split()[-2] for line in lines] == ["yes", "yes", "no"]  # only slow recomputed
    from difforge.platform.datasets import open_dataset

    ids = open_dataset(str(step_dir(tmp_path, "slow"))).to_arrow(columns=["id"]).column("id")
    assert len(ids) == 1797 and len(set(ids.to_pylist())) == 1797  # each row exactly once


def test_killed_pass_of_fused_steps_redoes_only_unfinished_shards(tmp_path):
    """ingest.digits and the slow step share a pass: nothing is committed until it ends, but
    each input shard's results are kept as soon as they are written."""
    path, env = slow_pipeline(tmp_path, seconds_per_batch=1.0, fused=True)
    home = tmp_path / "home"
    proc = start(path, env, home)
    raw = tmp_path / "storage" / "slow" / "raw"
    try:
        wait_for(lambda: any(raw.glob("*/_work/*/passes/pass-*/item-*.done.json")), 120, "a shard")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert not (step_dir(tmp_path, "raw") / "_manifest.json").exists()
    done_before = len(list(raw.glob("*/_work/*/passes/pass-*/item-*.done.json")))
    assert 1 <= done_before < 9  # 1,797 rows in input shards of 200

    rerun = start(path, env, home)
    out, _ = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, out
    # (a worker of the killed run may still finish the shard it was writing)
    found = re.search(r"raw\+slow: (\d) of 9 input shards already done by an earlier run", out)
    assert found and done_before <= int(found[1]) < 9, out
    # a quiet console: difforge's own lines; Ray's and the libraries' in a file it names
    logs = re.search(r"Ray's and libraries' logs: (\S+\.log)", out)
    assert logs and Path(logs[1]).exists(), out
    internals = (
        "streaming_executor",
        "(TrainController",
        "(raylet)",
        "MapBatches",
        "INFO mlflow",
        "Token authentication",
    )
    assert not [line for line in out.splitlines() if any(x in line for x in internals)], out
    from difforge.platform.datasets import open_dataset

    for step in ("raw", "slow"):
        ids = open_dataset(str(step_dir(tmp_path, step))).to_arrow(columns=["id"]).column("id")
        assert len(ids) == 1797 and len(set(ids.to_pylist())) == 1797  # each row exactly once
    client = MlflowClient(f"sqlite:///{home}/mlflow.db")
    exp = client.get_experiment_by_name("slow-tests")
    runs = client.search_runs([exp.experiment_id], "attributes.status = 'FINISHED'")
    resumed = {
        r.data.tags.get("difforge.step"): r.data.metrics.get("input_shards_resumed")
        for r in runs
        if r.data.tags.get("difforge.step")
    }
    assert resumed == {"raw": int(found[1]), "slow": int(found[1])}


def test_ctrl_c_stops_cleanly_and_marks_the_run_killed(tmp_path):
    path, env = slow_pipeline(tmp_path, seconds_per_batch=3)
    home = tmp_path / "home"
    proc = start(path, env, home)
    try:
        wait_for(lambda: slow_step_started(tmp_path), 120, "the slow step")
        assert any("raylet" in p for p in ray_processes_of(proc.pid))
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal sends
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, out
    assert "interrupted" in out and "Traceback" not in out
    assert not (step_dir(tmp_path, "slow") / "_manifest.json").exists()
    client = MlflowClient(f"sqlite:///{home}/mlflow.db")
    exp = client.get_experiment_by_name("slow-tests")
    runs = client.search_runs([exp.experiment_id])
    status = {r.data.tags.get("difforge.step", "pipeline"): r.info.status for r in runs}
    assert status == {
        "pipeline": "KILLED",
        "raw": "FINISHED",
        "dedup": "FINISHED",
        "slow": "KILLED",
    }
    wait_for(lambda: ray_processes_of(proc.pid) == [], 30, "Ray's processes to exit")


def test_ctrl_c_during_training_is_an_interruption_not_a_failure(tmp_path):
    """Ray Train installs a SIGINT handler of its own when fit() runs on the main thread (it
    calls sys.exit): difforge keeps Ctrl-C, so a training step stops as an interruption."""
    home = tmp_path / "home"
    path = tmp_path / "train.yaml"
    path.write_text(
        f"name: slow\nstorage: {tmp_path / 'storage'}\ntracking: {{experiment: train-ctrl-c}}\n"
        "steps:\n  - id: raw\n    op: ingest.digits\n    params: {limit: 200}\n"
        "  - id: model\n    op: train.diffusion\n    inputs: [raw]\n"
        "    params: {backbone: {type: UNet2DModel, block_out_channels: [8, 16],"
        " layers_per_block: 1, norm_num_groups: 4, down_block_types: [DownBlock2D, DownBlock2D],"
        " up_block_types: [UpBlock2D, UpBlock2D]}, batch_size: 8, max_steps: 100000,"
        " checkpoint_every: 100000}\n"
        "    resources: {num_workers: 1, num_cpus: 1}\n"
    )
    proc = start(path, dict(os.environ), home)
    try:
        # the training loop is running once its worker wrote where it runs
        wait_for(
            lambda: any((tmp_path / "storage" / "slow" / "model").glob("*/_work/*/nodes/rank-0")),
            180,
            "the training loop",
        )
        # long before its first checkpoint, the step's run shows how far training got
        tracking = MlflowClient(f"sqlite:///{home}/mlflow.db")

        def heartbeat() -> list:
            exp = tracking.get_experiment_by_name("train-ctrl-c")
            runs = tracking.search_runs([exp.experiment_id], "tags.`difforge.step` = 'model'")
            return runs and tracking.get_metric_history(runs[0].info.run_id, "running_loss")

        wait_for(lambda: bool(heartbeat()), 60, "the training heartbeat")
        assert all(m.step >= 1 and m.value > 0 for m in heartbeat())
        os.killpg(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, out
    assert "interrupted" in out and "SystemExit" not in out and "Traceback" not in out
    client = MlflowClient(f"sqlite:///{home}/mlflow.db")
    exp = client.get_experiment_by_name("train-ctrl-c")
    runs = client.search_runs([exp.experiment_id])
    status = {r.data.tags.get("difforge.step", "pipeline"): r.info.status for r in runs}
    assert status == {"pipeline": "KILLED", "raw": "FINISHED", "model": "KILLED"}
    wait_for(lambda: ray_processes_of(proc.pid) == [], 30, "Ray's processes to exit")
