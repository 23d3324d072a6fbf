"""Running pipelines on a Ray cluster through the Ray Jobs API.

`submit` sends the pipeline YAML (its `--set` overrides already applied) as the job's working
directory and runs `difforge run` on the cluster. Secrets never travel with a job: not in the
YAML, the entrypoint, the job's metadata, its `runtime_env` (all of which the dashboard shows)
nor in the uploaded package (which Ray keeps on every node's disk). They live in the cluster's
own environment (Kubernetes Secrets as env of the Ray pods, the environment `ray start` ran
in); `--env NAME` names the variables a run needs, and the job checks they are there before
its first step, failing with the names that are missing.
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


def token_mode_when_a_token_is_given() -> None:
    """A token in RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token means token auth:
    Ray's client otherwise sends none unless RAY_AUTH_MODE=token is set too ("Missing
    authentication token"). Ray reads the mode once, when it is imported: the CLI calls this
    first. An explicit RAY_AUTH_MODE is left as it is."""
    if os.environ.get("RAY_AUTH_MODE"):
        return
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser("~/.ray/auth_token")
    if os.environ.get("RAY_AUTH_TOKEN") or os.path.isfile(path):
        os.environ["RAY_AUTH_MODE"] = "token"


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
    required_env: list[str]

    def follow_hint(self) -> str:
        return f"difforge jobs logs {self.job_id} --follow --cluster {self.cluster}"


def read_env_file(path: str | Path) -> dict[str, str]:
    """`difforge run --env-file`: KEY=VALUE lines, values shell-quoted or plain."""
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


def require_env(names: list[str]) -> None:
    """A submitted run's first check: the variables its `--env` named are in the cluster's
    environment (Ray's workers inherit the environment of `ray start`, as the driver does)."""
    missing = [name for name in names if name not in os.environ]
    if missing:
        raise DifforgeError(
            f"the job needs {', '.join(missing)}, which this cluster's environment does not "
            "have: set it on every Ray node (on Kubernetes, a Secret in the Ray pods' env or "
            "envFrom; with infra/local/ray.sh, in the environment it starts in). `--env` names "
            "variables; their values never travel with the job"
        )


def _tracking_setting() -> str | None:
    """The client's MLFLOW_TRACKING_URI for a run whose YAML names none: a setting, sent in the
    submitted YAML, unless it carries credentials."""
    from urllib.parse import urlsplit

    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri and (urlsplit(uri).password or urlsplit(uri).username):
        raise DifforgeError(
            "MLFLOW_TRACKING_URI carries credentials, which would travel with the job: give the "
            "cluster MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD in its own environment "
            "and name them with --env, and the URI without them"
        )
    return uri


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
    required: list[str] = []
    for name in forward_env or []:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise DifforgeError(f"--env {name}: not an environment variable name (--env NAME)")
        if name not in required:
            required.append(name)
    uri = spec.tracking.uri or _tracking_setting()
    if uri and not spec.tracking.uri:
        data["tracking"] = {**data.get("tracking", {}), "uri": uri}
    check_tracking(data.get("tracking", {}).get("uri"))
    api = client(cluster)
    job_id = f"difforge-{re.sub(r'[^a-z0-9-]', '-', spec.name.lower())}-" + (
        time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)
    )
    # the record of the job that outlives the cluster's own: its MLflow runs carry both
    tags = {**(tags or {}), "difforge.job_id": job_id, "difforge.cluster": address}
    argv = ["difforge", "run", PIPELINE_FILE, "--submitted"]
    for name in required:
        argv += ["--require-env", name]
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
        runtime_env: dict[str, Any] = {
            "working_dir": tmp,
            # `difforge jobs stop` sends SIGTERM; give the run time to end its MLflow runs.
            "env_vars": {"RAY_JOB_STOP_WAIT_TIME_S": "30"},
        }
        if pip:
            runtime_env["pip"] = list(pip)
        metadata = {
            "difforge.pipeline": spec.name,
            "difforge.file": str(loaded.file),
            "difforge.overrides": " ".join(loaded.overrides),
            "difforge.required_env": ",".join(required),  # names only, never values
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
    return Submitted(job_id, address, required)


def _status_name(status: Any) -> str:
    return str(getattr(status, "value", status))


LOST = "its job is gone from the cluster that ran it (a restarted head?)"


def _mlflow_record(address: str, job_id: str | None = None) -> tuple[Any, list[Any]]:
    """The pipeline runs that jobs submitted to `address` started (all, or one job's), from
    the MLflow server in MLFLOW_TRACKING_URI, with its client: difforge's own record of what
    ran there. No runs where no server is set."""
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        return None, []
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    experiments = [e.experiment_id for e in client.search_experiments()]
    query = f"tags.`difforge.cluster` = '{address}'"
    if job_id:
        query += f" and tags.`difforge.job_id` = '{job_id}'"
    runs = client.search_runs(experiments, query, max_results=1000) if experiments else []
    return client, [r for r in runs if "mlflow.parentRunId" not in r.data.tags]


def _lost(client: Any, address: str, run: Any) -> dict[str, Any]:
    """A job the cluster no longer lists, as its MLflow run tells it; a run still RUNNING
    there is ended FAILED (its driver went with the cluster's record of it)."""
    from difforge.platform.watchdog import end_run_and_steps

    tags, status = run.data.tags, run.info.status
    lost = status == "RUNNING" or tags.get("difforge.ended_by") == LOST
    if status == "RUNNING":
        end_run_and_steps(client, run, LOST)
        status = "FAILED"
    shown = "LOST" if lost else {"FINISHED": "SUCCEEDED", "KILLED": "STOPPED"}.get(status, status)
    return {
        "job_id": tags["difforge.job_id"],
        "status": shown,
        "pipeline": tags.get("difforge.pipeline", "-"),
        "start": (run.info.start_time or 0) / 1000,
        "end": (run.info.end_time or 0) / 1000,
        "message": f"{address} no longer lists this job; its MLflow run {run.info.run_id} "
        f"ended {status}" + (" when it was found gone" if lost else ""),
    }


SUPERVISOR = "_ray_internal_job_actor_"  # Ray's name for the actor that runs a job's driver


def _dead_supervisors(address: str) -> dict[str, str]:
    """Jobs whose supervisor actor (the parent of their driver) is dead, with why: a head
    restarted with GCS fault tolerance lists its jobs as they were, RUNNING, until a new
    submission wakes its job manager, though their drivers went with the old head."""
    from ray.util.state import list_actors

    try:
        actors = list_actors(
            address=address,
            filters=[("class_name", "=", "JobSupervisor"), ("state", "=", "DEAD")],
            detail=True,
            raise_on_missing_output=False,
        )
    except Exception:  # noqa: BLE001 - an older Ray, a state API away: Ray's word stands
        return {}
    dead = {}
    for actor in actors:
        if actor.name and actor.name.startswith(SUPERVISOR):
            cause = (actor.death_cause or {}).get("actor_died_error_context", {})
            why = str(cause.get("error_message", "")).strip().splitlines()
            dead[actor.name[len(SUPERVISOR) :]] = why[0] if why else "it died"
    return dead


def _reconcile(rows: list[dict[str, Any]], address: str, job_id: str | None = None) -> tuple:
    """Ray's record against what is alive: a job Ray lists as running whose supervisor is dead
    is LOST; the MLflow runs of a job that failed or is lost end FAILED, never left RUNNING
    (its driver went without ending them: a restarted head, a killed pod). Returns difforge's
    MLflow record of the cluster's jobs (all, or `job_id`'s), as `_mlflow_record`."""
    active = [r for r in rows if r["status"] not in TERMINAL]
    dead = _dead_supervisors(address) if active else {}
    for row in active:
        if row["job_id"] in dead:
            row["message"] = (
                f"{address} still lists it {row['status']}, but its driver is gone with "
                f"its supervisor: {dead[row['job_id']]}"
            )
            row["status"] = "LOST"
    ended = {r["job_id"]: r["status"] for r in rows if r["status"] in ("FAILED", "LOST")}
    if not ended and job_id is not None:  # one job, alive or ended well: nothing to look up
        return None, []
    record, runs = _mlflow_record(address, job_id)
    if ended:
        from difforge.platform.watchdog import end_run_and_steps

        for run in runs:
            status = ended.get(run.data.tags.get("difforge.job_id"))
            if status is not None and run.info.status == "RUNNING":
                end_run_and_steps(record, run, LOST if status == "LOST" else "its job failed")
    return record, runs


def _row(job: Any, job_id: str) -> dict[str, Any]:
    return {
        "job_id": job_id,
        "status": _status_name(job.status),
        "pipeline": (job.metadata or {}).get("difforge.pipeline", "-"),
        "start": (job.start_time or 0) / 1000,
        "end": (job.end_time or 0) / 1000,
        "message": (job.message or "").strip(),
    }


def list_jobs(cluster: str | None) -> list[dict[str, Any]]:
    """Every job the cluster lists, and the jobs difforge's MLflow record says ran there that
    the cluster no longer lists (a restarted head forgets its jobs): LOST, never unknown."""
    rows = [_row(job, job.submission_id or job.job_id) for job in client(cluster).list_jobs()]
    address = cluster_address(cluster)
    record, runs = _reconcile(rows, address)
    known = {r["job_id"] for r in rows}
    for run in runs:
        if run.data.tags.get("difforge.job_id") not in known:
            rows.append(_lost(record, address, run))
            known.add(rows[-1]["job_id"])
    return sorted(rows, key=lambda r: r["start"])


def job_info(cluster: str | None, job_id: str) -> dict[str, Any]:
    api = client(cluster)
    try:
        info = api.get_job_info(job_id)
    except Exception:
        address = cluster_address(cluster)
        record, runs = _mlflow_record(address, job_id)
        if runs:
            return {
                **_lost(record, address, runs[0]),
                "entrypoint": "",
                "metadata": {},
                "runtime_env": {},
            }
        raise DifforgeError(f"no job {job_id} on {address}") from None
    row = _row(info, job_id)
    _reconcile([row], cluster_address(cluster), job_id)
    return {
        **row,
        "entrypoint": info.entrypoint,
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
    deadline, checked = time.time() + timeout, time.time()
    while time.time() < deadline:
        status = _status_name(api.get_job_status(job_id))
        if status in TERMINAL:
            return status
        if time.time() - checked > 10:  # every 10 s: is its driver still there? (one look)
            checked = time.time()
            status = job_info(cluster, job_id)["status"]
            if status == "LOST":  # its supervisor died with a head: its runs are ended
                return status
        time.sleep(poll)
    raise DifforgeError(f"job {job_id} still running after {timeout:.0f}s")
