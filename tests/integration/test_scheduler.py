"""The scheduler in real time: `difforge schedule add` with a seconds-level cron, the
`difforge scheduler` service firing real pipeline runs, a failing schedule's history, MLflow run
and on-failure hook, and a clean stop on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

from mlflow.tracking import MlflowClient

from difforge.jobs.schedules import Store
from tests.conftest import BIN, difforge_cli, make_plugin, wait_for

FAILING_PLUGIN = '''
from pydantic import BaseModel, ConfigDict
from difforge.platform.operator import MapOperator

class P(BaseModel):
    model_config = ConfigDict(extra="forbid")

class Fail(MapOperator):
    """Fails on every batch, as a broken step would."""
    name = "test.fail"
    Params = P

    def process(self, batch):
        raise ValueError("the data went bad overnight")
'''


def test_scheduler_fires_real_runs_and_reports_failures(tmp_path):
    home = tmp_path / "home"
    plugin = tmp_path / "plugin"
    plugin.mkdir()
    env = make_plugin(plugin, FAILING_PLUGIN, "test.fail = difforge_plugin:Fail")
    env["DIFFORGE_HOME"] = str(home)
    storage = tmp_path / "storage"
    (tmp_path / "good.yaml").write_text(
        f"name: good\nstorage: {storage}\nsteps:\n  - id: raw\n    op: ingest.digits\n"
    )
    (tmp_path / "bad.yaml").write_text(
        f"name: bad\nstorage: {storage}\nsteps:\n  - id: raw\n    op: ingest.digits\n"
        "  - id: broken\n    op: test.fail\n    inputs: [raw]\n"
    )
    alerts = tmp_path / "alerts.txt"
    for name in ("good", "bad"):
        out = difforge_cli(
            "schedule",
            "add",
            name,
            str(tmp_path / f"{name}.yaml"),
            "--cron",
            "* * * * * */4",
            "--on-failure",
            f'echo "$DIFFORGE_SCHEDULE $DIFFORGE_STATUS $DIFFORGE_MESSAGE" >> {alerts}',
            env=env,
        )
        assert out.returncode == 0, out.stderr
        assert "next run" in out.stdout
    listed = difforge_cli("schedule", "list", env=env)
    assert "good" in listed.stdout and "bad" in listed.stdout and "active" in listed.stdout

    log = open(tmp_path / "scheduler.log", "w")
    proc = subprocess.Popen(
        [str(BIN / "difforge"), "scheduler"],
        env={**os.environ, **env},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    store = Store(f"sqlite:///{home / 'schedules.db'}")
    try:
        wait_for(
            lambda: (
                any(f.status == "succeeded" for f in store.firings("good"))
                and any(f.status == "failed" for f in store.firings("bad"))
            ),
            240,
            "a finished good run and a failed bad run",
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    assert "scheduler: stopped" in (tmp_path / "scheduler.log").read_text()

    # each started run fired at its slot (a few seconds' margin: two runs starting Ray on two
    # busy cores can starve the scheduler's process); while a run ran, slots were skipped
    started = [f for f in store.firings() if f.job_id]
    assert started and all(f.fired_at - f.slot < 3.0 for f in started)
    assert any(f.status == "skipped" for f in store.firings())

    history = difforge_cli("schedule", "history", "bad", env=env).stdout
    assert "failed" in history and "the data went bad overnight" in history
    assert "bad failed" in alerts.read_text() and "good" not in alerts.read_text()

    # the failed run is in MLflow, tagged with its schedule
    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    exp = client.get_experiment_by_name("bad")
    runs = client.search_runs([exp.experiment_id], "tags.`difforge.schedule` = 'bad'")
    assert runs and runs[0].info.status == "FAILED"

    # runs already started finish on their own; wait for them so nothing outlives the test
    for f in started:
        stem = f.job_id.split(":", 2)[2]
        wait_for(lambda stem=stem: Path(f"{stem}.rc").exists(), 120, "a started run to end")
    out = difforge_cli("schedule", "pause", "good", env=env)
    assert "paused" in out.stdout
    assert difforge_cli("schedule", "remove", "bad", env=env).returncode == 0
    assert "bad" not in difforge_cli("schedule", "list", env=env).stdout
    assert (
        "the data went bad overnight" in difforge_cli("schedule", "history", "bad", env=env).stdout
    )
