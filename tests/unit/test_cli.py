"""The command line as a user meets it: fast answers, plans, and errors without tracebacks."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT, difforge_cli

QUICKSTART = str(ROOT / "pipelines" / "quickstart.yaml")


def test_validate_prints_the_plan(tmp_path):
    out = difforge_cli("validate", QUICKSTART, "--set", f"storage={tmp_path}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    for step in ("raw", "clean", "unique", "noisy", "vae", "latents", "classifier"):
        assert step in out.stdout
    assert "to run" in out.stdout and "ok: 0 cached, 14 to run" in out.stdout


def test_validate_json_is_the_resolved_spec(tmp_path):
    out = difforge_cli(
        "validate",
        QUICKSTART,
        "--json",
        "--set",
        "raw.params.limit=50",
        "--set",
        f"storage={tmp_path}",
    )
    plan = json.loads(out.stdout)
    raw = plan["steps"][0]
    assert raw["params"]["limit"] == 50 and raw["op"] == "ingest.fashion_mnist"
    assert plan["overrides"] == ["raw.params.limit=50", f"storage={tmp_path}"]


def test_user_mistakes_exit_2_without_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nsteps:\n  - id: a\n    op: ingest.digits\n    params: {limt: 3}\n")
    out = difforge_cli("validate", str(bad))
    assert out.returncode == 2
    assert f"{bad}:5: step 'a': params.limt: unknown parameter" in out.stderr
    assert "Traceback" not in out.stderr
    missing = difforge_cli("run", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 2 and "file not found" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_validate_and_help_import_neither_torch_nor_ray():
    code = (
        f"import sys; from difforge.cli import main; main(['validate', {QUICKSTART!r}]);"
        "heavy = [m for m in ('torch', 'ray', 'mlflow', 'pandas') if m in sys.modules];"
        "print('HEAVY', heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "HEAVY []" in out.stdout


def test_validating_imports_only_the_operators_a_spec_names(tmp_path):
    spec = tmp_path / "p.yaml"
    spec.write_text(
        "name: p\nstorage: s\nsteps:\n  - {id: raw, op: ingest.digits}\n"
        "  - {id: small, op: image.resize, inputs: [raw], params: {size: 8}}\n"
    )
    code = (
        f"import sys; from difforge.cli import main; main(['validate', {str(spec)!r}]);"
        "print('OPS', sorted(m for m in sys.modules if m.startswith('difforge.operators.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    (line,) = [x for x in out.stdout.splitlines() if x.startswith("OPS ")]
    loaded = eval(line[4:])  # a printed list of module names
    assert "difforge.operators.ingest.digits" in loaded
    assert "difforge.operators.image.resize" in loaded
    assert not [m for m in loaded if m.split(".")[2] in ("train", "sample", "evaluate", "distill")]


def test_ops_lists_operators_with_params():
    out = difforge_cli("ops")
    assert out.returncode == 0
    for name in (
        "ingest.fashion_mnist",
        "ingest.digits",
        "ingest.images",
        "ingest.parquet",
        "image.resize",
        "train.classifier",
    ):
        assert name in out.stdout
    assert "size: " in out.stdout and "(required)" in out.stdout
    one = difforge_cli("ops", "image.resize")
    assert "side outputs: rejects" in one.stdout
    # defaults made by a factory are shown as values, not as pydantic's placeholder
    dc = difforge_cli("ops", "evaluate.diffusion_classifier").stdout
    assert "PydanticUndefined" not in out.stdout
    assert "stages: list (default [{'trials': 10, 'keep': 3}, {'trials': 30, 'keep': 1}])" in dc


def test_schema_is_json_schema_of_the_spec_with_every_operators_params():
    out = difforge_cli("schema")
    schema = json.loads(out.stdout)
    assert schema["title"] == "PipelineSpec"
    assert {"name", "storage", "tracking", "steps"} <= set(schema["properties"])
    assert "ingest.digits" in schema["$defs"]["StepSpec"]["properties"]["op"]["enum"]
    assert "train.diffusion.params" in schema["$defs"]


SERVE = """
import subprocess, sys
from difforge.cli import _serve_until_signalled
server = subprocess.Popen(["sh", "-c", "sleep 60 & sleep 60"], start_new_session=True)
print(server.pid, flush=True)
sys.exit(_serve_until_signalled(server))
"""


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM", "SIGHUP"])
def test_a_served_process_group_ends_with_the_command_whatever_signal_ends_it(sig):
    """What `difforge ui` does with its MLflow server: Ctrl-C, `kill` and a closed terminal
    each end the server's whole process group (workers too) and the command, at once."""
    import signal
    import time

    import psutil

    command = subprocess.Popen([sys.executable, "-c", SERVE], stdout=subprocess.PIPE, text=True)
    group = int(command.stdout.readline())
    deadline = time.time() + 10
    while len([p for p in psutil.process_iter() if _in_group(p, group)]) < 3:
        assert time.time() < deadline, "the server's processes never started"
        time.sleep(0.05)
    command.send_signal(getattr(signal, sig))
    assert command.wait(10) == 0
    time.sleep(0.2)
    assert not [p.pid for p in psutil.process_iter() if _in_group(p, group)]


def _in_group(process, group: int) -> bool:
    import os

    import psutil

    try:
        return os.getpgid(process.pid) == group and process.status() != "zombie"
    except (ProcessLookupError, psutil.Error):
        return False
