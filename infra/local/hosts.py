#!/usr/bin/env python3
"""A cluster of hosts on this machine: each role in its own Linux network namespace.

    sudo python infra/local/hosts.py up          # network, services, Ray head, two workers
    sudo python infra/local/hosts.py exec client -- difforge submit pipelines/... --wait
    sudo python infra/local/hosts.py link worker1 down     # cut a host's link (and `up`)
    sudo python infra/local/hosts.py restart head          # its Ray node stopped and started
    sudo python infra/local/hosts.py restart head --lose-state   # as if without GCS FT
    sudo python infra/local/hosts.py restart mlflow        # a service: mlflow, s3 or redis
    sudo python infra/local/hosts.py stop s3               # (and `start s3`)
    sudo python infra/local/hosts.py stop worker2          # its Ray node stopped
    sudo python infra/local/hosts.py status
    sudo python infra/local/hosts.py down

Hosts (`services`, `head`, `worker1`, `worker2`, `client`) are namespaces joined by veth pairs
to a bridge that lives in a namespace of its own, so nothing is added to this machine's own
network. Their addresses are in 127.0.0.0/8 (`route_localnet` lets such addresses cross the
veths), and each host has its own hostname (a UTS namespace per command), loopback and
/etc/hosts (`/etc/netns/NS/hosts`, which `ip netns exec` mounts over /etc/hosts) resolving the
names the Kubernetes manifests use: `mlflow`, `postgres`, `redis`, `difforge-head-svc`. `/mnt` is each
host's own local disk (a folder of the state, bind-mounted in the host's mount namespace); the
rest of the file system is shared, as a network file system would be.

What runs where is read from the manifests in infra/: the MLflow server runs the Deployment's
command and args verbatim (PostgreSQL from Debian as its backend store, as the Postgres
StatefulSet has it, SeaweedFS as its S3) with the env the Deployment gives it, and so does Redis
(Debian's redis-server, the Redis StatefulSet's command); the Ray nodes get the env of the
RayCluster's pods (Secrets included, from this harness's secret values), the head's
rayStartParams and what KubeRay makes of gcsFaultToleranceOptions (the head's GCS keeps its
state in that Redis; workers wait up to 600 s for a restarted head), started by
infra/local/ray.sh. Only processes this harness started are
stopped (by their pids), never another Ray on the machine.

Settings (environment): DIFFORGE_HOSTS_PREFIX (`dfh`: namespace names, so that two clusters can
coexist), DIFFORGE_HOSTS_NET (`127.77.0`: the /24 the hosts' addresses come from),
DIFFORGE_HOSTS_STATE (`/tmp/difforge-hosts-PREFIX`: logs, data, the Ray token),
DIFFORGE_WORKER_CPUS (1), DIFFORGE_HOSTS_PLUGINS (a folder on the Ray nodes' PYTHONPATH: operator
plugins, as an image would have them installed).

Unlike a production cluster, the head's health checks of the nodes are short (a node silent for
about 10 s is dead, where Ray's defaults take about a minute), so that the fault tests see a
cut link in seconds.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
PREFIX = os.environ.get("DIFFORGE_HOSTS_PREFIX", "dfh")
NET = os.environ.get("DIFFORGE_HOSTS_NET", "127.77.0")
STATE = Path(os.environ.get("DIFFORGE_HOSTS_STATE", f"/tmp/difforge-hosts-{PREFIX}"))
HOSTS = {"services": 10, "head": 11, "worker1": 12, "worker2": 13, "client": 14}
# the manifests' service names, and where they live here
NAMES = {"services": ["mlflow", "postgres", "s3", "redis"], "head": ["difforge-head-svc"]}
S3_PORT = 28333  # it and port+10000 lie outside Ray's worker ports (10002-19999)
VENV = ROOT / ".venv" / "bin"
PATH = f"{VENV}:{os.environ['PATH']}" if VENV.is_dir() else os.environ["PATH"]


def address(host: str) -> str:
    return f"{NET}.{HOSTS[host]}"


def namespace(host: str) -> str:
    return f"{PREFIX}-{host}"


def sh(*argv: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    done = subprocess.run(argv, text=True, capture_output=True, **kw)
    if check and done.returncode != 0:
        raise SystemExit(f"`{shlex.join(argv)}` failed ({done.returncode}): {done.stderr.strip()}")
    return done


# --- the network ------------------------------------------------------------------------------


def network_up() -> None:
    bridge = f"{PREFIX}-net"
    sh("ip", "netns", "add", bridge)
    sh("ip", "netns", "exec", bridge, "ip", "link", "add", "br0", "type", "bridge")
    sh("ip", "netns", "exec", bridge, "ip", "link", "set", "br0", "up")
    hosts_file = "127.0.0.1 localhost\n" + "".join(
        f"{address(h)} {h} {' '.join(NAMES.get(h, []))}\n" for h in HOSTS
    )
    for host in HOSTS:
        ns, veth = namespace(host), f"{PREFIX}-{host}"[:15]
        sh("ip", "netns", "add", ns)
        sh("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
        sh("ip", "link", "set", veth, "netns", bridge)
        sh("ip", "netns", "exec", bridge, "ip", "link", "set", veth, "master", "br0", "up")
        inside = [
            "sysctl -qw net.ipv4.conf.all.route_localnet=1 net.ipv4.conf.eth0.route_localnet=1",
            f"ip addr add {address(host)}/24 dev eth0",
            "ip link set eth0 up",
            "ip link set lo up",
        ]
        sh("ip", "netns", "exec", ns, "sh", "-ec", "; ".join(inside))
        etc = Path("/etc/netns") / ns
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "hosts").write_text(hosts_file)


def network_down() -> None:
    for host in HOSTS:
        sh("ip", "netns", "del", namespace(host), check=False)
        shutil.rmtree(Path("/etc/netns") / namespace(host), ignore_errors=True)
    sh("ip", "netns", "del", f"{PREFIX}-net", check=False)


def link(host: str, state: str) -> None:
    """Cut or restore a host's only link, as a pulled cable would."""
    sh("ip", "netns", "exec", f"{PREFIX}-net", "ip", "link", "set", f"{PREFIX}-{host}"[:15], state)


# --- commands on a host -------------------------------------------------------------------------


def host_argv(host: str, argv: list[str], env: dict[str, str] | None = None) -> list[str]:
    """argv run on `host`: its namespace, its hostname, the environment its role has there."""
    profile = json.loads((STATE / "env.json").read_text()).get(host, {}) if env is None else env
    base = {"PATH": PATH, "HOME": os.environ.get("HOME", "/root"), "LANG": "C.UTF-8"}
    assignments = [f"{k}={v}" for k, v in {**base, **profile}.items()]
    # its own /mnt (this host's local disk), hostname and environment, nothing inherited
    disk = STATE / "disks" / host
    disk.mkdir(parents=True, exist_ok=True)
    script = 'mount --bind "$1" /mnt && hostname "$0" && shift && exec env -i "$@"'
    prefix = ["ip", "netns", "exec", namespace(host), "unshare", "--uts", "sh", "-c", script]
    return prefix + [host, str(disk)] + assignments + argv


def start_on(host: str, name: str, argv: list[str], env: dict[str, str]) -> int:
    """A long-running process on `host`, its log in STATE/logs, its pid recorded."""
    logs = STATE / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(
        host_argv(host, argv, env),
        stdout=open(logs / f"{host}-{name}.log", "w"),
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    pids = _pids()
    pids[f"{host}/{name}"] = process.pid
    (STATE / "pids.json").write_text(json.dumps(pids))
    return process.pid


def _pids() -> dict[str, int]:
    path = STATE / "pids.json"
    return json.loads(path.read_text()) if path.exists() else {}


def wait_until(what: str, check, seconds: float = 120) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            if check():
                return
        except Exception:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{what} not ready after {seconds:.0f}s; logs in {STATE / 'logs'}")


# --- the manifests ------------------------------------------------------------------------------


def manifests(path: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((INFRA / path).read_text()) if d]


def pod_env(container: dict, secret_values: dict[str, dict[str, str]]) -> dict[str, str]:
    """The environment Kubernetes would give a container: its env (Secret references resolved
    from `secret_values`) and its envFrom Secrets."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(secret_values[source["secretRef"]["name"]])
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = str(item["value"])
        else:
            ref = item["valueFrom"]["secretKeyRef"]
            env[item["name"]] = secret_values[ref["name"]][ref["key"]]
    return env


def secret_values() -> dict[str, dict[str, str]]:
    """What an operator would put in the manifests' Secrets, made up once per cluster."""
    path = STATE / "secrets.json"
    if path.exists():
        return json.loads(path.read_text())
    values = {
        "difforge-s3": {
            "AWS_ACCESS_KEY_ID": "difforge-hosts",
            "AWS_SECRET_ACCESS_KEY": secrets.token_hex(16),
            # a non-AWS S3: its endpoint is part of what the Secret gives every pod
            "AWS_ENDPOINT_URL": f"http://s3:{S3_PORT}",
        },
        "difforge-postgres": {
            "POSTGRES_USER": "mlflow",
            "POSTGRES_PASSWORD": secrets.token_hex(16),
        },
        "difforge-ray-token": {"auth_token": secrets.token_hex(32)},
        "difforge-redis": {"password": secrets.token_hex(24)},
    }
    path.write_text(json.dumps(values))
    path.chmod(0o600)
    return values


# --- the roles ----------------------------------------------------------------------------------


def start_postgres(values: dict) -> None:
    """PostgreSQL from Debian as the StatefulSet runs it: its database and user from its env."""
    (statefulset,) = [d for d in manifests("mlflow/postgres.yaml") if d["kind"] == "StatefulSet"]
    env = pod_env(statefulset["spec"]["template"]["spec"]["containers"][0], values)
    data = STATE / "postgres"
    data.mkdir(parents=True)
    shutil.chown(data, "postgres")
    pwfile = data / "pw"
    pwfile.write_text(env["POSTGRES_PASSWORD"])
    pwfile.chmod(0o600)
    shutil.chown(pwfile, "postgres")
    bindir = sorted(Path("/usr/lib/postgresql").glob("*/bin"))[-1]
    user = ["runuser", "-u", "postgres", "--"]
    sh(
        *user,
        str(bindir / "initdb"),
        "-D",
        str(data / "db"),
        f"--username={env['POSTGRES_USER']}",
        f"--pwfile={pwfile}",
        "--auth-host=scram-sha-256",
        "--auth-local=trust",
    )
    pwfile.unlink()
    hba = data / "db" / "pg_hba.conf"
    hba.write_text(hba.read_text() + f"host all all {NET}.0/24 scram-sha-256\n")
    argv = user + [
        str(bindir / "postgres"),
        "-D",
        str(data / "db"),
        "-c",
        f"listen_addresses={address('services')}",
        "-c",
        f"unix_socket_directories={data}",
    ]
    start_on("services", "postgres", argv, {})
    ready = [str(bindir / "pg_isready"), "-q", "-h", address("services")]
    wait_until("PostgreSQL", lambda: run_on_env("services", ready, {}).returncode == 0, 60)
    sh(
        *user,
        str(bindir / "createdb"),
        "-h",
        str(data),
        "-U",
        env["POSTGRES_USER"],
        env["POSTGRES_DB"],
    )


def start_s3(values: dict) -> None:
    s3 = values["difforge-s3"]
    env = {
        "DIFFORGE_BIND": address("services"),
        "DIFFORGE_LOCAL": str(STATE / "s3"),
        "S3_PORT": str(S3_PORT),
        "S3_BUCKETS": "difforge-datasets,difforge-mlflow,datasets",
        "AWS_ACCESS_KEY_ID": s3["AWS_ACCESS_KEY_ID"],
        "AWS_SECRET_ACCESS_KEY": s3["AWS_SECRET_ACCESS_KEY"],
        "PATH": PATH,
        "PYTHON": sys.executable,
    }
    done = run_on_env("services", [str(INFRA / "local" / "s3.sh"), "start"], env)
    if done.returncode != 0:
        raise SystemExit(f"S3 on services failed:\n{done.stdout}{done.stderr}")


def mounted(container: dict, argv: list[str], service: str) -> list[str]:
    """`argv` with the container's volume's mount path (one volume) replaced by a folder of this
    harness's state, as Kubernetes would mount the volume there."""
    (mount,) = container["volumeMounts"]
    volume = STATE / service / mount["name"]
    volume.mkdir(parents=True, exist_ok=True)
    return [a.replace(mount["mountPath"], str(volume)) for a in argv]


def start_redis(values: dict) -> None:
    """Redis as its StatefulSet runs it (Debian's redis-server): the GCS's store."""
    (statefulset,) = [d for d in manifests("kuberay/redis.yaml") if d["kind"] == "StatefulSet"]
    (container,) = statefulset["spec"]["template"]["spec"]["containers"]
    env = {"PATH": PATH, **pod_env(container, values)}
    argv = mounted(container, container["command"] + container["args"], "redis")
    start_on("services", "redis", argv, env)
    port = str(container["ports"][0]["containerPort"])
    ping = ["redis-cli", "-h", address("services"), "-p", port, "--no-auth-warning", "ping"]
    auth = {"REDISCLI_AUTH": env["REDIS_PASSWORD"]}
    wait_until("Redis", lambda: "PONG" in run_on_env("services", ping, auth).stdout, 60)


def start_mlflow(values: dict) -> None:
    """The MLflow Deployment's command and args, word for word, with its env."""
    (deploy,) = [d for d in manifests("mlflow/mlflow.yaml") if d["kind"] == "Deployment"]
    (container,) = deploy["spec"]["template"]["spec"]["containers"]
    env = {"PATH": PATH, "HOME": str(STATE / "services-home")}
    env.update(pod_env(container, values))
    start_on("services", "mlflow", container["command"] + container["args"], env)
    port = container["ports"][0]["containerPort"]
    health = ["curl", "-sf", f"http://{address('services')}:{port}/health"]
    wait_until("MLflow", lambda: run_on_env("services", health, {}).returncode == 0, 180)


def plugins() -> dict[str, str]:
    folder = os.environ.get("DIFFORGE_HOSTS_PLUGINS")
    return {"PYTHONPATH": folder} if folder else {}


# The head declares a node dead after 8 missed checks 1 s apart (each may take 2 s): ~10 s,
# not Ray's minute.
HEALTH_CHECKS = {
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "2000",
    "RAY_health_check_failure_threshold": "8",
}
# A task's owner learns that the node running it is gone only when its call to that node fails:
# after a pulled cable (no reset ever arrives) that is gRPC's keepalive, pings every 5 minutes and
# 2 minutes to answer by Ray's defaults; here 5 s and 5 s, on every node.
KEEPALIVE = {
    "RAY_grpc_client_keepalive_time_ms": "5000",
    "RAY_grpc_client_keepalive_timeout_ms": "5000",
}


def ray_env(role: dict, values: dict) -> dict[str, str]:
    (container,) = role["template"]["spec"]["containers"]
    token = STATE / "ray_auth_token"
    token.write_text(values["difforge-ray-token"]["auth_token"])
    token.chmod(0o600)
    env = {
        "PATH": PATH,
        "HOME": os.environ.get("HOME", "/root"),
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token),
        # gloo and NCCL pick their interface from the hostname otherwise
        "GLOO_SOCKET_IFNAME": "eth0",
        "NCCL_SOCKET_IFNAME": "eth0",
        "DS_ACCELERATOR": "cpu",
        "HF_HUB_OFFLINE": "1",
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "3",
    }
    env.update(plugins())
    env.update(KEEPALIVE)
    env.update(pod_env(container, values))
    if "DIFFORGE_DEVICE_CLASS" in env:  # the manifest's GPU group is not part of this cluster
        env["DIFFORGE_DEVICE_CLASS"] = "cpu"
    return env


# The head's rayStartParams (raycluster.yaml) and how this harness applies each: num-cpus as
# ray.sh's RAY_NUM_CPUS; dashboard-host (0.0.0.0 in its pod) as the host's own address.
APPLIED_START_PARAMS = ("num-cpus", "dashboard-host")


# What KubeRay does with gcsFaultToleranceOptions: the head's GCS gets the Redis address and
# password, and a namespace of keys of its own (the RayCluster's uid there); workers wait 600 s,
# not Ray's 60, for a head to come back (KubeRay's default with fault tolerance on).
APPLIED_GCS_OPTIONS = ("redisAddress", "redisPassword")
WORKER_GCS_RECONNECT_S = "600"


def gcs_env(cluster: dict, values: dict) -> dict[str, str]:
    """The head's environment for the RayCluster's gcsFaultToleranceOptions ({} without)."""
    options = cluster["spec"].get("gcsFaultToleranceOptions")
    if options is None:
        return {}
    unapplied = set(options) - set(APPLIED_GCS_OPTIONS)
    if unapplied:
        raise SystemExit(f"gcsFaultToleranceOptions {sorted(unapplied)}: not applied here")
    password = options.get("redisPassword", {})
    if "valueFrom" in password:
        ref = password["valueFrom"]["secretKeyRef"]
        password = values[ref["name"]][ref["key"]]
    else:
        password = password.get("value", "")
    return {
        "RAY_REDIS_ADDRESS": options["redisAddress"],
        "REDIS_PASSWORD": password,
        "RAY_external_storage_namespace": f"{PREFIX}-{secrets.token_hex(4)}",
    }


def start_ray(values: dict) -> dict[str, dict[str, str]]:
    (cluster,) = manifests("kuberay/raycluster.yaml")
    head = cluster["spec"]["headGroupSpec"]
    gcs = gcs_env(cluster, values)
    profiles = {}
    env = ray_env(head, values)
    if "DIFFORGE_HOME" in env:  # the pod's home folder, here on this host's own disk
        env["DIFFORGE_HOME"] = str(STATE / "head" / "home")
    params = head.get("rayStartParams", {})
    unapplied = set(params) - set(APPLIED_START_PARAMS)
    if unapplied:  # what the head runs here would no longer be what the manifest asks
        raise SystemExit(f"rayStartParams {sorted(unapplied)}: not applied by this harness")
    local = {
        "DIFFORGE_BIND": address("head"),
        "DIFFORGE_LOCAL": str(STATE / "head"),
        "RAY_TEMP_DIR": str(STATE / "head" / "ray"),
        "RAY_NUM_CPUS": str(params.get("num-cpus", "")),
        "PYTHON": sys.executable,
        **HEALTH_CHECKS,
        **gcs,
    }
    profiles["head"] = env
    nodes = {"head": {"argv": [str(INFRA / "local" / "ray.sh"), "start"], "env": {**env, **local}}}
    cpu_group = next(g for g in cluster["spec"]["workerGroupSpecs"] if g["groupName"] == "cpu")
    for worker in ("worker1", "worker2"):
        env = ray_env(cpu_group, values)
        local = {
            "DIFFORGE_BIND": address(worker),
            "RAY_HEAD_ADDRESS": "difforge-head-svc",
            "DIFFORGE_LOCAL": str(STATE / worker),
            "RAY_TEMP_DIR": str(STATE / worker / "ray"),
            "RAY_NUM_CPUS": os.environ.get("DIFFORGE_WORKER_CPUS", "1"),
            "PYTHON": sys.executable,
        }
        if gcs:
            local["RAY_gcs_rpc_server_reconnect_timeout_s"] = WORKER_GCS_RECONNECT_S
        profiles[worker] = env
        argv = [str(INFRA / "local" / "ray.sh"), "worker", worker]
        nodes[worker] = {"argv": argv, "env": {**env, **local}}
    (STATE / "ray.json").write_text(json.dumps(nodes))
    (STATE / "ray.json").chmod(0o600)
    for host in nodes:
        start_ray_node(host)
    return profiles


def start_ray_node(host: str) -> None:
    """Start the Ray node of `host` (head or worker) as `up` did."""
    node = json.loads((STATE / "ray.json").read_text())[host]
    done = run_on_env(host, node["argv"], node["env"])
    if done.returncode != 0:
        raise SystemExit(f"Ray on {host} failed:\n{done.stdout}{done.stderr}")


def stop_ray_node(host: str) -> None:
    """Stop the Ray node of `host` (only the processes `up` started there)."""
    stop_ray_nodes([host])


def stop_ray_nodes(hosts: list[str]) -> None:
    """Stop the Ray nodes of `hosts`, together."""
    for stop in [stopping(host) for host in hosts]:
        stop.wait()


def stopping(host: str, script: str = "ray.sh") -> subprocess.Popen:
    """`infra/local/SCRIPT stop` for what `up` started on `host`, under way."""
    return subprocess.Popen(
        [str(INFRA / "local" / script), "stop"],
        env={"DIFFORGE_LOCAL": str(STATE / host), "PATH": PATH},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def restart_head(lose_state: bool) -> None:
    """The head restarted (its pod replaced). With GCS fault tolerance its GCS reads its state
    back from Redis and the workers rejoin it; `lose_state` starts it on an empty namespace of
    Redis keys, as a head without fault tolerance comes back: its jobs forgotten, its workers
    refused by it (they are restarted too, as their pods would be)."""
    stop_ray_node("head")
    if lose_state:
        nodes = json.loads((STATE / "ray.json").read_text())
        env = nodes["head"]["env"]
        if "RAY_external_storage_namespace" in env:
            env["RAY_external_storage_namespace"] = f"{PREFIX}-{secrets.token_hex(4)}"
        (STATE / "ray.json").write_text(json.dumps(nodes))
    start_ray_node("head")
    if lose_state:
        workers = [h for h in ("worker1", "worker2") if (STATE / h).exists()]
        stop_ray_nodes(workers)
        for worker in workers:
            start_ray_node(worker)


SERVICES = ("mlflow", "s3", "redis")


def stop_service(name: str) -> None:
    """A service's process ended (its data kept), as a crashed or evicted pod's would be."""
    if name == "s3":
        stopping("s3", "s3.sh").wait()
    else:
        stop_groups([_pids()[f"services/{name}"]])


def start_service(name: str) -> None:
    """A service started again as `up` started it, on the data it had."""
    {"mlflow": start_mlflow, "s3": start_s3, "redis": start_redis}[name](secret_values())


def stop_groups(pids: list[int]) -> None:
    """SIGTERM to process groups this harness started, together; SIGKILL after 10 s."""

    def alive(pid: int) -> bool:
        try:
            os.killpg(pid, 0)
            return True
        except ProcessLookupError:
            return False

    for pid in pids:
        if alive(pid):
            os.killpg(pid, 15)
    deadline = time.time() + 10
    while any(alive(pid) for pid in pids) and time.time() < deadline:
        time.sleep(0.1)
    for pid in pids:
        if alive(pid):
            os.killpg(pid, 9)


def run_on_env(host: str, argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(host_argv(host, argv, env), text=True, capture_output=True, timeout=300)


def cronjob_command(state: Path) -> tuple[list[str], dict[str, str]]:
    """The nightly CronJob's container command and args, verbatim from
    infra/kuberay/cronjob.yaml with its ConfigMap written where the container mounts it (under
    `state`'s client folder), and the env Kubernetes would give it (this cluster's Secrets)."""
    (cron,) = manifests("kuberay/cronjob.yaml")
    (container,) = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    (cm,) = manifests("kuberay/pipeline-configmap.yaml")
    (mount,) = container["volumeMounts"]
    volume = state / "client" / "volumes" / mount["name"]
    volume.mkdir(parents=True, exist_ok=True)
    for name, text in cm["data"].items():
        (volume / name).write_text(text)
    argv = [
        a.replace(mount["mountPath"], str(volume)) for a in container["command"] + container["args"]
    ]
    values = json.loads((state / "secrets.json").read_text())
    return argv, pod_env(container, values)


def client_env(values: dict) -> dict[str, str]:
    """The user's laptop: the cluster's address and token, S3 keys to read results."""
    return {
        "PATH": PATH,
        "HOME": os.environ.get("HOME", "/root"),
        "DIFFORGE_HOME": str(STATE / "client" / "home"),
        "DIFFORGE_CLUSTER": "http://difforge-head-svc:8265",
        "MLFLOW_TRACKING_URI": "http://mlflow:5000",
        "RAY_AUTH_TOKEN_PATH": str(STATE / "ray_auth_token"),
        "HF_HUB_OFFLINE": "1",
        **values["difforge-s3"],
        **plugins(),
    }


def up() -> None:
    if STATE.exists():
        raise SystemExit(f"{STATE} exists: `down` first (or set DIFFORGE_HOSTS_PREFIX)")
    if len(str(STATE)) > 32:  # Ray's session sockets live 75 bytes below its temp folder
        raise SystemExit(
            f"{STATE}: choose a state folder of at most 32 characters (Unix socket "
            "paths under each node's Ray temp folder must stay under 108 bytes)"
        )
    STATE.mkdir(parents=True)
    STATE.chmod(0o755)
    for folder in STATE.parents:  # PostgreSQL runs as its own user and needs to reach its data
        if folder.stat().st_mode & 0o005 != 0o005:
            raise SystemExit(
                f"{folder} is not readable by other users: choose another state folder"
            )
    values = secret_values()
    network_up()
    start_postgres(values)
    start_s3(values)
    start_redis(values)
    start_mlflow(values)
    profiles = start_ray(values)
    profiles["client"] = client_env(values)
    profiles["services"] = {"PATH": PATH, **values["difforge-s3"]}
    (STATE / "env.json").write_text(json.dumps(profiles))
    (STATE / "env.json").chmod(0o600)
    print(f"hosts up ({', '.join(f'{h} {address(h)}' for h in HOSTS)}); state in {STATE}")
    print(f"  from the client: {sys.argv[0]} exec client -- difforge jobs list")


def down() -> None:
    """Everything `up` started stopped, together; then the network and the state removed."""
    stops = [stopping(h) for h in ("worker1", "worker2", "head") if (STATE / h).exists()]
    if (STATE / "s3").exists():
        stops.append(stopping("s3", "s3.sh"))
    stop_groups(list(_pids().values()))  # MLflow, PostgreSQL, Redis: their process groups
    for stop in stops:
        stop.wait()
    network_down()
    shutil.rmtree(STATE, ignore_errors=True)


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    command, rest = argv[0], argv[1:]
    if command == "up":
        up()
    elif command == "down":
        down()
    elif command == "exec":
        host, cmd = rest[0], rest[rest.index("--") + 1 :] if "--" in rest else rest[1:]
        return subprocess.call(host_argv(host, cmd))
    elif command == "link":
        link(rest[0], rest[1])
    elif command in ("stop", "start", "restart") and rest[0] in SERVICES:
        if command != "start":
            stop_service(rest[0])
        if command != "stop":
            start_service(rest[0])
    elif command == "restart" and rest[0] == "head":
        restart_head(lose_state="--lose-state" in rest)
    elif command == "restart":  # a Ray node's host rebooted: its node stopped, then started
        stop_ray_node(rest[0])
        start_ray_node(rest[0])
    elif command == "stop":  # a Ray node stopped for good (a smaller cluster)
        stop_ray_node(rest[0])
    elif command == "status":
        for host in HOSTS:
            print(f"{host:9} {namespace(host):16} {address(host)}")
        for name, pid in _pids().items():
            print(f"{name:20} pid {pid}")
    else:
        print(
            f"unknown command {command}: up, down, exec HOST -- CMD, link HOST up|down, "
            "restart HOST|SERVICE [--lose-state], stop HOST|SERVICE, start SERVICE, status"
        )
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
