"""Running pipelines on a Ray cluster through the Ray Jobs API.

`submit` sends the pipeline YAML (its `--set` overrides already applied) as the job's working
directory and runs `difforge run` on the cluster. Secrets never travel in the YAML, the
entrypoint, the job's metadata or its `runtime_env` (all of which the dashboard shows): the
environment variables a user names are written to a file inside the uploaded working directory,
which `difforge run --env-file` reads on the cluster.
"""

from __future__ import annotations

import asyncio
import functools
import os
import re
import secrets
import shlex
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from difforge.platform.errors import DifforgeError

ENV_FILE = ".difforge.env"
PIPELINE_FILE = "pipeline.yaml"
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def cluster_address(cluster: str | None) -> str:
    """`--cluster`, else DIFFORGE_CLUSTER: the dashboard URL of the cluster's head."""
    address = cluster or os.environ.get("DIFFORGE_CLUSTER")
    if not address:
        raise DifforgeError(
            "no cluster: pass --cluster http://HEAD:8265 or set DIFFORGE_CLUSTER "
            "(`difforge run` runs on a private local Ray instead)"
        )
    if "://" not in address:
        address = f"http://{address}"
    return address.rstrip("/")


def client(cluster: str | None):
    """The Jobs API client of a cluster: one per address and process (making one is an HTTP
    round trip, and the scheduler asks about running jobs every second)."""
    return _client(cluster_address(cluster))


@functools.lru_cache(maxsize=16)
def _client(address: str):
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except Exception as exc:  # connection refused, 401 without a token, not a Ray dashboard
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DifforgeError(f"cannot reach the Ray cluster at {address}: {message}") from None


def check_tracking(uri: str | None) -> str:
    """A run on a cluster must log to an MLflow server the cluster can reach."""
    if not uri:
        raise DifforgeError(
            "a submitted run needs an MLflow server the cluster can reach: set `tracking.uri: "
            "http://HOST:5000` in the YAML or MLFLOW_TRACKING_URI here (the default, a SQLite "
            "file in DIFFORGE_HOME, would stay on the node that runs the job)"
        )
    if uri.startswith(("sqlite:", "file:", "/", ".")) or ("://" not in uri and uri != "databricks"):
        raise DifforgeError(
            f"tracking URI {uri} is a local store the cluster cannot share: a submitted run "
            "needs an MLflow server (http://... or https://...)"
        )
    return uri


@dataclass
class Submitted:
    job_id: str
    cluster: str
    forwarded: list[str]

    def follow_hint(self) -> str:
        return f"difforge jobs logs {self.job_id} --follow --cluster {self.cluster}"


def _env_file(values: dict[str, str]) -> str:
    return "".join(f"{k}={shlex.quote(v)}\n" for k, v in sorted(values.items()))


def read_env_file(path: str | Path) -> dict[str, str]:
    """Parse what `_env_file` wrote (KEY=shell-quoted value per line)."""
    out: dict[str, str] = {}
    for line in Path(path).read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        key, _, value = line.partition("=")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise DifforgeError(f"{path}: '{key}' is not an environment variable name")
        parts = shlex.split(value)
        out[key] = parts[0] if parts else ""
    return out


def setup_worker() -> None:
    """Ray's worker_process_setup_hook for submitted runs: load the forwarded environment."""
    if Path(ENV_FILE).is_file():
        os.environ.update(read_env_file(ENV_FILE))


def submit(
    file: str,
    overrides: list[str] | None = None,
    cluster: str | None = None,
    forward_env: list[str] | None = None,
    tags: dict[str, str] | None = None,
    pip: list[str] | None = None,
    entrypoint_num_cpus: float | None = None,
    until: str | None = None,
    force: list[str] | None = None,
) -> Submitted:
    """Submit one run of a pipeline to a cluster; returns its job id (not waiting for it)."""
    from difforge.platform.spec import load_spec

    address = cluster_address(cluster)
    loaded = load_spec(file, overrides)
    spec = loaded.spec
    data = spec.model_dump(mode="json", exclude_none=True)
    storage = str(spec.storage)
    if "://" not in storage and not os.path.isabs(storage):
        raise DifforgeError(
            f"storage '{storage}' is a relative path: on a cluster it would land in the job's "
            "temporary folder. Use s3://... or an absolute path on a shared file system"
        )
    forward: list[str] = []
    if not spec.tracking.uri and os.environ.get("MLFLOW_TRACKING_URI"):
        forward.append("MLFLOW_TRACKING_URI")
    for name in forward_env or []:
        if name not in os.environ:
            raise DifforgeError(f"--env {name}: not set in this environment, nothing to forward")
        if name not in forward:
            forward.append(name)
    check_tracking(spec.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI"))
    api = client(cluster)
    job_id = f"difforge-{re.sub(r'[^a-z0-9-]', '-', spec.name.lower())}-" + (
        time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)
    )
    tags = {**(tags or {}), "difforge.job_id": job_id}
    argv = ["difforge", "run", PIPELINE_FILE, "--env-file", ENV_FILE]
    for k, v in tags.items():
        argv += ["--tag", f"{k}={v}"]
    argv += ["--until", until] if until else []
    for step in force or []:
        argv += ["--force", step]
    with tempfile.TemporaryDirectory(prefix="difforge-submit-") as tmp:
        Path(tmp, PIPELINE_FILE).write_text(
            f"# submitted by difforge from {loaded.file}"
            + (f" with --set {' '.join(loaded.overrides)}" if loaded.overrides else "")
            + "\n"
            + yaml.safe_dump(data, sort_keys=False)
        )
        env_path = Path(tmp, ENV_FILE)
        env_path.write_text(_env_file({k: os.environ[k] for k in forward}))
        env_path.chmod(0o600)
        # Every worker process of the job starts in the working directory and loads the
        # forwarded variables there (Ray workers do not inherit the driver's environment).
        runtime_env: dict[str, Any] = {
            "working_dir": tmp,
            "worker_process_setup_hook": "difforge.jobs.cluster.setup_worker",
            # `difforge jobs stop` sends SIGTERM; give the run time to end its MLflow runs.
            "env_vars": {"RAY_JOB_STOP_WAIT_TIME_S": "30"},
        }
        if pip:
            runtime_env["pip"] = list(pip)
        metadata = {
            "difforge.pipeline": spec.name,
            "difforge.file": str(loaded.file),
            "difforge.overrides": " ".join(loaded.overrides),
            "difforge.forwarded_env": ",".join(forward),  # names only, never values
        }
        # A head that has just started may not have its job agent yet: retry that, briefly.
        deadline = time.time() + 60
        while True:
            try:
                api.submit_job(
                    entrypoint=shlex.join(argv),
                    submission_id=job_id,
                    runtime_env=runtime_env,
                    metadata=metadata,
                    entrypoint_num_cpus=entrypoint_num_cpus,
                )
                break
            except Exception as exc:
                if "No available agent" in str(exc) and time.time() < deadline:
                    time.sleep(1)
                    continue
                raise DifforgeError(f"the cluster refused the job: {exc}") from None
    return Submitted(job_id, address, forward)


def _status_name(status: Any) -> str:
    return str(getattr(status, "value", status))


def list_jobs(cluster: str | None) -> list[dict[str, Any]]:
    rows = []
    for job in client(cluster).list_jobs():
        meta = job.metadata or {}
        rows.append(
            {
                "job_id": job.submission_id or job.job_id,
                "status": _status_name(job.status),
                "pipeline": meta.get("difforge.pipeline", "-"),
                "start": (job.start_time or 0) / 1000,
                "end": (job.end_time or 0) / 1000,
                "message": (job.message or "").strip(),
            }
        )
    return sorted(rows, key=lambda r: r["start"])


def job_info(cluster: str | None, job_id: str) -> dict[str, Any]:
    api = client(cluster)
    try:
        info = api.get_job_info(job_id)
    except Exception:
        raise DifforgeError(f"no job {job_id} on {cluster_address(cluster)}") from None
    return {
        "job_id": job_id,
        "status": _status_name(info.status),
        "pipeline": (info.metadata or {}).get("difforge.pipeline", "-"),
        "entrypoint": info.entrypoint,
        "message": (info.message or "").strip(),
        "start": (info.start_time or 0) / 1000,
        "end": (info.end_time or 0) / 1000,
        "metadata": info.metadata or {},
        "runtime_env": info.runtime_env or {},
    }


def logs(cluster: str | None, job_id: str, follow: bool = False, out=None) -> str:
    """The job's driver log; with `follow`, stream it until the job ends and return its status."""
    import sys

    api = client(cluster)
    out = out or sys.stdout
    job_info(cluster, job_id)  # a clear error for an unknown id
    if not follow:
        out.write(api.get_job_logs(job_id))
        return _status_name(api.get_job_status(job_id))

    async def tail() -> None:
        async for chunk in api.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    asyncio.run(tail())
    return _status_name(api.get_job_status(job_id))


def stop(cluster: str | None, job_id: str) -> bool:
    job_info(cluster, job_id)
    return bool(client(cluster).stop_job(job_id))


def wait(cluster: str | None, job_id: str, timeout: float = 600, poll: float = 1.0) -> str:
    api = client(cluster)
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = _status_name(api.get_job_status(job_id))
        if status in TERMINAL:
            return status
        time.sleep(poll)
    raise DifforgeError(f"job {job_id} still running after {timeout:.0f}s")
