"""Faults of the environment, not of the pipeline (a model hub that cannot be reached, an MLflow
server that does not answer, S3 keys refused or missing): at most 3 lines on stderr, no
traceback, the address tried and what to do. And `difforge ui` leaves nothing behind."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.request

import psutil
import pytest

from tests.conftest import BIN, difforge_cli, free_port


def short(done: subprocess.CompletedProcess) -> str:
    said = done.stderr.strip()
    assert done.returncode != 0, done.stdout[-2000:]
    assert "Traceback" not in said and len(said.splitlines()) <= 3, said[-3000:]
    return said


def pipeline(tmp_path, storage: str, tracking: str = "", step: str = "") -> str:
    path = tmp_path / "p.yaml"
    path.write_text(
        f"name: env\nstorage: {storage}\n{tracking}steps:\n"
        "  - {id: raw, op: ingest.digits, params: {limit: 20}}\n" + step
    )
    return str(path)


def test_a_model_hub_that_cannot_be_reached_is_a_short_error(tmp_path):
    hub = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    step = "  - {id: emb, op: encode.image, inputs: [raw], params: {model: org/some-model}}\n"
    path = pipeline(tmp_path, tmp_path / "data", step=step)
    done = difforge_cli("validate", path, env={"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": hub})
    said = short(done)
    assert f"model 'org/some-model': cannot reach the Hugging Face hub at {hub}" in said
    assert "hf download org/some-model" in said


def test_an_mlflow_server_that_does_not_answer_is_a_short_error(tmp_path):
    server = f"http://127.0.0.1:{free_port()}"
    path = pipeline(tmp_path, tmp_path / "data", tracking=f'tracking: {{uri: "{server}"}}\n')
    done = difforge_cli("run", path, env={"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"})
    said = short(done)
    assert f"cannot reach the MLflow tracking server at {server} (connection refused)" in said


@pytest.mark.parametrize(
    "keys", [{"AWS_SECRET_ACCESS_KEY": "not-the-secret"}, {"AWS_ACCESS_KEY_ID": ""}]
)
def test_s3_keys_refused_or_missing_are_a_short_error(tmp_path, s3_server, keys):
    path = pipeline(tmp_path, "s3://datasets/env-faults")
    env = {**keys, "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none")}
    if not keys.get("AWS_ACCESS_KEY_ID", True):
        env["AWS_SECRET_ACCESS_KEY"] = ""
    said = short(difforge_cli("validate", path, env=env))
    assert "s3://datasets/env-faults" in said and s3_server in said, said
    assert "AWS_ACCESS_KEY_ID" in said  # what to set


def test_difforge_ui_ended_by_sigterm_leaves_no_process_and_frees_its_port(tmp_path):
    """`kill` of `difforge ui` ends its MLflow server too (SIGINT and SIGHUP take the same
    path: test_cli.py sends each to it)."""
    port = free_port()
    ui = subprocess.Popen(
        [str(BIN / "difforge"), "ui", "--port", str(port)],
        env={**os.environ, "DIFFORGE_HOME": str(tmp_path / "home")},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    children: list[psutil.Process] = []
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except OSError:
                assert ui.poll() is None and time.time() < deadline, "the UI never answered"
                time.sleep(0.2)
        children = psutil.Process(ui.pid).children(recursive=True)
        assert children  # the MLflow server (and its workers)
        ui.send_signal(signal.SIGTERM)
        ui.wait(10)
        _, alive = psutil.wait_procs(children, timeout=5)
        assert not alive, [p.cmdline() for p in alive]
    finally:  # a failed test leaves no server behind either
        if ui.poll() is None:
            leader = psutil.Process(ui.pid)
            children = [*leader.children(recursive=True), leader]
        for process in children:
            with contextlib.suppress(psutil.Error):
                process.kill()
    with socket.socket() as s:  # free again: a server can listen there (as servers do, past
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT)
        s.bind(("127.0.0.1", port))
        s.listen()
