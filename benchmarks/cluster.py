"""The cluster path's figures, measured on the multi-host harness (infra/local/hosts.py: hosts
as network namespaces on this machine; needs root).

    sudo .venv/bin/python benchmarks/cluster.py [--rows 20000] [--train-steps 150]

Two layouts of the same two cores, one after the other, each a fresh cluster:
  two hosts: worker1 and worker2 with 1 CPU each (what `hosts.py up` makes);
  one host:  worker1 with 2 CPUs (worker2 stopped).
In each, from `client`: a map pass (Fashion-MNIST read, then resized to 56x56 bicubic) and a
training step with 2 Ray Train workers (gloo across the hosts' link in the first layout).
Ratios are one host's time / two hosts' time for the map pass (>= 0.9 means the network costs
at most 10%), and two hosts' samples/s / one host's for training. In the two-host layout also:
submit-to-first-step latency from `client` (the `difforge submit` command's start to the job
log's first "running" line) and the nightly CronJob's argv (verbatim from its manifest) run
twice, the second run's wall time being the cached rerun. Both layouts share this machine's
two cores: the figures show what crossing hosts costs, not scaling.
Writes benchmarks/results/cluster.json.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HOSTS = ROOT / "infra" / "local" / "hosts.py"
_spec = importlib.util.spec_from_file_location("difforge_hosts", HOSTS)
hosts = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(hosts)
S3_ENV = ["--env", "AWS_ACCESS_KEY_ID", "--env", "AWS_SECRET_ACCESS_KEY"]
S3_ENV += ["--env", "AWS_ENDPOINT_URL"]
UNET = {
    "type": "UNet2DModel",
    "block_out_channels": [16, 32],
    "layers_per_block": 1,
    "norm_num_groups": 4,
    "down_block_types": ["DownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "UpBlock2D"],
}

# on `client`: a job's step runs (seconds) and the training step's samples/s
METRICS = """
import json, statistics
from mlflow.tracking import MlflowClient
c = MlflowClient()
e = c.get_experiment_by_name(EXPERIMENT)
(parent,) = c.search_runs([e.experiment_id], "tags.`difforge.job_id` = '" + JOB + "'")
out = {}
for r in c.search_runs([e.experiment_id], "tags.mlflow.parentRunId = '" + parent.info.run_id + "'"):
    step = r.data.tags["difforge.step"]
    out[step] = {"seconds": r.data.metrics.get("seconds")}
    rates = [m.value for m in c.get_metric_history(r.info.run_id, "samples_per_s")]
    if rates:
        out[step]["samples_per_s"] = statistics.median(rates[1:] or rates)
print(json.dumps(out))
"""


class Harness:
    def __init__(self, worker_cpus: int):
        parent = Path(tempfile.mkdtemp(prefix="dfb", dir="/tmp"))
        parent.chmod(0o755)
        self.state = parent / "c"
        self.env = {
            **os.environ,
            "DIFFORGE_HOSTS_PREFIX": f"db{os.getpid() % 10000}",
            "DIFFORGE_HOSTS_STATE": str(self.state),
            "DIFFORGE_WORKER_CPUS": str(worker_cpus),
        }

    def hosts(self, *argv: str, timeout: float = 600) -> subprocess.CompletedProcess:
        done = subprocess.run(
            [sys.executable, str(HOSTS), *argv],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if done.returncode != 0:
            raise SystemExit(f"hosts.py {' '.join(argv[:3])}: {done.stdout}{done.stderr}")
        return done

    def on_client(self, *argv: str, timeout: float = 900) -> subprocess.CompletedProcess:
        return self.hosts("exec", "client", "--", *argv, timeout=timeout)

    def pipeline(self, name: str, steps: str) -> str:
        folder = self.state / "client" / "pipelines"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{name}.yaml"
        path.write_text(
            f"name: {name}\nstorage: s3://difforge-datasets/{name}\n"
            f'tracking: {{uri: "http://mlflow:5000", experiment: {name}}}\nsteps:\n'
            + textwrap.dedent(steps).strip()
            + "\n"
        )
        return str(path)

    def submit(self, path: str) -> tuple[str, float, float]:
        """Submit and wait: the job id, the wall time, and the latency to its first step."""
        t0 = time.time()
        done = self.on_client("difforge", "submit", path, *S3_ENV, "--wait")
        wall = time.time() - t0
        job = next(x for x in done.stdout.splitlines() if x.startswith("submitted job")).split()[2]
        if f"job {job}: SUCCEEDED" not in done.stdout:
            raise SystemExit(f"job {job} did not succeed:\n{done.stdout[-3000:]}")
        return job, wall, first_step_latency(done.stdout, t0)

    def metrics(self, experiment: str, job: str) -> dict:
        code = f"EXPERIMENT = {experiment!r}; JOB = {job!r}\n" + METRICS
        done = self.on_client(sys.executable, "-c", code)
        return json.loads(done.stdout.strip().splitlines()[-1])

    def __enter__(self):
        self.hosts("up")
        return self

    def __exit__(self, *exc):
        subprocess.run(
            [sys.executable, str(HOSTS), "down"], env=self.env, capture_output=True, timeout=300
        )


RUNNING = re.compile(r"^(\d\d:\d\d:\d\d) steps? .*: running")


def first_step_latency(log: str, t0: float) -> float:
    """Seconds from t0 to the first "HH:MM:SS step ...: running" line (this machine's clock)."""
    found = next(m for m in map(RUNNING.match, log.splitlines()) if m)
    clock = datetime.datetime.strptime(found.group(1), "%H:%M:%S").time()
    started = datetime.datetime.combine(datetime.date.fromtimestamp(t0), clock).timestamp()
    return started - t0


def workload(h: Harness, tag: str, rows: int, train_steps: int) -> dict:
    path = h.pipeline(
        f"bench-map-{tag}",
        f"""
          - id: raw
            op: ingest.fashion_mnist
            params: {{limit: {rows}}}
            resources: {{batch_size: 1000}}
          - id: big
            op: image.resize
            inputs: [raw]
            params: {{size: 56, method: resize, resample: bicubic}}
        """,
    )
    job, wall, latency = h.submit(path)
    m = h.metrics(f"bench-map-{tag}", job)
    map_s = m["raw"]["seconds"] + m["big"]["seconds"]  # one pass, split between the two
    path = h.pipeline(
        f"bench-train-{tag}",
        f"""
          - id: raw
            op: ingest.digits
          - id: model
            op: train.diffusion
            inputs: [raw]
            params:
              backbone: {json.dumps(UNET)}
              batch_size: 32
              max_steps: {train_steps}
              checkpoint_every: {train_steps}
              warmup_steps: 1
            resources: {{num_workers: 2, num_cpus: 1}}
        """,
    )
    job, _, _ = h.submit(path)
    t = h.metrics(f"bench-train-{tag}", job)["model"]
    return {
        "map_pass_s": round(map_s, 2),
        "map_job_wall_s": round(wall, 1),
        "submit_to_first_step_s": round(latency, 1),
        "train_samples_per_s": round(t["samples_per_s"], 1),
        "train_step_s": round(t["seconds"], 1),
    }


def nightly(h: Harness) -> dict:
    """The CronJob's argv and env, verbatim from its manifest, twice: the second is cached."""
    argv, pod_env = hosts.cronjob_command(h.state)
    env = ["env", *(f"{k}={v}" for k, v in pod_env.items())]
    walls = []
    for _ in range(2):
        t0 = time.time()
        done = h.on_client(*env, *argv)
        walls.append(time.time() - t0)
        if "SUCCEEDED" not in done.stdout:
            raise SystemExit(f"the nightly job failed:\n{done.stdout[-3000:]}")
    return {"first_s": round(walls[0], 1), "cached_rerun_s": round(walls[1], 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--train-steps", type=int, default=150)
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("the multi-host harness needs root (network namespaces)")
    with Harness(worker_cpus=1) as h:
        two = workload(h, "two", args.rows, args.train_steps)
        cron = nightly(h)
    with Harness(worker_cpus=2) as h:
        h.hosts("stop", "worker2")
        one = workload(h, "one", args.rows, args.train_steps)
    result = {
        "what": "map pass and 2-worker training: two hosts of 1 CPU vs one host of 2 CPUs",
        "command": "sudo .venv/bin/python benchmarks/cluster.py "
        f"--rows {args.rows} --train-steps {args.train_steps}",
        "machine": f"{platform.node()}, {os.cpu_count()} cores",
        "date": datetime.date.today().isoformat(),
        "two_hosts": two,
        "one_host": one,
        "map_ratio": round(one["map_pass_s"] / two["map_pass_s"], 3),
        "train_ratio": round(two["train_samples_per_s"] / one["train_samples_per_s"], 3),
        "nightly": cron,
    }
    print(json.dumps(result, indent=2))
    out = ROOT / "benchmarks" / "results" / "cluster.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"map pass, one host / two hosts: {result['map_ratio']:.2f}x (target >= 0.9)")
    print(f"training samples/s, two hosts / one host: {result['train_ratio']:.2f}x (target >= 0.9)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
