"""Shared fixtures: one Ray per test session, real services (SeaweedFS S3, an MLflow server)
started once and only when a test asks for them."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

# Local state for the whole session, never the user's ~/.difforge.
SESSION_HOME = Path(tempfile.mkdtemp(prefix="difforge-test-home-"))
os.environ["DIFFORGE_HOME"] = str(SESSION_HOME)
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("RAY_ADDRESS", None)
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ["HF_HUB_OFFLINE"] = "1"  # a hub lookup fails at once, with difforge's clear error

# S3 credentials live in the environment (never in YAML); Ray workers inherit them.
S3_KEY, S3_SECRET = "difforge-test", "difforge-test-secret"
os.environ["AWS_ACCESS_KEY_ID"] = S3_KEY
os.environ["AWS_SECRET_ACCESS_KEY"] = S3_SECRET
os.environ.pop("AWS_PROFILE", None)

# Ray's token authentication stays on (its default), with a token of this session's own.
RAY_TOKEN = SESSION_HOME / "ray_auth_token"
RAY_TOKEN.write_text(secrets.token_hex(32))
os.environ["RAY_AUTH_MODE"] = "token"
os.environ["RAY_AUTH_TOKEN_PATH"] = str(RAY_TOKEN)
os.environ.pop("RAY_AUTH_TOKEN", None)
os.environ.pop("DIFFORGE_CLUSTER", None)
os.environ.pop("DIFFORGE_SCHEDULES", None)


def pytest_sessionfinish(session, exitstatus):
    """The session's MLflow store and caches go with it (a few hundred MB over a full run);
    DIFFORGE_KEEP_TEST_HOME=1 keeps them, to look into a failure."""
    if not os.environ.get("DIFFORGE_KEEP_TEST_HOME"):
        shutil.rmtree(SESSION_HOME, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need a CUDA GPU: skipped, saying so, where there is none."""
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu:
        return
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU (none here)")
        for item in gpu:
            item.add_marker(skip)


def free_port(pair_offset: int | None = None) -> int:
    """A free loopback port (and port+offset free too, for servers that open both)."""
    from difforge.platform.runtime import free_port as one_free_port

    for _ in range(200):
        port = one_free_port()
        if pair_offset is None:
            return port
        if port + pair_offset < 65536:
            with socket.socket() as s2:
                try:
                    s2.bind(("127.0.0.1", port + pair_offset))
                    return port
                except OSError:
                    continue
    raise RuntimeError("no free port")


# what a submitted run needs from a cluster's own environment to reach its S3 (`--env NAME`)
NEEDS_S3 = [
    f"--env={name}" for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL")
]


def wait_for(check, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if check():
                return
        except Exception:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{what} not ready after {timeout}s")


# Chosen before any Ray starts, so that Ray's workers inherit the endpoint with the keys.
S3_PORTS = {k: free_port(10000) for k in ("s3", "master", "volume", "filer", "admin")}
S3_ENDPOINT = f"http://127.0.0.1:{S3_PORTS['s3']}"
os.environ["AWS_ENDPOINT_URL"] = S3_ENDPOINT
os.environ["AWS_ENDPOINT_URL_S3"] = S3_ENDPOINT
os.environ["AWS_DEFAULT_REGION"] = "us-east-1"


@pytest.fixture(scope="session")
def ray_session():
    """The one Ray of the test session; `difforge.run` reuses it."""
    import ray

    ray.init(address="local", include_dashboard=False, num_cpus=2)
    yield
    ray.shutdown()


#: The digits pipeline's shared steps: several test modules run pipelines named "digits" in one
#: storage root (`digits_storage`), so these are computed once per session, by whichever module
#: runs first, and found in the cache by the others (as a user's pipelines share steps).
DIGITS_STEPS = [
    {"id": "raw", "op": "ingest.digits", "params": {"split": "train"}},
    {"id": "test", "op": "ingest.digits", "params": {"split": "test"}},
    {
        "id": "clf",
        "op": "train.classifier",
        "inputs": ["raw", "test"],
        "params": {"epochs": 2, "batch_size": 64},
    },
    # a v-prediction teacher; its backbone is tests.unit.test_diffusion_recipe.TINY_UNET
    {
        "id": "teacher",
        "op": "train.diffusion",
        "inputs": ["raw"],
        "params": {
            "backbone": {
                "type": "UNet2DModel",
                "block_out_channels": [8, 16],
                "layers_per_block": 1,
                "norm_num_groups": 4,
                "down_block_types": ["DownBlock2D", "DownBlock2D"],
                "up_block_types": ["UpBlock2D", "UpBlock2D"],
            },
            "batch_size": 64,
            "max_steps": 60,
            "lr": 1e-3,
            "objective": "v_prediction",
            "checkpoint_every": 60,
            "warmup_steps": 5,
        },
    },
]


@pytest.fixture(scope="session")
def digits_storage(tmp_path_factory) -> Path:
    """The storage root of the pipelines named "digits" (see DIGITS_STEPS)."""
    return tmp_path_factory.mktemp("digits-shared")


def digits_pipeline(storage: Path, experiment: str, steps: list[dict]) -> dict:
    """A pipeline named "digits" in the shared root: DIGITS_STEPS, then `steps`."""
    import copy

    return {
        "name": "digits",
        "storage": str(storage),
        "tracking": {"experiment": experiment},
        "steps": copy.deepcopy(DIGITS_STEPS) + steps,
    }


@pytest.fixture
def tmp_storage(tmp_path: Path) -> Path:
    return tmp_path / "storage"


def local_service(script: str, state: Path, env: dict[str, str]):
    """Start a service with its infra/local script (as a user would); returns a stopper."""
    full_env = {**os.environ, "DIFFORGE_LOCAL": str(state), "PYTHON": sys.executable, **env}
    path = str(ROOT / "infra" / "local" / script)
    done = subprocess.run([path, "start"], env=full_env, capture_output=True, text=True)
    if done.returncode != 0:
        pytest.fail(f"{script} start failed:\n{done.stdout}\n{done.stderr}")

    def stop(*args: str) -> None:
        subprocess.run([path, "stop", *args], env=full_env, capture_output=True, timeout=60)

    return stop, full_env


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (SeaweedFS) on free loopback ports, by infra/local/s3.sh."""
    state = Path(tempfile.mkdtemp(prefix="difforge-s3-"))
    ports = {f"S3_{k.upper()}_PORT": str(v) for k, v in S3_PORTS.items() if k != "s3"}
    stop, _ = local_service("s3.sh", state, {"S3_PORT": str(S3_PORTS["s3"]), **ports})
    yield S3_ENDPOINT
    stop()
    shutil.rmtree(state, ignore_errors=True)


def manifest_allowed_hosts() -> str:
    """The Host headers infra/mlflow/mlflow.yaml's server answers (its --allowed-hosts)."""
    import shlex

    import yaml

    docs = yaml.safe_load_all((ROOT / "infra" / "mlflow" / "mlflow.yaml").read_text())
    (deploy,) = [d for d in docs if d and d["kind"] == "Deployment"]
    argv = shlex.split(" ".join(deploy["spec"]["template"]["spec"]["containers"][0]["args"]))
    return argv[argv.index("--allowed-hosts") + 1]


@pytest.fixture(scope="session")
def mlflow_server(s3_server):
    """A real `mlflow server` (one worker, jobs off) with its artifacts on the S3 server, by
    infra/local/mlflow.sh, answering the Host headers the Kubernetes manifest lists."""
    state = Path(tempfile.mkdtemp(prefix="difforge-mlflow-"))
    port = free_port()
    stop, _ = local_service(
        "mlflow.sh",
        state,
        {"MLFLOW_PORT": str(port), "MLFLOW_ALLOWED_HOSTS": manifest_allowed_hosts()},
    )
    yield f"http://127.0.0.1:{port}"
    stop()
    shutil.rmtree(state, ignore_errors=True)


QUICKSTART = str(ROOT / "pipelines" / "quickstart.yaml")


@pytest.fixture(scope="session")
def quickstart(ray_session, tmp_path_factory):
    """The quickstart on a small slice, run once for the session: the tests of
    tests/integration/test_pipelines.py and the browser's (test_browser.py) look at it."""
    storage = tmp_path_factory.mktemp("quickstart")
    overrides = [
        f"storage={storage}",
        "tracking.experiment=quickstart-test",
        "raw.params.limit=1200",
        "raw_test.params.limit=300",
        "classifier.params.epochs=2",
        "classifier.params.batch_size=64",
        "vae.params.max_steps=60",
        "vae.params.checkpoint_every=30",
        "model.params.max_steps=10",
        "model.params.checkpoint_every=10",
        "plan.params.num_images=40",
        "samples.params.num_inference_steps=4",
        "quality.params.kid_subset_size=20",
    ]
    import difforge

    summary = difforge.run(QUICKSTART, overrides)
    return storage, overrides, summary


def load_pyfunc(tracking_uri: str, ref: str):
    """`mlflow.pyfunc.load_model(ref)` as a user would call it, with MLFLOW_TRACKING_URI set
    to `tracking_uri` for the call (MLflow's global tracking URI is left as it was: unset)."""
    import mlflow

    saved = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    try:
        return mlflow.pyfunc.load_model(ref)
    finally:
        if saved is None:
            os.environ.pop("MLFLOW_TRACKING_URI")
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved


def difforge_cli(*args: str, env: dict | None = None, timeout: float = 600, cwd=None):
    """Run the `difforge` command as a user would; returns the CompletedProcess."""
    return subprocess.run(
        [str(BIN / "difforge"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        cwd=cwd,
    )


PLUGIN = '''
from pydantic import BaseModel, ConfigDict
from difforge.platform.operator import MapOperator
from tests.conftest import make_plugin

class P(BaseModel):
    model_config = ConfigDict(extra="forbid")
    seconds: float = 0.1

class Hello(MapOperator):
    """A plugin operator."""
    name = "plugin.hello"
    Params = P
'''


def make_plugin(root, body: str = PLUGIN, name: str = "plugin.hello = difforge_plugin:Hello"):
    """A real installed distribution with an entry point, on a folder added to PYTHONPATH."""
    (root / "difforge_plugin.py").write_text(textwrap.dedent(body))
    info = root / "difforge_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: difforge-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[difforge.operators]\n{name}\n")
    return {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


SLOW_PLUGIN = '''
import time
from pydantic import BaseModel, ConfigDict
from difforge.platform.operator import MapOperator

class P(BaseModel):
    model_config = ConfigDict(extra="forbid")
    seconds_per_batch: float = 1.0

class Slow(MapOperator):
    """A deliberately slow step: passes rows through, sleeping per batch."""
    name = "test.slow"
    Params = P

    def process(self, batch):
        time.sleep(self.params.seconds_per_batch)
        return batch
'''


def slow_pipeline(
    tmp_path: Path, seconds_per_batch: float = 1.5, fused: bool = False
) -> tuple[Path, dict]:
    """A pipeline whose last step takes a while, with the plugin that provides it. By default
    a job (exact dedup) stands between the source and the slow step, which therefore runs in a
    pass of its own; `fused=True` has it read the source directly, in one pass with it."""
    plugin_root = tmp_path / "plugin"
    plugin_root.mkdir()
    env = make_plugin(plugin_root, SLOW_PLUGIN, "test.slow = difforge_plugin:Slow")
    path = tmp_path / "slow.yaml"
    steps = ["  - {id: raw, op: ingest.digits, resources: {batch_size: 200}}"]
    if not fused:
        steps.append("  - {id: dedup, op: curate.dedup_exact, inputs: [raw]}")
    steps.append(
        f"  - {{id: slow, op: test.slow, inputs: [{'raw' if fused else 'dedup'}], "
        f"params: {{seconds_per_batch: {seconds_per_batch}}}, resources: {{batch_size: 100}}}}"
    )
    head = f"# difforge run slow.yaml\nname: slow\nstorage: {tmp_path / 'storage'}\n"
    path.write_text(head + "tracking: {experiment: slow-tests}\nsteps:\n" + "\n".join(steps) + "\n")
    return path, env
