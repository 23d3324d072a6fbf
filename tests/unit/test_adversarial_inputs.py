"""Adversarial specs, sources and manifests: each is refused with a clear error (or detected),
never a traceback, a hang or a wrong cache hit. Runs without Ray."""

from __future__ import annotations

import io
import json
import os
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

import difforge
from difforge.platform import datasets as D
from difforge.platform.errors import DifforgeError, SpecError


def write_dataset(uri: str, table: pa.Table, fingerprint: str) -> D.Manifest:
    """A committed one-shard dataset, through the platform's own writer."""
    try:  # the dataset-output API
        from difforge.platform.outputs import write_dataset as write
    except ImportError:  # before it
        entry = D.ShardWriter(uri, D.attempt_id()).write(table, "0")
        return D.commit(uri, [entry], fingerprint, {})[0]
    return write(uri, table, fingerprint)


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "pipeline.yaml"
    path.write_text(textwrap.dedent(text).lstrip())
    return str(path)


def spec_problems(tmp_path: Path, text: str) -> list:
    with pytest.raises(SpecError) as info:
        difforge.plan(write(tmp_path, text))
    return info.value.problems


def test_a_file_rewritten_with_the_same_size_and_mtime_is_detected_with_verify_content(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (8, 8), np.uint8)).save(folder / f"{i}.png")
    text = f"""
        name: verify
        storage: {tmp_path / "s"}
        steps:
          - id: raw
            op: ingest.images
            params: {{path: {folder}, verify: content}}
        """
    before = difforge.plan(write(tmp_path, text)).step("raw").fingerprint
    target = folder / "1.png"
    st = target.stat()
    data = bytearray(target.read_bytes())
    data[-20] ^= 0xFF  # same size, other content
    target.write_bytes(bytes(data))
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))  # `touch -r`: the old mtime back
    assert target.stat().st_size == st.st_size and target.stat().st_mtime_ns == st.st_mtime_ns
    assert difforge.plan(write(tmp_path, text)).step("raw").fingerprint != before


def test_a_file_rewritten_with_the_same_size_between_listing_and_read_fails_the_read(tmp_path):
    """The listing that fingerprints a folder records sizes and modification times; a file
    rewritten with the same size after it (another image, all white) fails its read, naming
    the file, rather than being committed under the old fingerprint."""
    from difforge.operators.ingest.images import Images

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(folder / f"{i}.png")
    op = Images(Images.Params(path=str(folder)))
    (task,) = op.read_tasks(100)  # listed now, as when the run is planned
    assert len(pa.concat_tables(op.read(task))) == 3  # unchanged: read as listed
    target = folder / "1.png"
    size, mtime = target.stat().st_size, target.stat().st_mtime_ns
    white = io.BytesIO()
    Image.fromarray(np.full((8, 8), 255, np.uint8)).save(white, format="PNG")
    white = white.getvalue().ljust(size, b"\0")[:size]
    target.write_bytes(white)  # another image, the same size
    os.utime(target, ns=(mtime + 5_000_000_000, mtime + 5_000_000_000))
    assert target.stat().st_size == size
    with pytest.raises(DifforgeError, match=r"1\.png: changed between the run's listing"):
        list(op.read(task))


def test_a_manifest_naming_a_file_outside_its_dataset_is_refused(tmp_path):
    outside = tmp_path / "other"
    secret = write_dataset(str(outside), pa.table({"id": ["secret"]}), "fp").files[0]
    uri = str(tmp_path / "ds")
    write_dataset(uri, pa.table({"id": ["a"]}), "fp")
    manifest = json.loads((tmp_path / "ds" / "_manifest.json").read_text())
    manifest["files"][0]["path"] = f"../other/{secret.path}"
    (tmp_path / "ds" / "_manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DifforgeError, match=r"\.\./other/.*leaves the dataset"):
        D.open_dataset(uri).to_arrow()


def test_a_yaml_alias_bomb_is_a_spec_error(tmp_path):
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    for k in range(1, 7):  # 9**7 (4.8 million) strings once expanded, from a few hundred bytes
        lines.append(f"a{k}: &a{k} [{', '.join([f'*a{k - 1}'] * 9)}]")
    text = "\n".join(lines) + "\nname: bomb\nstorage: s\nsteps: *a6\n"
    (p,) = spec_problems(tmp_path, text)
    assert "alias" in p.message


def test_duplicate_keys_are_refused_with_both_lines(tmp_path):
    text = """
        name: dup
        storage: s
        steps:
          - {id: raw, op: ingest.digits}
        steps:
          - {id: other, op: ingest.digits}
        """
    (p,) = spec_problems(tmp_path, text)
    assert "steps" in p.message and "line 3" in p.message and "line 5" in p.message


def test_overlong_names_are_refused_at_validation(tmp_path):
    long_id = "s" * 300
    found = spec_problems(
        tmp_path,
        f"""
        name: {"n" * 300}
        storage: s
        steps:
          - {{id: {long_id}, op: ingest.digits}}
        """,
    )
    text = " ".join(p.message for p in found)
    assert "at most" in text and "name" in text and long_id[:20] in text


@pytest.mark.parametrize("storage", ["memory://x", "''"])
def test_storage_that_does_not_persist_is_refused(tmp_path, storage):
    (p,) = spec_problems(
        tmp_path,
        f"""
        name: mem
        storage: {storage}
        steps:
          - {{id: raw, op: ingest.digits}}
        """,
    )
    assert "storage" in p.message


def test_cli_errors_stay_one_clear_line(tmp_path):
    from tests.conftest import BIN, difforge_cli

    shown = difforge_cli("show", "/etc/passwd")
    assert shown.returncode == 2 and "Traceback" not in shown.stderr
    assert "no committed dataset here" in shown.stderr

    huge = "x" * 200_000
    path = write(
        tmp_path,
        f"""
        name: big
        storage: s
        steps:
          - {{id: raw, op: ingest.digits, params: {{limit: "{huge}"}}}}
        """,
    )
    done = difforge_cli("validate", path)
    assert done.returncode == 2 and "params.limit" in done.stderr
    assert len(done.stderr) < 2_000  # the value is not echoed whole

    steps = "\n".join(
        f"  - {{id: s{i}, op: image.resize, inputs: [s{i - 1}], params: {{size: 8}}}}"
        for i in range(1, 1200)
    )
    many = tmp_path / "many.yaml"
    many.write_text(f"name: many\nstorage: s\nsteps:\n  - {{id: s0, op: ingest.digits}}\n{steps}\n")
    import subprocess

    piped = subprocess.run(  # the reader stops after one line; the output is larger than a pipe
        f"'{BIN / 'difforge'}' validate '{many}' | head -1",
        shell=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert piped.stdout.startswith("pipeline many: 1200 steps")
    assert "Traceback" not in piped.stderr and "BrokenPipe" not in piped.stderr, piped.stderr


def sidecar_plan(tmp_path: Path, sidecar: bytes, name: str = "labels.csv"):
    folder = tmp_path / "imgs"
    folder.mkdir(exist_ok=True)
    for i in range(3):
        Image.new("L", (4, 4), i).save(folder / f"{i}.png")
    (tmp_path / name).write_bytes(sidecar)
    return write(
        tmp_path,
        f"""
        name: side
        storage: {tmp_path / "s"}
        steps:
          - id: raw
            op: ingest.images
            params: {{path: {folder}, sidecar: {tmp_path / name}}}
        """,
    )


@pytest.mark.parametrize(
    "sidecar, message",
    [
        (b"file,label\n0.png,1\n1.png,\xff\xfe\n", r"labels\.csv: line 3: not UTF-8"),
        (
            b"file,label\n0.png,1\n1.png,cat\n",
            r"labels\.csv: line 3: label 'cat' is not an integer",
        ),
        (b"file,label\n0.png,1\n0.png,2\n", r"labels\.csv: lines 2 and 3 both describe 0\.png"),
        (b"name,label\n0.png,1\n", r"labels\.csv: line 2: needs a `file` value"),
    ],
)
def test_a_bad_sidecar_is_refused_naming_its_file_and_line(tmp_path, sidecar, message):
    with pytest.raises(SpecError, match=message):
        difforge.plan(sidecar_plan(tmp_path, sidecar))


def test_sidecar_and_folder_disagreements_are_counted_and_logged(tmp_path, caplog):
    import logging

    text = b"file,label\n0.png,1\n0.png,1\ngone.png,2\nalso-gone.png,0\n"
    with caplog.at_level(logging.WARNING, logger="difforge"):
        difforge.plan(sidecar_plan(tmp_path, text))
    assert "labels.csv: 2 entries name no image in" in caplog.text
    assert "(first: also-gone.png, row 5)" in caplog.text
    assert "labels.csv: 2 image(s) of" in caplog.text and "(first: 1.png)" in caplog.text


def test_a_committed_input_of_the_wrong_type_is_refused_at_validation(tmp_path):
    from difforge.platform.outputs import write_dataset

    uri = str(tmp_path / "labels-as-words")
    write_dataset(uri, pa.table({"id": ["a", "b"], "label": ["cat", "dog"]}), "words")
    (p,) = spec_problems(
        tmp_path,
        f"""
        name: types
        storage: {tmp_path / "s"}
        steps:
          - id: noisy
            op: corrupt.labels
            inputs: ["{uri}"]
            params: {{corruption_ratio: 0.1, num_classes: 2}}
        """,
    )
    assert p.line == 6 and p.step == "noisy"
    assert "its column 'label' holds string values, where an integer (class index)" in p.message
