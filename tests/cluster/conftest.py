"""One multi-host cluster for the tests of this folder: Linux network namespaces made by
infra/local/hosts.py (services, head, worker1, worker2, client), shared by every test here and
removed after the last of them (its Ray, MLflow and PostgreSQL stop before the rest of the
suite runs)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import SLOW_PLUGIN, make_plugin

ROOT = Path(__file__).resolve().parents[2]
HOSTS = ROOT / "infra" / "local" / "hosts.py"
_spec = importlib.util.spec_from_file_location("difforge_hosts", HOSTS)
hosts = importlib.util.module_from_spec(_spec)  # the harness's own addresses and pod env
_spec.loader.exec_module(hosts)


@dataclass
class Cluster:
    env: dict[str, str]
    state: Path

    def run(self, host: str, *argv: str, timeout: float = 600) -> subprocess.CompletedProcess:
        """A command on one of the hosts, in the environment its role has there."""
        return subprocess.run(
            [sys.executable, str(HOSTS), "exec", host, "--", *argv],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def python(self, host: str, code: str, timeout: float = 300):
        """Run Python on a host; it prints one JSON value last, which this returns."""
        done = self.run(host, sys.executable, "-c", code, timeout=timeout)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    @property
    def secrets(self) -> dict[str, dict[str, str]]:
        return json.loads((self.state / "secrets.json").read_text())


# test.gate: a filter (every third row to `rejects`) that waits at a gate between its two
# commits (its `rejects`, then its main output), so a test can fault the cluster right there
GATE_PLUGIN = '''
import os, time, zlib
from difforge.platform.operator import FilterOperator, Verdicts

class GateParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    folder: str

class Gate(FilterOperator):
    """Rejects every third row; before its main output's commit, writes FOLDER/reached and
    waits (at most 120 s) for FOLDER/go."""
    name = "test.gate"
    Params = GateParams

    def judge(self, batch):
        ids = batch.column("id").to_pylist()
        return Verdicts(["third" if zlib.crc32(i.encode()) % 3 == 0 else None for i in ids])

    def finalize(self, outcome, ctx):
        open(os.path.join(self.params.folder, "reached"), "w").close()
        deadline = time.time() + 120
        while not os.path.exists(os.path.join(self.params.folder, "go")):
            if time.time() > deadline:
                raise RuntimeError("the gate never opened")
            time.sleep(0.1)
        return None
'''


@pytest.fixture(scope="package")  # up for tests/cluster/ only, not the whole suite
def cluster():
    if os.geteuid() != 0:
        pytest.skip("the multi-host cluster needs root (network namespaces)")
    parent = Path(tempfile.mkdtemp(prefix="dfh", dir="/tmp"))  # short: Ray's socket paths
    parent.chmod(0o755)  # PostgreSQL runs as its own user, inside
    state = parent / "c"
    plugins = parent / "plugins"  # test.slow and test.gate, on the Ray nodes as in an image
    plugins.mkdir()
    entry_points = "test.slow = difforge_plugin:Slow\ntest.gate = difforge_plugin:Gate"
    make_plugin(plugins, SLOW_PLUGIN + GATE_PLUGIN, entry_points)
    plugins.chmod(0o755)
    env = {
        **os.environ,
        "DIFFORGE_HOSTS_PREFIX": f"dt{os.getpid() % 10000}",
        "DIFFORGE_HOSTS_STATE": str(state),
        "DIFFORGE_HOSTS_PLUGINS": str(plugins),
    }
    up = subprocess.run(
        [sys.executable, str(HOSTS), "up"], env=env, capture_output=True, text=True, timeout=600
    )
    try:
        if up.returncode != 0:
            logs = "".join(
                f"\n--- {p.name}\n{p.read_text()[-2000:]}" for p in (state / "logs").glob("*")
            )
            pytest.fail(f"hosts.py up failed:\n{up.stdout}\n{up.stderr}{logs}")
        yield Cluster(env, state)
    finally:
        subprocess.run(
            [sys.executable, str(HOSTS), "down"], env=env, capture_output=True, timeout=300
        )
        shutil.rmtree(parent, ignore_errors=True)  # the plugins' folder, what down left
