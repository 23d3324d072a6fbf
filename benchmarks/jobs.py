"""Jobs benchmark: what `difforge submit` and the scheduler cost on a real local Ray cluster.

    .venv/bin/python benchmarks/jobs.py [--repeats 5]

Starts a Ray head (dashboard, token auth) and an MLflow server with infra/local/, then:
(a) seconds from `difforge submit` to the job RUNNING and to SUCCEEDED, for a small cached
    pipeline (ingest + resize, already computed), against `ray job submit` of a bare script that
    reads the same committed dataset with pyarrow; both launched as fresh CLI processes and
    polled every 50 ms through the Jobs API; medians, and the difference (target: within 2 s);
(b) the scheduler's firing delay: `difforge scheduler` with a cron that fires every 3 s,
    submitting to the same cluster; how late after its slot each run was recorded as submitted
    and when the cluster started it (target: under 1 s).

Writes benchmarks/results/jobs.json and prints every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
sys.path.insert(0, str(ROOT))

from difforge.platform.runtime import free_port  # noqa: E402 - after the path is set


def service(script: str, action: str, env: dict) -> None:
    done = subprocess.run(
        [str(ROOT / "infra/local" / script), action], env=env, text=True, capture_output=True
    )
    if done.returncode != 0:
        raise SystemExit(f"{script} {action} failed:\n{done.stdout}\n{done.stderr}")


def timed_job(argv: list[str], env: dict, job_id_from) -> tuple[float, float, str]:
    """Launch a submitting CLI; seconds until the job is RUNNING and until it SUCCEEDED."""
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(env["DIFFORGE_CLUSTER"])
    t0 = time.perf_counter()
    out = subprocess.run(argv, env=env, capture_output=True, text=True, check=True)
    job_id = job_id_from(out.stdout + out.stderr)
    running = None
    while True:
        status = str(client.get_job_status(job_id).value)
        now = time.perf_counter() - t0
        if running is None and status in ("RUNNING", "SUCCEEDED"):
            running = now
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            if status != "SUCCEEDED":
                raise SystemExit(f"{job_id} {status}:\n{client.get_job_logs(job_id)[-3000:]}")
            return running, now, job_id
        time.sleep(0.05)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--scheduler-seconds", type=float, default=20.0)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="difforge-bench-jobs-"))
    token = work / "ray_auth_token"
    token.write_text(secrets.token_hex(32))
    dashboard, mlflow_port = free_port(), free_port()
    env = {
        **os.environ,
        "DIFFORGE_LOCAL": str(work / "services"),
        "DIFFORGE_HOME": str(work / "home"),
        "PYTHON": sys.executable,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token),
        "RAY_PORT": str(free_port()),
        "RAY_DASHBOARD_PORT": str(dashboard),
        "RAY_AGENT_PORT": str(free_port()),
        "RAY_CLIENT_PORT": str(free_port()),
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "3",
        "MLFLOW_PORT": str(mlflow_port),
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
        "DIFFORGE_CLUSTER": f"http://127.0.0.1:{dashboard}",
    }
    for k in ("AWS_ENDPOINT_URL", "MLFLOW_TRACKING_URI", "RAY_ADDRESS"):
        env.pop(k, None)
    os.environ.update({k: env[k] for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")})
    results: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, no GPU"}
    try:
        t = time.perf_counter()
        service("mlflow.sh", "start", env)
        service("ray.sh", "start", env)
        print(f"cluster and MLflow up in {time.perf_counter() - t:.1f}s")

        spec = work / "small.yaml"
        spec.write_text(
            f"name: small\nstorage: {work / 'storage'}\n"
            f"tracking: {{uri: 'http://127.0.0.1:{mlflow_port}', experiment: bench-jobs}}\n"
            "steps:\n  - id: raw\n    op: ingest.digits\n"
            "  - id: small\n    op: image.resize\n    inputs: [raw]\n    params: {size: 4}\n"
        )

        def difforge_id(text: str) -> str:
            return next(x for x in text.splitlines() if x.startswith("submitted job")).split()[2]

        submit = [str(BIN / "difforge"), "submit", str(spec)]
        timed_job(submit, env, difforge_id)  # computes the steps; every later run is cached
        import difforge

        plan = difforge.plan(str(spec))
        assert all(s.cached for s in plan.steps)
        dataset = plan.steps[-1].uri

        bare_dir = work / "bare"
        bare_dir.mkdir()
        (bare_dir / "bare.py").write_text(
            "import pyarrow.dataset as ds\n"
            f"t = ds.dataset({dataset!r}, format='parquet', exclude_invalid_files=True).to_table()\n"
            "print('rows', t.num_rows)\n"
        )
        bare = [
            str(BIN / "ray"),
            "job",
            "submit",
            "--no-wait",
            "--address",
            env["DIFFORGE_CLUSTER"],
            "--working-dir",
            str(bare_dir),
            "--",
            "python",
            "bare.py",
        ]

        def ray_id(text: str) -> str:
            return text.split("Job '", 1)[1].split("'", 1)[0]

        rows = {"difforge submit": [], "ray job submit": []}
        for _ in range(args.repeats):  # interleaved, so drift hits both sides alike
            rows["difforge submit"].append(timed_job(submit, env, difforge_id)[:2])
            rows["ray job submit"].append(timed_job(bare, env, ray_id)[:2])
        med = {
            k: (statistics.median(r for r, _ in v), statistics.median(d for _, d in v))
            for k, v in rows.items()
        }
        for k, (r, d) in med.items():
            print(
                f"(a) {k:16} to RUNNING {r:5.2f}s   to SUCCEEDED {d:5.2f}s  (median of {args.repeats})"
            )
        overhead = med["difforge submit"][1] - med["ray job submit"][1]
        print(
            f"(a) difforge submit overhead over bare ray job submit: {overhead:+.2f}s (target <= 2 s)"
        )
        results["submit"] = {
            k: {"to_running_s": round(r, 2), "to_succeeded_s": round(d, 2)}
            for k, (r, d) in med.items()
        }
        results["submit"]["overhead_to_succeeded_s"] = round(overhead, 2)
        results["submit"]["repeats"] = args.repeats

        # (b) the scheduler's firing delay, submitting to the same cluster
        sched_env = {**env, "DIFFORGE_SCHEDULES": f"sqlite:///{work / 'schedules.db'}"}
        subprocess.run(
            [
                str(BIN / "difforge"),
                "schedule",
                "add",
                "bench",
                str(spec),
                "--cron",
                "* * * * * */3",
                "--cluster",
                env["DIFFORGE_CLUSTER"],
                "--overlap",
                "allow",
            ],
            env=sched_env,
            check=True,
            capture_output=True,
        )
        proc = subprocess.Popen(
            [str(BIN / "difforge"), "scheduler"],
            env=sched_env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(args.scheduler_seconds)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        from difforge.jobs import cluster
        from difforge.jobs.schedules import Store

        firings = [f for f in Store(sched_env["DIFFORGE_SCHEDULES"]).firings("bench") if f.job_id]
        recorded = [f.fired_at - f.slot for f in firings]
        started = [
            cluster.job_info(env["DIFFORGE_CLUSTER"], f.job_id)["start"] - f.slot for f in firings
        ]
        print(
            f"(b) scheduler: {len(firings)} firings; submitted after the slot: median "
            f"{statistics.median(recorded):.3f}s, max {max(recorded):.3f}s; job started on the "
            f"cluster: median {statistics.median(started):.3f}s, max {max(started):.3f}s "
            "(target < 1 s)"
        )
        results["scheduler"] = {
            "firings": len(firings),
            "submitted_after_slot_median_s": round(statistics.median(recorded), 3),
            "submitted_after_slot_max_s": round(max(recorded), 3),
            "job_started_after_slot_median_s": round(statistics.median(started), 3),
            "job_started_after_slot_max_s": round(max(started), 3),
        }
    finally:
        service("ray.sh", "stop", env)
        service("mlflow.sh", "stop", env)
        shutil.rmtree(work, ignore_errors=True)
    out = ROOT / "benchmarks" / "results" / "jobs.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
