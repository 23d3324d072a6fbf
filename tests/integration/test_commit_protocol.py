"""The commit protocol under an adversarial user: committed files are immutable and live in the
dataset's own folder, a forced step that fails leaves the old commit visible, losing runs leave
nothing behind, and a source that changes while a run reads it never poisons the cache.

"A run planned before another committed" is made deterministic by running the other pipeline
between planning and executing (the plan still says "not cached", as a racing run's would)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet
import pytest
from PIL import Image
from pydantic import BaseModel, ConfigDict
from ray import cloudpickle

import difforge
from difforge.platform import executor, registry
from difforge.platform.errors import DifforgeError
from difforge.platform.operator import MapOperator


class FailIfParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    flag: str  # fails while this file exists (its existence is not part of the fingerprint)
    tag: int = 0  # a param that changes the fingerprint and nothing else


class FailIf(MapOperator):
    """Passes rows through; raises while a flag file exists (a full disk, a Ctrl-C ...)."""

    name = "test.fail_if"
    Params = FailIfParams

    def process(self, batch: pa.Table) -> pa.Table:
        if os.path.exists(self.params.flag):
            raise OSError(28, "No space left on device")
        return batch


@pytest.fixture
def fail_if():
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    registry.register(FailIf)
    yield
    registry.unregister("test.fail_if")


def digits_spec(storage: Path, flag: Path, tag: int = 0) -> dict:
    """ingest.digits and test.fail_if share a pass (both plain, neither cached)."""
    return {
        "name": "commits",
        "storage": str(storage),
        "tracking": {"experiment": "commit-tests"},
        "steps": [
            {"id": "raw", "op": "ingest.digits", "resources": {"batch_size": 500}},
            {
                "id": "check",
                "op": "test.fail_if",
                "inputs": ["raw"],
                "params": {"flag": str(flag), "tag": tag},
                "resources": {"batch_size": 250},
            },
        ],
    }


def committed_files(uri: str) -> dict[str, tuple[int, int, bytes]]:
    """Each file of a committed dataset: (inode, mtime_ns, bytes)."""
    ds = difforge.open_dataset(uri)
    out = {}
    for f in ds.manifest.files:
        path = Path(uri) / f.path
        st = path.stat()
        out[f.path] = (st.st_ino, st.st_mtime_ns, path.read_bytes())
    return out


@pytest.fixture
def planned_before(monkeypatch):
    """`planned_before(other)`: the next run plans, then `other()` runs to the end, then the
    planned run executes: what a run racing `other` sees."""

    def install(other):
        real = executor.build_plan

        def plan_then_other(*args, **kwargs):
            plan = real(*args, **kwargs)
            monkeypatch.setattr(executor, "build_plan", real)
            other()
            return plan

        monkeypatch.setattr(executor, "build_plan", plan_then_other)

    return install


def test_a_racing_run_never_rewrites_committed_files(
    ray_session, tmp_path, fail_if, planned_before
):
    flag = tmp_path / "flag"
    winner = {}

    def other():
        winner["summary"] = difforge.run(digits_spec(tmp_path / "s", flag, tag=1))
        winner["files"] = committed_files(winner["summary"].step("raw").uri)

    planned_before(other)
    loser = difforge.run(digits_spec(tmp_path / "s", flag, tag=2))
    raw = loser.step("raw").uri
    assert raw == winner["summary"].step("raw").uri  # the same dataset, committed once
    assert committed_files(raw) == winner["files"]  # same inodes, times and bytes
    assert difforge.open_dataset(loser.step("check").uri).num_rows == 1797


def test_committed_data_lives_outside_the_work_folder(ray_session, tmp_path, fail_if):
    summary = difforge.run(digits_spec(tmp_path / "s", tmp_path / "flag"))
    for step in ("raw", "check"):
        uri = summary.step(step).uri
        paths = [f.path for f in difforge.open_dataset(uri).manifest.files]
        assert paths and not any(p.startswith("_work") for p in paths), paths
        shutil.rmtree(Path(uri) / "_work", ignore_errors=True)  # a user cleaning work folders
        assert difforge.open_dataset(uri).to_arrow().num_rows == 1797


def test_a_commit_with_files_missing_is_no_cache_hit_and_is_recomputed(
    ray_session, tmp_path, fail_if
):
    """A dataset whose manifest lists a file that is gone (a node's disk, a hand-cleaned
    folder) is not cached: the plan says so, the rerun recomputes it and replaces its commit;
    what is whole stays cached."""
    spec = digits_spec(tmp_path / "s", tmp_path / "flag")
    first = difforge.run(spec)
    uri = first.step("check").uri
    shard = difforge.open_dataset(uri).manifest.files[0]
    (Path(uri) / shard.path).unlink()
    plan = difforge.plan(spec)
    assert not plan.step("check").cached and plan.step("raw").cached
    again = difforge.run(spec)
    assert again.step("raw").cached and not again.step("check").cached
    assert again.step("check").uri == uri  # the same fingerprint, its commit replaced
    assert difforge.open_dataset(uri).to_arrow().num_rows == 1797
    assert all(s.cached for s in difforge.run(spec).steps)


def test_a_forced_step_that_fails_leaves_the_old_commit_visible(ray_session, tmp_path, fail_if):
    flag = tmp_path / "flag"
    first = difforge.run(digits_spec(tmp_path / "s", flag))
    before = difforge.open_dataset(first.step("check").uri).to_arrow()
    flag.write_text("fail now")
    with pytest.raises(DifforgeError, match="No space left on device"):
        difforge.run(digits_spec(tmp_path / "s", flag), force=["check"])
    after = difforge.open_dataset(first.step("check").uri).to_arrow()  # still committed
    assert after.equals(before)
    flag.unlink()
    forced = difforge.run(digits_spec(tmp_path / "s", flag), force=["check"])
    assert not forced.step("check").cached
    assert (
        difforge.open_dataset(forced.step("check").uri)
        .to_arrow()
        .sort_by("id")
        .equals(before.sort_by("id"))
    )


def test_a_losing_run_leaves_no_attempt_folder_behind(
    ray_session, tmp_path, fail_if, planned_before
):
    flag = tmp_path / "flag"
    planned_before(lambda: difforge.run(digits_spec(tmp_path / "s", flag, tag=1), fuse=False))
    difforge.run(digits_spec(tmp_path / "s", flag, tag=2), fuse=False)
    (raw,) = (tmp_path / "s" / "commits" / "raw").iterdir()
    used = {f.path.split("/", 1)[0] for f in difforge.open_dataset(str(raw)).manifest.files}
    attempts = {p.name for p in raw.iterdir() if p.name.startswith("attempt-")}
    assert attempts == used


def folder_of_classes(root: Path, n: int = 12) -> None:
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog", "emu"):
        (root / cls).mkdir(parents=True)
        for i in range(n):
            img = rng.integers(0, 255, (8, 8, 3), np.uint8)
            Image.fromarray(img).save(root / cls / f"{cls}{i:02d}.png")


def classes_spec(storage: Path, folder: Path) -> dict:
    return {
        "name": "changing",
        "storage": str(storage),
        "tracking": {"experiment": "commit-tests"},
        "steps": [
            {
                "id": "raw",
                "op": "ingest.images",
                "params": {"path": str(folder), "labels": "folders"},
                "resources": {"batch_size": 10},
            },
            {"id": "clean", "op": "curate.validate", "inputs": ["raw"]},
            {"id": "images", "op": "image.resize", "inputs": ["clean"], "params": {"size": 8}},
        ],
    }


def test_a_source_changed_after_listing_never_commits_what_its_fingerprint_denies(
    ray_session, tmp_path, planned_before
):
    folder = tmp_path / "animals"
    folder_of_classes(folder)
    moved = tmp_path / "dog05.png"

    def change():  # after the plan listed the folder, before any read
        (folder / "aardvark").mkdir()
        for i in range(3):
            shutil.copy(folder / "cat" / "cat00.png", folder / "aardvark" / f"a{i}.png")
        shutil.move(folder / "dog" / "dog05.png", moved)

    planned_before(change)
    try:
        summary = difforge.run(classes_spec(tmp_path / "s", folder))
    except DifforgeError as exc:
        assert "dog05.png" in str(exc)  # the vanished file, by name
    else:  # or committed what the listing named, the vanished file among the rejects
        raw = difforge.open_dataset(summary.step("raw").uri)
        assert raw.metadata["classes"] == ["cat", "dog", "emu"]
        table = raw.to_arrow()
        assert not any(i.startswith("aardvark/") for i in table.column("id").to_pylist())
        rejects = difforge.open_dataset(summary.step("clean").uri + "/rejects").to_arrow()
        assert "dog/dog05.png" in rejects.column("id").to_pylist()
    # the folder restored: whatever was committed under its fingerprint is right
    shutil.rmtree(folder / "aardvark")
    shutil.move(moved, folder / "dog" / "dog05.png")
    again = difforge.run(classes_spec(tmp_path / "s", folder))
    table = difforge.open_dataset(again.step("images").uri).to_arrow()
    labels = dict(
        zip(table.column("id").to_pylist(), table.column("label").to_pylist(), strict=True)
    )
    assert len(labels) == 36
    assert {labels["cat/cat00.png"], labels["dog/dog05.png"], labels["emu/emu00.png"]} == {0, 1, 2}
    assert labels["dog/dog05.png"] == 1


@pytest.mark.parametrize(
    "op, params",
    [("curate.dedup_exact", {}), ("corrupt.captions", {"corruption_ratio": 0.5, "buckets": 2})],
)
def test_a_shuffle_job_hit_by_a_bad_shard_fails_cleanly_and_reruns(
    ray_session, tmp_path, op, params
):
    """Bit rot in one committed input shard, met inside the job's shuffle: the step fails
    naming the shard, commits nothing, leaves no attempt behind; mended, it runs."""
    folder = tmp_path / "in"
    folder.mkdir()
    for k in range(3):
        ids = [f"f{k}-{i}" for i in range(20)]
        table = pa.table(
            {
                "id": ids,
                "image": [bytes([i % 4]) * 8 for i in range(20)],
                "caption": [f"caption {i}" for i in ids],
            }
        )
        pa.parquet.write_table(table, folder / f"{k}.parquet")
    spec = {
        "name": "shuffle",
        "storage": str(tmp_path / "s"),
        "steps": [
            {"id": "raw", "op": "ingest.parquet", "params": {"path": str(folder)}},
            {"id": "job", "op": op, "inputs": ["raw"], "params": params},
        ],
    }
    raw = difforge.run(spec, until="raw").step("raw").uri
    shard = Path(raw) / difforge.open_dataset(raw).manifest.files[1].path
    good = shard.read_bytes()
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 0xFF
    shard.write_bytes(bytes(bad))
    with pytest.raises(DifforgeError) as err:
        difforge.run(spec)
    assert f"step 'job' ({op}) failed" in str(err.value)
    assert f"{shard.name}: its checksum differs" in str(err.value)
    job = tmp_path / "s" / "shuffle" / "job"
    assert not list(job.glob("*/**/_manifest.json")) and not list(job.glob("*/**/attempt-*"))
    shard.write_bytes(good)
    done = difforge.run(spec)
    expected = 4 if op == "curate.dedup_exact" else 60  # 4 distinct images in all
    assert done.step("job").rows_out == expected
