"""One attempt's work is its own: work folders held by leases (difforge.platform.leases)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

from difforge.platform import leases


def test_concurrent_runs_of_a_step_work_in_folders_of_their_own(tmp_path):
    root = str(tmp_path / "_work")
    first = leases.claim(root)
    second = leases.claim(root)  # the same step, another run, now: never the same folder
    assert first.uri != second.uri and not first.resumed and not second.resumed
    first.release()
    third = leases.claim(root)  # after the first ended: resumes its folder
    assert third.uri == first.uri and third.resumed
    second.release()
    third.release()


def test_a_dead_process_or_a_stale_lease_frees_its_folder(tmp_path, monkeypatch):
    root = str(tmp_path / "_work")
    held = leases.claim(root)
    held._stop.set()  # no more renewals: as if its process had gone without a word
    lease_file = tmp_path / "_work" / held.uri.rsplit("/", 1)[-1] / "_lease-000001.json"
    state = json.loads(lease_file.read_text())
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    ).stdout.strip()
    lease_file.write_text(json.dumps({**state, "pid": int(dead)}))
    taken = leases.claim(root)  # a process of this host that is gone holds nothing
    assert taken.uri == held.uri and taken.resumed
    taken._stop.set()
    other_host = {
        **json.loads(
            (tmp_path / "_work" / held.uri.rsplit("/", 1)[-1] / "_lease-000002.json").read_text()
        ),
        "host": "elsewhere",
    }
    (tmp_path / "_work" / held.uri.rsplit("/", 1)[-1] / "_lease-000002.json").write_text(
        json.dumps(other_host)
    )
    other = leases.claim(root)
    assert other.uri != held.uri  # another host's, renewed just now: held
    other._stop.set()
    shutil.rmtree(tmp_path / "_work" / other.uri.rsplit("/", 1)[-1])
    monkeypatch.setattr(leases, "EXPIRES_S", 0.0)
    assert leases.claim(root).uri == held.uri  # not renewed in time: expired


def test_a_forced_step_starts_a_new_folder_and_drops_ended_ones(tmp_path):
    root = str(tmp_path / "_work")
    old = leases.claim(root)
    (tmp_path / "_work" / old.uri.rsplit("/", 1)[-1] / "checkpoint").write_text("x")
    old.release()
    live = leases.claim(root, fresh=True)
    assert live.uri != old.uri and not live.resumed
    assert not (tmp_path / "_work" / old.uri.rsplit("/", 1)[-1]).exists()
    running = leases.claim(root, fresh=True)  # a live run's folder is never removed
    assert (tmp_path / "_work" / live.uri.rsplit("/", 1)[-1]).exists() and running.uri != live.uri
    live.release()
    running.release()
