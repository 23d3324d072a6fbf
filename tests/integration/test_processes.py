"""What a run leaves behind when Ray cannot start or its driver is killed: a clear error, and
MLflow runs that end instead of staying RUNNING."""

from __future__ import annotations

from mlflow.tracking import MlflowClient

from tests.conftest import difforge_cli


def test_ray_failing_to_start_is_one_clear_error_and_the_run_ends_failed(tmp_path):
    spec = tmp_path / "p.yaml"
    spec.write_text(
        f"name: nostart\nstorage: {tmp_path / 's'}\ntracking: {{experiment: nostart}}\n"
        "steps:\n  - {id: raw, op: ingest.digits, params: {limit: 10}}\n"
    )
    home = tmp_path / "home"
    # Ray's session folder under a file: Ray fails at once, deterministically
    env = {"RAY_TMPDIR": "/etc/passwd/ray", "DIFFORGE_HOME": str(home)}
    done = difforge_cli("run", str(spec), env=env, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert "error: Ray could not start (a private local Ray): NotADirectoryError" in done.stderr
    client = MlflowClient(f"sqlite:///{home}/mlflow.db")
    exp = client.get_experiment_by_name("nostart")
    assert [r.info.status for r in client.search_runs([exp.experiment_id])] == ["FAILED"]
