"""Writing datasets: the one way data is written, by the engine, the shuffle helpers and jobs.

The protocol, for one output (a step's main dataset or a side output such as `rejects`):

1. `open_output(uri)` starts an *attempt*: a fresh folder `attempt-<time>-<random>/` inside
   the dataset's own folder. Every writer of this attempt (Ray tasks, actors, a job on the
   driver) writes its Parquet shards there, under names no other attempt uses, so committed
   files are never written over: a racing or retried run writes beside them, never on them.
2. `Output.write` returns a small *entry* per shard (path, rows, bytes, SHA-256, schema).
3. `Output.commit(entries, ...)` writes `_manifest.json` last and only if absent (an exclusive
   create locally, a conditional put on S3): exactly one attempt commits a dataset. The loser
   gets the winner's manifest and its own attempt folder is removed. The winner removes the
   attempt folders of runs that crashed before it started.
4. `Output.commit(..., replace=True)` (`--force`) swaps the manifest in one step (`os.replace`
   locally, a put conditional on the old object's ETag on S3): readers see the old commit or the
   new one, never none. The replaced commit's files stay until `gc` removes them.
5. `Output.abort()` removes what the attempt wrote.

A manifest may list shards of several attempts (a resumed pass keeps what an interrupted one
finished); every path stays inside the dataset's folder, and readers check each file's size
and checksum (`difforge.platform.datasets`).
"""

from __future__ import annotations

import base64
import calendar
import hashlib
import io
import os
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from difforge.platform.datasets import (
    MANIFEST,
    FileEntry,
    Manifest,
    encode_schema,
    join,
    missing_files,
    read_manifest,
    url_to_fs,
)
from difforge.platform.errors import DifforgeError
from difforge.platform.sizing import rows_per_shard

if TYPE_CHECKING:
    import pyarrow as pa
    from fsspec import AbstractFileSystem

MAIN = "main"
ATTEMPT_PREFIX = "attempt-"


def new_attempt() -> str:
    """A new attempt id: sortable by start time, unique across machines."""
    return f"{ATTEMPT_PREFIX}{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:8]}"


def attempt_started(name: str) -> float | None:
    """When an attempt began (from its id), or None for a name that is not an attempt's."""
    if not name.startswith(ATTEMPT_PREFIX):
        return None
    try:
        stamp = name[len(ATTEMPT_PREFIX) :].split("-", 1)[0]
        return float(calendar.timegm(time.strptime(stamp, "%Y%m%dT%H%M%S")))
    except ValueError:
        return None


def _protocol(fs: AbstractFileSystem) -> str:
    return fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]


def _is_local(fs: AbstractFileSystem) -> bool:
    return _protocol(fs) in ("file", "local")


@dataclass(frozen=True)
class Output:
    """One output of one attempt. Small and picklable: it travels to Ray workers."""

    uri: str  # the dataset's folder
    attempt: str

    def artifact(self, *parts: str) -> str:
        """A place for artifacts (a model folder) committed with this attempt's dataset."""
        return join(self.uri, self.attempt, "artifacts", *parts)

    def write(self, table: pa.Table, name: str) -> dict[str, Any]:
        """Write one Parquet shard named `name` (unique within the attempt); return its entry.

        A retried task writes the same name again, within its own attempt: the commit keeps one.
        """
        import pyarrow.parquet as pq

        if not name or "/" in name or name.startswith("."):
            raise DifforgeError(f"shard name {name!r}: must be a plain, non-empty file name")
        fs, root = url_to_fs(self.uri)
        rel = f"{self.attempt}/part-{name}.parquet"
        sink = io.BytesIO()
        pq.write_table(table, sink, compression="zstd")
        data = sink.getvalue()
        fs.makedirs(f"{root}/{self.attempt}", exist_ok=True)
        fs.pipe_file(f"{root}/{rel}", data)
        return {
            "path": rel,
            "rows": table.num_rows,
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "schema": encode_schema(table.schema),
        }

    @staticmethod
    def empty(schema: pa.Schema) -> dict[str, Any]:
        """The entry of a batch that produced no rows: no file, but its schema counts."""
        return {"path": "", "rows": 0, "bytes": 0, "sha256": "", "schema": encode_schema(schema)}

    def write_batch(self, table: pa.Table, name: str, spread: bool = False) -> list[dict[str, Any]]:
        """Write a table as shards of bounded size (`rows_per_shard`; `spread`: enough of them
        for every CPU) named `name`, or `name-0000`, `name-0001`, ... when cut; their entries.
        An empty table gets one entry without a file (its schema counts)."""
        if not table.num_rows:
            return [self.empty(table.schema)]
        per = rows_per_shard(table.num_rows, table.nbytes, spread)
        if per >= table.num_rows:
            return [self.write(table, name)]
        return [
            self.write(table.slice(s, per), f"{name}-{s // per:04d}")
            for s in range(0, table.num_rows, per)
        ]

    # -- ending an attempt ---------------------------------------------------------------
    def commit(
        self,
        entries: Iterable[Mapping[str, Any]],
        fingerprint: str,
        producer: dict[str, Any],
        metadata: dict[str, Any] | None = None,
        schema: pa.Schema | None = None,
        replace: bool = False,
        stale_before: float | None = None,
    ) -> tuple[Manifest, bool]:
        """Commit the dataset made of `entries` (manifest last). Returns (manifest, ours):
        `ours` is False when another attempt committed it first; its manifest is returned and
        this attempt's files are removed. `replace` swaps out an existing commit (`--force`).
        `stale_before`: attempt folders begun before then that no commit uses are removed."""
        manifest = build_manifest(self.attempt, entries, fingerprint, producer, metadata, schema)
        data = manifest.model_dump_json(indent=2).encode()
        fs, root = url_to_fs(self.uri)
        fs.makedirs(root, exist_ok=True)
        path = f"{root}/{MANIFEST}"
        keep: set[str] = set()
        self._check_files_exist(manifest)
        if replace:
            if fs.exists(path):  # the replaced commit's files stay until `gc`: a reader may
                keep = set(read_manifest(self.uri).attempts())  # be in the middle of them
            ours = _replace(fs, path, data)
        else:
            ours = create_exclusive(fs, path, data)
        if not ours:
            winner = read_manifest(self.uri)
            self.abort(keep=set(winner.attempts()))
            return winner, False
        if stale_before is not None:
            remove_unused_attempts(self.uri, manifest, older_than=stale_before, keep=keep)
        return manifest, True

    def abort(self, keep: set[str] = frozenset()) -> None:  # type: ignore[assignment]
        """Remove this attempt's folder (unless a committed manifest uses it)."""
        if self.attempt in keep:
            return
        fs, root = url_to_fs(self.uri)
        try:
            fs.rm(f"{root}/{self.attempt}", recursive=True)
        except FileNotFoundError:
            pass

    def _check_files_exist(self, manifest: Manifest) -> None:
        """Every file the manifest lists is there, with its size, as the committing process
        sees the storage: a shard written where this process cannot see it (a node's own
        disk), or removed while the step ran, fails the commit instead of being listed."""
        missing = missing_files(self.uri, manifest)
        if missing:
            raise DifforgeError(
                f"{self.uri}: {len(missing)} shard(s) this attempt wrote are not where its "
                f"commit looks (first: {missing[0]}); nothing was committed. Were they written "
                "to storage this process does not share, or cleaned while the step ran?"
            )


def open_output(uri: str, attempt: str | None = None) -> Output:
    """Start (or, given its id, continue) an attempt at writing the dataset at `uri`."""
    return Output(uri, attempt or new_attempt())


def build_manifest(
    attempt: str,
    entries: Iterable[Mapping[str, Any]],
    fingerprint: str,
    producer: dict[str, Any],
    metadata: dict[str, Any] | None = None,
    schema: pa.Schema | None = None,
) -> Manifest:
    import pyarrow as pa

    from difforge._version import __version__

    entries = list(entries)
    seen: dict[str, Mapping[str, Any]] = {}
    for e in entries:
        if e["path"]:
            seen[e["path"]] = e  # a retried task writes the same shard again: keep one
    files = [seen[k] for k in sorted(seen)]
    schemas = {e["schema"] for e in files} or {e["schema"] for e in entries if e["schema"]}
    if len(schemas) > 1 and schema is None:
        raise DifforgeError(
            f"{producer.get('step')}: operator '{producer.get('op')}' produced shards with "
            "different schemas; every batch must have the same columns and types"
        )
    if schema is None:
        schema = (
            pa.ipc.read_schema(pa.py_buffer(base64.b64decode(schemas.pop())))
            if schemas
            else pa.schema([])
        )
    return Manifest(
        fingerprint=fingerprint,
        producer=producer,
        difforge_version=__version__,
        num_rows=sum(e["rows"] for e in files),
        columns=[{"name": f.name, "type": str(f.type)} for f in schema],
        arrow_schema=encode_schema(schema),
        files=[
            FileEntry(path=e["path"], rows=e["rows"], bytes=e["bytes"], sha256=e.get("sha256", ""))
            for e in files
        ],
        metadata=metadata or {},
        attempt=attempt,
    )


def create_exclusive(fs: AbstractFileSystem, path: str, data: bytes) -> bool:
    """Create `path` only if it does not exist. True if we created it."""
    if _is_local(fs):
        tmp = f"{path}.{uuid.uuid4().hex}.tmp"
        _write_synced(tmp, data)
        try:
            os.link(tmp, path)  # atomic, fails if the target exists
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)
    if _protocol(fs) in ("s3", "s3a"):
        # S3 has no rename: a conditional put (If-None-Match: *) is the commit.
        try:
            fs.pipe_file(path, data, mode="create")
            return True
        except FileExistsError:
            return False
        except OSError as exc:
            if _precondition_failed(exc):
                return False
            raise
    if fs.exists(path):
        return False
    fs.pipe_file(path, data)
    return True


def _replace(fs: AbstractFileSystem, path: str, data: bytes) -> bool:
    """Swap the object at `path` for `data` in one step. False if another writer replaced it
    between our look and our put (S3), in which case theirs stands."""
    if _is_local(fs):
        tmp = f"{path}.{uuid.uuid4().hex}.tmp"
        _write_synced(tmp, data)
        os.replace(tmp, path)  # atomic: readers see the old manifest or the new one
        return True
    if _protocol(fs) in ("s3", "s3a"):
        try:
            etag = fs.info(path).get("ETag")
        except FileNotFoundError:
            return create_exclusive(fs, path, data)
        bucket, key, _ = fs.split_path(path)
        try:
            fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, IfMatch=etag)
        except OSError as exc:
            if _precondition_failed(exc):
                return False
            raise
        fs.invalidate_cache(path)
        return True
    fs.pipe_file(path, data)
    return True


def _write_synced(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _precondition_failed(exc: BaseException) -> bool:
    """An S3 412: the object exists (or changed); s3fs turns it into an OSError."""
    err: BaseException | None = exc
    while err is not None:
        code = getattr(err, "response", {}).get("Error", {}).get("Code")
        if code in ("PreconditionFailed", "412"):
            return True
        err = err.__cause__ or err.__context__
    return "pre-condition" in str(exc) or "PreconditionFailed" in str(exc)


def attempt_folders(uri: str) -> dict[str, str]:
    """The attempt folders in a dataset's folder: name -> full path."""
    fs, root = url_to_fs(uri)
    try:
        names = fs.ls(root, detail=False)
    except FileNotFoundError:
        return {}
    out = {}
    for path in names:
        name = path.rstrip("/").rsplit("/", 1)[-1]
        if name.startswith(ATTEMPT_PREFIX):
            out[name] = path
    return out


def remove_unused_attempts(
    uri: str, manifest: Manifest | None, older_than: float, keep: set[str] = frozenset()
) -> list[str]:
    """Remove attempt folders that the committed manifest (if any) does not use, that `keep`
    does not name, and that began before `older_than` (a Unix time). Returns the names removed."""
    fs, _ = url_to_fs(uri)
    used = (set(manifest.attempts()) if manifest is not None else set()) | set(keep)
    removed = []
    for name, path in attempt_folders(uri).items():
        started = attempt_started(name)
        if name in used or started is None or started >= older_than:
            continue
        try:
            fs.rm(path, recursive=True)
        except FileNotFoundError:
            continue
        removed.append(name)
    return removed


def write_dataset(
    uri: str,
    table: pa.Table,
    fingerprint: str,
    producer: dict[str, Any] | None = None,
    metadata: dict[str, Any] | None = None,
    shard_rows: int | None = None,
) -> Manifest:
    """Commit a table as a dataset in one call (a cache, a test's input, a benchmark's data),
    in shards of `shard_rows` rows (default: bounded as every writer's). Returns the committed
    manifest: another writer's, if it committed this dataset first."""
    out = open_output(uri)
    if shard_rows is None:
        entries = out.write_batch(table, "000000")
    else:
        entries = [
            e
            for s in range(0, max(1, table.num_rows), shard_rows)
            for e in out.write_batch(table.slice(s, shard_rows), f"{s // shard_rows:06d}")
        ]
    return out.commit(entries, fingerprint, producer or {}, metadata, schema=table.schema)[0]
