"""Committed Arrow datasets on any fsspec filesystem.

A dataset is a folder of Parquet shards plus `_manifest.json`, written last. The manifest is the
commit: it lists the files that belong to the dataset, and a folder without one does not exist.
Shards are written under an attempt folder, so two runs producing the same fingerprint at once
never mix their files; the manifest is created only if absent (an exclusive create locally, a
conditional put on S3), so exactly one of them commits.
"""

from __future__ import annotations

import base64
import io
import json
import os
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, Field

from difforge.platform.errors import DatasetNotCommitted, DifforgeError

if TYPE_CHECKING:
    import pyarrow as pa
    from fsspec import AbstractFileSystem

MANIFEST = "_manifest.json"
WORK = "_work"
FORMAT_VERSION = 1


def url_to_fs(uri: str) -> tuple[AbstractFileSystem, str]:
    """The fsspec filesystem and path for a URI. Credentials come from the environment."""
    import fsspec

    if "://" not in uri:
        uri = os.path.abspath(os.path.expanduser(uri))
    return fsspec.core.url_to_fs(uri)


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *(p.strip("/") for p in parts)])


def normalize_uri(uri: str) -> str:
    """Local paths become absolute; URIs with a protocol are kept as they are."""
    if "://" in uri:
        return uri.rstrip("/")
    return os.path.abspath(os.path.expanduser(uri))


class FileEntry(BaseModel):
    path: str  # relative to the dataset folder
    rows: int
    bytes: int


class Manifest(BaseModel):
    """What a committed dataset is. Written last; its presence is the commit."""

    format_version: int = FORMAT_VERSION
    fingerprint: str
    producer: dict[str, Any] = Field(default_factory=dict)  # pipeline, step, op, op_version
    created: float = Field(default_factory=time.time)
    difforge_version: str = ""
    num_rows: int = 0
    columns: list[dict[str, str]] = Field(default_factory=list)  # readable schema
    arrow_schema: str = ""  # base64 Arrow IPC schema, exact
    files: list[FileEntry] = Field(default_factory=list)
    metadata: dict[str, Any] = Field(default_factory=dict)

    def schema(self) -> pa.Schema:
        import pyarrow as pa

        if not self.arrow_schema:
            return pa.schema([])
        return pa.ipc.read_schema(pa.py_buffer(base64.b64decode(self.arrow_schema)))

    @property
    def column_names(self) -> list[str]:
        return [c["name"] for c in self.columns]


def encode_schema(schema: pa.Schema) -> str:
    return base64.b64encode(schema.serialize().to_pybytes()).decode()


def attempt_id() -> str:
    return f"attempt-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"


@dataclass
class ShardWriter:
    """Writes Parquet shards of one output into an attempt folder. Picklable: runs on workers."""

    dataset_uri: str
    attempt: str

    def write(self, table: pa.Table, name: str) -> dict[str, Any]:
        """Write one shard; return its file entry and schema for the commit."""
        import pyarrow.parquet as pq

        fs, root = url_to_fs(self.dataset_uri)
        rel = f"{self.attempt}/part-{name}.parquet"
        path = f"{root}/{rel}"
        fs.makedirs(f"{root}/{self.attempt}", exist_ok=True)
        sink = io.BytesIO()
        pq.write_table(table, sink, compression="zstd")
        data = sink.getvalue()
        fs.pipe_file(path, data)
        return {
            "path": rel,
            "rows": table.num_rows,
            "bytes": len(data),
            "schema": encode_schema(table.schema),
        }


def _create_exclusive(fs: AbstractFileSystem, path: str, data: bytes) -> bool:
    """Create `path` only if it does not exist. True if we created it."""
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if protocol in ("file", "local"):
        tmp = f"{path}.{uuid.uuid4().hex}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # atomic, fails if the target exists
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)
    if protocol in ("s3", "s3a"):
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


def _precondition_failed(exc: BaseException) -> bool:
    """An S3 412: the object already exists (s3fs turns it into an OSError)."""
    err: BaseException | None = exc
    while err is not None:
        code = getattr(err, "response", {}).get("Error", {}).get("Code")
        if code in ("PreconditionFailed", "412"):
            return True
        err = err.__cause__ or err.__context__
    return "pre-condition" in str(exc) or "PreconditionFailed" in str(exc)


def commit(
    dataset_uri: str,
    entries: Iterable[dict[str, Any]],
    fingerprint: str,
    producer: dict[str, Any],
    metadata: dict[str, Any] | None = None,
    schema: pa.Schema | None = None,
) -> tuple[Manifest, bool]:
    """Write the manifest of a dataset from its shards' entries.

    Returns (manifest, committed): committed is False when another run committed this same
    dataset first, in which case its manifest is returned and ours is discarded.
    """
    import pyarrow as pa

    from difforge import __version__

    entries = list(entries)
    seen: dict[str, dict[str, Any]] = {}
    for e in entries:
        if e["path"]:
            seen[e["path"]] = e  # a retried task writes the same shard again: keep one
    files = [seen[k] for k in sorted(seen)]
    schemas = {e["schema"] for e in files} or {e["schema"] for e in entries if e["schema"]}
    if len(schemas) > 1:
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
    manifest = Manifest(
        fingerprint=fingerprint,
        producer=producer,
        difforge_version=__version__,
        num_rows=sum(e["rows"] for e in files),
        columns=[{"name": f.name, "type": str(f.type)} for f in schema],
        arrow_schema=encode_schema(schema),
        files=[FileEntry(path=e["path"], rows=e["rows"], bytes=e["bytes"]) for e in files],
        metadata=metadata or {},
    )
    fs, root = url_to_fs(dataset_uri)
    fs.makedirs(root, exist_ok=True)
    data = manifest.model_dump_json(indent=2).encode()
    if _create_exclusive(fs, f"{root}/{MANIFEST}", data):
        return manifest, True
    return read_manifest(dataset_uri), False


def is_committed(dataset_uri: str) -> bool:
    fs, root = url_to_fs(dataset_uri)
    return fs.exists(f"{root}/{MANIFEST}")


def read_manifest(dataset_uri: str) -> Manifest:
    fs, root = url_to_fs(dataset_uri)
    try:
        raw = fs.cat_file(f"{root}/{MANIFEST}")
    except FileNotFoundError:
        raise DatasetNotCommitted(
            f"{dataset_uri}: no committed dataset here (no {MANIFEST}); a dataset exists only "
            "once its manifest is written"
        ) from None
    try:
        return Manifest.model_validate(json.loads(raw))
    except ValueError as exc:
        raise DifforgeError(f"{dataset_uri}/{MANIFEST}: not a valid manifest: {exc}") from None


def uncommit(dataset_uri: str) -> None:
    """Remove a manifest (used by --force): the dataset stops existing until recommitted."""
    fs, root = url_to_fs(dataset_uri)
    if fs.exists(f"{root}/{MANIFEST}"):
        fs.rm_file(f"{root}/{MANIFEST}")


def remove_work(work_uri: str) -> None:
    fs, path = url_to_fs(work_uri)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def remove_stale_attempts(dataset_uri: str, manifest: Manifest, started_before: float) -> None:
    """Delete attempt folders that the manifest does not use and that began before `started_before`."""
    fs, root = url_to_fs(dataset_uri)
    used = {f.path.split("/", 1)[0] for f in manifest.files}
    try:
        names = fs.ls(root, detail=False)
    except FileNotFoundError:
        return
    for path in names:
        name = path.rstrip("/").rsplit("/", 1)[-1]
        if not name.startswith("attempt-") or name in used:
            continue
        stamp = name.split("-")[1]
        try:
            t = time.mktime(time.strptime(stamp, "%Y%m%dT%H%M%S"))
        except ValueError:
            continue
        if t < started_before:
            fs.rm(path, recursive=True)


class Dataset:
    """A committed dataset: its manifest, and its rows as pyarrow or Ray Data."""

    def __init__(self, uri: str, manifest: Manifest | None = None):
        self.uri = normalize_uri(uri)
        self.manifest = manifest or read_manifest(self.uri)

    def __repr__(self) -> str:
        m = self.manifest
        return f"Dataset({self.uri!r}, rows={m.num_rows}, columns={m.column_names})"

    @property
    def num_rows(self) -> int:
        return self.manifest.num_rows

    @property
    def schema(self) -> pa.Schema:
        return self.manifest.schema()

    @property
    def metadata(self) -> dict[str, Any]:
        return self.manifest.metadata

    def file_uris(self) -> list[str]:
        return [join(self.uri, f.path) for f in self.manifest.files]

    def _paths(self) -> tuple[AbstractFileSystem, list[str]]:
        fs, root = url_to_fs(self.uri)
        return fs, [f"{root}/{f.path}" for f in self.manifest.files]

    def to_arrow(self, columns: list[str] | None = None) -> pa.Table:
        import pyarrow as pa
        import pyarrow.parquet as pq

        fs, paths = self._paths()
        tables = [pq.read_table(p, filesystem=fs, columns=columns) for p in paths]
        schema = self.schema
        if columns is not None:
            schema = pa.schema([schema.field(c) for c in columns])
        if not tables:
            return schema.empty_table()
        return pa.concat_tables(tables)

    def iter_batches(self, columns: list[str] | None = None, batch_size: int = 4096):
        import pyarrow.parquet as pq

        fs, paths = self._paths()
        for p in paths:
            with fs.open(p, "rb") as f:
                yield from pq.ParquetFile(f).iter_batches(batch_size=batch_size, columns=columns)

    def to_ray(self):
        """A Ray Data dataset over the committed shards (starts or joins Ray as needed)."""
        import ray.data
        from pyarrow.fs import FSSpecHandler, PyFileSystem

        fs, paths = self._paths()
        if not paths:
            return ray.data.from_arrow(self.schema.empty_table())
        return ray.data.read_parquet(paths, filesystem=PyFileSystem(FSSpecHandler(fs)))


def open_dataset(uri: str) -> Dataset:
    """A committed dataset at `uri` (a local folder or any fsspec URI). Refuses uncommitted ones."""
    return Dataset(uri)
