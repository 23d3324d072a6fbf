"""infra/ agrees with the code: every manifest parses; images, entrypoints, ports and
environment variable names it uses exist and match; services bind to loopback by default."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

import difforge
from difforge.cli import build_parser
from difforge.platform import registry
from difforge.platform.spec import load_spec

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
MANIFESTS = sorted(INFRA.glob("**/*.yaml"))
IMAGE = f"ghcr.io/difforge/difforge:{difforge.__version__}"


def docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def walk(node, key: str):
    """Every value stored under `key`, anywhere in a parsed document."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                yield v
            yield from walk(v, key)
    elif isinstance(node, list):
        for item in node:
            yield from walk(item, key)


def all_docs() -> list[tuple[Path, dict]]:
    return [(p, d) for p in MANIFESTS for d in docs(p)]


def by_kind(kind: str) -> list[dict]:
    return [d for _, d in all_docs() if d.get("kind") == kind]


def test_every_manifest_parses_and_is_typed():
    assert {p.parent.name for p in MANIFESTS} >= {"kuberay", "mlflow", "ray-cluster"}
    for path, doc in all_docs():
        if path.parent.name == "ray-cluster":
            assert {"cluster_name", "provider", "available_node_types"} <= doc.keys()
        else:
            assert doc.get("apiVersion") and doc.get("kind"), path


KUBERNETES = "1.33.0"  # the Kubernetes release the manifests are checked against
CRDS = {"RayCluster", "RayJob"}  # KubeRay's own kinds: no schema ships with the validator


def test_the_core_kinds_are_valid_kubernetes_objects():
    """Every manifest of a core kind validates, strictly (no unknown field), against
    Kubernetes' own OpenAPI schemas (kubernetes-validate, offline)."""
    import copy

    import kubernetes_validate

    checked = set()
    for path, doc in all_docs():
        if path.parent.name == "ray-cluster" or doc["kind"] in CRDS:
            continue
        try:
            kubernetes_validate.validate(doc, KUBERNETES, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{path.name}: {doc['kind']} {doc['metadata']['name']}: {exc.message}")
        checked.add(doc["kind"])
    assert checked >= {"Service", "Deployment", "StatefulSet", "CronJob", "ConfigMap"}
    # the validator does refuse a mistake: a misspelt field of a container
    (cron,) = by_kind("CronJob")
    broken = copy.deepcopy(cron)
    broken["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["comand"] = ["x"]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES, strict=True)


def test_images_are_the_difforge_image_of_this_version_or_pinned():
    images = {img for _, d in all_docs() for img in walk(d, "image")}
    ours = {i for i in images if i.startswith("ghcr.io/difforge/")}
    assert ours <= {IMAGE, f"{IMAGE}-gpu"}, ours
    for other in images - ours:
        assert ":" in other and not other.endswith(":latest"), f"unpinned image {other}"
    dockerfile = (INFRA / "docker" / "Dockerfile").read_text()
    assert f"-t {IMAGE} " in dockerfile and f"-t {IMAGE}-gpu " in dockerfile
    # the base image's Ray is the Ray the code is locked to
    ray_pin = re.search(r"^ray==([\d.]+)$", (ROOT / "requirements.lock").read_text(), re.M)[1]
    assert f"rayproject/ray:{ray_pin}-py311" in dockerfile
    for raycluster in by_kind("RayCluster"):
        assert raycluster["spec"]["rayVersion"] == ray_pin
    launcher = docs(INFRA / "ray-cluster" / "cluster.yaml")[0]
    assert f"'{ray_pin}'" in " ".join(launcher["setup_commands"])
    for src in re.findall(r"^COPY (.+) \./?\S*$", dockerfile, re.M):
        for name in src.split():
            assert (ROOT / name).exists(), f"Dockerfile copies {name}, which does not exist"


def difforge_commands() -> list[list[str]]:
    """Every difforge command line the infrastructure runs."""
    out = []
    for rayjob in by_kind("RayJob"):
        out.append(shlex.split(rayjob["spec"]["entrypoint"]))
    for cron in by_kind("CronJob"):
        for c in walk(cron, "containers"):
            for container in c:
                out.append(container["command"] + container["args"])
    launcher = docs(INFRA / "ray-cluster" / "cluster.yaml")[0]
    for line in launcher["setup_commands"]:
        if line.startswith("difforge "):
            out.append(shlex.split(line.split(">")[0]))
    return out


def test_entrypoints_are_real_difforge_commands():
    commands = difforge_commands()
    assert len(commands) >= 3
    parser = build_parser()
    for argv in commands:
        assert argv[0] == "difforge", argv
        try:
            parser.parse_args(argv[1:])
        except SystemExit as exc:
            if argv[1:] != ["--help"]:
                pytest.fail(f"`{shlex.join(argv)}` does not parse (exit {exc.code})")


def test_the_pipeline_in_the_configmap_is_valid():
    (cm,) = by_kind("ConfigMap")
    text = cm["data"]["pipeline.yaml"]
    spec = load_spec(text).spec
    assert str(spec.storage).startswith("s3://")
    assert spec.tracking.uri == "http://mlflow:5000"
    for step in spec.steps:
        registry.get(step.op).Params.model_validate(step.params)
    # mounted where the RayJob and the CronJob read it
    for kind in ("RayJob", "CronJob"):
        (doc,) = by_kind(kind)
        mounts = [m for ms in walk(doc, "volumeMounts") for m in ms]
        assert {"name": "pipeline", "mountPath": "/pipelines"} in mounts
        volumes = [v for vs in walk(doc, "volumes") for v in vs]
        assert {"name": "pipeline", "configMap": {"name": "difforge-pipeline"}} in volumes


def services() -> dict[str, set[int]]:
    """Service name -> ports, including the head Service KubeRay makes for each RayCluster."""
    out = {
        d["metadata"]["name"]: {p["port"] for p in d["spec"]["ports"]} for d in by_kind("Service")
    }
    for rc in by_kind("RayCluster"):
        ports = {
            p["containerPort"]
            for c in walk(rc["spec"]["headGroupSpec"], "containers")
            for container in c
            for p in container.get("ports", [])
        }
        out[f"{rc['metadata']['name']}-head-svc"] = ports
    return out


def test_every_in_cluster_address_names_a_service_and_its_port():
    known = services()
    text = "\n".join(p.read_text() for p in MANIFESTS if p.parent.name != "ray-cluster")
    addresses = set(re.findall(r"(?:http://|@)([a-z][a-z0-9-]*):(\d+)", text))
    assert {a for a, _ in addresses} >= {"mlflow", "postgres", "difforge-head-svc"}
    for host, port in addresses:
        assert host in known, f"{host}:{port} is not a Service in infra/"
        assert int(port) in known[host], f"{host} does not expose port {port}"
    # each Service's targetPort is a port its pods declare
    for svc in by_kind("Service"):
        selector = svc["spec"]["selector"]
        pods = [
            d
            for _, d in all_docs()
            if d.get("kind") in ("Deployment", "StatefulSet")
            and d["spec"]["selector"]["matchLabels"] == selector
        ]
        declared = {
            p["containerPort"]
            for pod in pods
            for c in walk(pod, "containers")
            for container in c
            for p in container.get("ports", [])
        }
        assert {p["targetPort"] for p in svc["spec"]["ports"]} <= declared, svc["metadata"]


def test_environment_variable_names_agree():
    code = "\n".join(p.read_text() for p in (ROOT / "difforge").rglob("*.py"))
    names = set()
    for _, doc in all_docs():
        for env in walk(doc, "env"):
            names |= {e["name"] for e in env if isinstance(e, dict)}
    for name in names:
        if name.startswith("DIFFORGE_"):
            assert name in code, f"{name} is set in infra/ but difforge never reads it"
    # what the CronJob names with --env, the job finds in every Ray pod's own environment: set
    # there, or from a Secret whose keys the manifest documents (values never travel with jobs)
    secret_doc = (INFRA / "kuberay" / "raycluster.yaml").read_text()
    (cluster,) = by_kind("RayCluster")
    pods = [cluster["spec"]["headGroupSpec"]] + cluster["spec"]["workerGroupSpecs"]
    needed = {
        argv[i + 1] for argv in difforge_commands() for i, a in enumerate(argv) if a == "--env"
    }
    assert needed, "the CronJob names the S3 keys its run needs"
    for pod in pods:
        for container in pod["template"]["spec"]["containers"]:
            have = {e["name"] for e in container.get("env", [])}
            for source in container.get("envFrom", []):
                secret = source["secretRef"]["name"]
                created = re.search(rf"create secret generic {secret}((?:\\\n|[^\n])*)", secret_doc)
                assert created, f"the Secret {secret} is not documented"
                have |= set(re.findall(r"--from-literal=(\w+)=", created.group(1)))
            assert needed <= have, (container["name"], needed - have)
    # the Ray token comes from the Secret the RayCluster authenticates with
    secret = by_kind("RayCluster")[0]["spec"]["authOptions"]["secretName"]
    for kind in ("RayJob", "CronJob"):
        refs = [
            e["valueFrom"]["secretKeyRef"]
            for env in walk(by_kind(kind)[0], "env")
            for e in env
            if e.get("name") == "RAY_AUTH_TOKEN"
        ]
        assert refs == [{"name": secret, "key": "auth_token"}], kind


def test_the_image_runs_what_the_manifests_ask_of_it():
    """The defects found by reading the image against the installed libraries stay fixed."""
    dockerfile = (INFRA / "docker" / "Dockerfile").read_text()
    # DeepSpeed refuses DS_ACCELERATOR=""; the image sets none (difforge picks cuda or cpu)
    assert "DS_ACCELERATOR" not in re.sub(r"#.*", "", dockerfile)
    # the nightly pipeline's data is in the image
    (cm,) = by_kind("ConfigMap")
    ops = {step.op for step in load_spec(cm["data"]["pipeline.yaml"]).spec.steps}
    if "ingest.fashion_mnist" in ops:
        assert "dataset-fashion-mnist" in dockerfile
    # every pin the image writes agrees with the lock (or, for the one package installed without
    # its dependencies, with the Makefile's); psycopg2 for MLflow's PostgreSQL store is locked
    lock = (ROOT / "requirements.lock").read_text() + (ROOT / "Makefile").read_text()
    assert "psycopg2-binary==" in lock
    for name, version in re.findall(r"([A-Za-z][\w.-]*)==([\w.]+)", dockerfile):
        assert f"{name}=={version}" in lock, f"the Dockerfile pins {name}=={version}"


def test_mlflow_accepts_the_host_names_its_clients_use():
    """MLflow 3.17 answers 403 to a Host header it does not list (while /health stays 200):
    the in-cluster names of its Service, with and without the port, are allowed."""
    from tests.conftest import manifest_allowed_hosts

    allowed = manifest_allowed_hosts().split(",")
    (svc,) = [d for d in by_kind("Service") if d["metadata"]["name"] == "mlflow"]
    port = svc["spec"]["ports"][0]["port"]
    assert "mlflow" in allowed and f"mlflow:{port}" in allowed


def test_services_bind_to_loopback_by_default():
    for script in ("s3.sh", "mlflow.sh", "ray.sh"):
        text = (INFRA / "local" / script).read_text()
        assert 'HOST="${DIFFORGE_BIND:-127.0.0.1}"' in text, script
        assert "0.0.0.0" not in text, script
    launcher = " ".join(docs(INFRA / "ray-cluster" / "cluster.yaml")[0]["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in launcher
    # 0.0.0.0 only inside Kubernetes pods, where a Service fronts it
    for path in MANIFESTS:
        if "0.0.0.0" in path.read_text():
            assert path.parent.name in ("kuberay", "mlflow"), path


def test_the_s3_servers_default_ports_stay_out_of_rays_worker_ports():
    """SeaweedFS opens each port and port+10000; Ray's workers take ports 10002-19999 by
    default: a start once failed with "port 18336 for Filer is not available"."""
    text = (INFRA / "local" / "s3.sh").read_text()
    s3 = int(re.search(r'S3_PORT="\$\{S3_PORT:-(\d+)\}"', text).group(1))
    for port in range(s3, s3 + 5):  # S3, master, volume, filer, admin
        for opened in (port, port + 10000):
            assert not 10002 <= opened <= 19999 and opened < 65536, opened


def test_local_scripts_are_valid_shell():
    for script in sorted((INFRA / "local").glob("*.sh")):
        done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert done.returncode == 0, f"{script.name}: {done.stderr}"


def launcher_ray_starts() -> list[list[str]]:
    """The `ray start` lines of the cluster launcher's config, as argv (leading VAR=value
    assignments dropped)."""
    (config,) = docs(INFRA / "ray-cluster" / "cluster.yaml")
    lines = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    starts = []
    for line in lines:
        argv = shlex.split(line)
        while argv and re.match(r"^[A-Z_]+=", argv[0]):
            argv.pop(0)
        if argv[:2] == ["ray", "start"]:
            starts.append(argv[2:])
    return starts


def test_every_ray_start_option_the_infra_uses_is_one_ray_has():
    """The launcher's `ray start` lines and KubeRay's rayStartParams name options of the
    installed Ray's own `ray start` (a renamed or mistyped flag fails here, not on a cluster),
    and every rayStartParam is one the multi-host harness applies (infra/local/hosts.py refuses
    to start a head whose params it would not run as the manifest asks)."""
    import importlib.util

    from ray.scripts.scripts import start

    options = {opt for param in start.params for opt in param.opts}
    starts = launcher_ray_starts()
    assert len(starts) == 2  # the head's and the workers'
    for argv in starts:
        for arg in argv:
            if arg.startswith("-"):
                assert arg.split("=")[0] in options, arg
    spec = importlib.util.spec_from_file_location("hosts", INFRA / "local" / "hosts.py")
    hosts = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hosts)
    (cluster,) = by_kind("RayCluster")
    groups = [cluster["spec"]["headGroupSpec"], *cluster["spec"]["workerGroupSpecs"]]
    for group in groups:
        for name in group.get("rayStartParams", {}):
            assert f"--{name}" in options, name
    assert set(cluster["spec"]["headGroupSpec"]["rayStartParams"]) <= set(
        hosts.APPLIED_START_PARAMS
    )
    for group in cluster["spec"]["workerGroupSpecs"]:
        assert not group.get("rayStartParams"), "the harness's workers take no params"


def test_the_head_keeps_its_state_in_the_redis_the_manifests_run():
    """GCS fault tolerance: the RayCluster's Redis address is a Service of infra/ on the port it
    exposes, its password the Secret the Redis StatefulSet requires, created as the RayCluster's
    instructions say, and the multi-host harness applies every option (as it does the head's
    rayStartParams)."""
    import importlib.util

    (cluster,) = by_kind("RayCluster")
    options = cluster["spec"]["gcsFaultToleranceOptions"]
    host, port = options["redisAddress"].split(":")
    assert int(port) in services()[host]
    ref = options["redisPassword"]["valueFrom"]["secretKeyRef"]
    (redis,) = [d for d in by_kind("StatefulSet") if d["metadata"]["name"] == host]
    (container,) = redis["spec"]["template"]["spec"]["containers"]
    refs = [e["valueFrom"]["secretKeyRef"] for e in container["env"] if "valueFrom" in e]
    assert ref in refs and "--requirepass" in container["args"][0]
    instructions = (INFRA / "kuberay" / "raycluster.yaml").read_text()
    assert f"create secret generic {ref['name']} --from-literal={ref['key']}=" in instructions
    spec = importlib.util.spec_from_file_location("hosts", INFRA / "local" / "hosts.py")
    hosts = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hosts)
    assert set(options) <= set(hosts.APPLIED_GCS_OPTIONS)
    assert host in hosts.NAMES["services"]
