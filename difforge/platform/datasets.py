"""Committed Arrow datasets on any fsspec filesystem.

A dataset is a folder of Parquet shards plus `_manifest.json`, written last. The manifest is the
commit: it lists the files that belong to the dataset, and a folder without one does not exist.
Writing follows the protocol of `difforge.platform.outputs`. Reading checks what the manifest
promises: every file path stays inside the dataset's folder, and every shard has the size and
SHA-256 its manifest recorded.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, Field, field_validator

from difforge.platform import columns as C
from difforge.platform.errors import DatasetNotCommitted, DifforgeError

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from fsspec import AbstractFileSystem

MANIFEST = "_manifest.json"
WORK = "_work"
FORMAT_VERSION = 2


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
    path: str  # relative to the dataset folder, never outside it
    rows: int
    bytes: int
    sha256: str = ""  # empty in manifests of format 1

    @field_validator("path")
    @classmethod
    def _inside(cls, path: str) -> str:
        return _check_inside(path)


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
    attempt: str = ""  # the attempt that committed it (its folder holds any artifacts)

    def attempts(self) -> list[str]:
        """The attempt folders this dataset uses (a resumed pass uses several)."""
        used = {f.path.split("/", 1)[0] for f in self.files if "/" in f.path}
        return sorted(used | ({self.attempt} if self.attempt else set()))

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


def is_committed(dataset_uri: str) -> bool:
    fs, root = url_to_fs(dataset_uri)
    return fs.exists(f"{root}/{MANIFEST}")


def read_manifest(dataset_uri: str) -> Manifest:
    fs, root = url_to_fs(dataset_uri)
    try:
        raw = fs.cat_file(f"{root}/{MANIFEST}")
    except (FileNotFoundError, NotADirectoryError):
        raise DatasetNotCommitted(
            f"{dataset_uri}: no committed dataset here (no {MANIFEST}); a dataset exists only "
            "once its manifest is written"
        ) from None
    except Exception as exc:
        denied(dataset_uri, exc)
        raise
    try:
        return Manifest.model_validate(json.loads(raw))
    except ValueError as exc:
        raise DifforgeError(f"{dataset_uri}/{MANIFEST}: not a valid manifest: {exc}") from None


def denied(uri: str, exc: BaseException) -> None:
    """Raise a short DifforgeError where `exc` is an object store refusing this process's keys,
    or finding none: the storage, the endpoint, and what to set (never in the YAML)."""
    if not uri.startswith(("s3://", "s3a://")):
        return
    endpoint = (
        os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS S3"
    )
    name, text = type(exc).__name__, str(exc)
    keys = "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in the environment (or AWS_PROFILE)"
    if name in ("NoCredentialsError", "PartialCredentialsError") or "locate credentials" in text:
        raise DifforgeError(
            f"storage {uri}: no S3 keys for {endpoint}: set {keys}; never in the YAML"
        ) from None
    refused = ("Forbidden", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch")
    if isinstance(exc, PermissionError) or any(word in text for word in refused):
        why = text.strip().splitlines()[0] if text.strip() else name
        raise DifforgeError(
            f"storage {uri}: the S3 server at {endpoint} refused this process's keys ({why}): "
            f"check {keys}"
        ) from None


def missing_files(dataset_uri: str, manifest: Manifest) -> list[str]:
    """The files `manifest` lists that are absent from `dataset_uri`, or of another size, as
    this process sees the storage: one listing, no file read ("path (N bytes listed, M found)")."""
    fs, root = url_to_fs(dataset_uri)
    root = root.rstrip("/")
    try:
        found = {p[len(root) + 1 :]: i.get("size") for p, i in fs.find(root, detail=True).items()}
    except FileNotFoundError:
        found = {}
    out = []
    for f in manifest.files:
        size = found.get(f.path)
        if size is None:
            out.append(f"{f.path} (absent)")
        elif f.bytes and size != f.bytes:
            out.append(f"{f.path} ({f.bytes} bytes listed, {size} found)")
    return out


def remove_work(work_uri: str) -> None:
    fs, path = url_to_fs(work_uri)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def _check_inside(path: str) -> str:
    """A manifest's file path, refused if it could leave the dataset's folder."""
    parts = path.replace("\\", "/").split("/")
    if (
        not path
        or path.startswith("/")
        or "://" in path
        or any(p in ("", ".", "..") for p in parts)
    ):
        raise ValueError(f"file path {path!r} leaves the dataset's folder (or is not plain)")
    return path


def read_shard(uri: str, size: int | None = None, sha256: str = "") -> pa.BufferReader:
    """A shard's bytes, checked against the size and SHA-256 its manifest recorded."""
    import pyarrow as pa

    fs, path = url_to_fs(uri)
    try:
        data = fs.cat_file(path)
    except FileNotFoundError:
        raise DifforgeError(f"{uri}: a file of a committed dataset is missing") from None
    if size is not None and len(data) != size:
        raise DifforgeError(
            f"{uri}: {len(data)} bytes, its manifest says {size}: changed after its commit"
        )
    if sha256 and hashlib.sha256(data).hexdigest() != sha256:
        raise DifforgeError(f"{uri}: its checksum differs from its manifest's: corrupted")
    return pa.BufferReader(data)


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

    def shards(self) -> list[dict[str, Any]]:
        """Each shard's URI with what its manifest says of it (for `read_shard`)."""
        return [
            {"file": join(self.uri, f.path), "bytes": f.bytes, "sha256": f.sha256, "rows": f.rows}
            for f in self.manifest.files
        ]

    def _files(self) -> Iterator[pq.ParquetFile]:
        import pyarrow.parquet as pq

        for s in self.shards():
            yield pq.ParquetFile(read_shard(s["file"], s["bytes"], s["sha256"]))

    def to_arrow(self, columns: list[str] | None = None) -> pa.Table:
        import pyarrow as pa

        tables = [f.read(columns=columns) for f in self._files()]
        schema = self.schema
        if columns is not None:
            schema = pa.schema([schema.field(c) for c in columns])
        if not tables:
            return schema.empty_table()
        return pa.concat_tables(tables)

    def iter_batches(self, columns: list[str] | None = None, batch_size: int = 4096):
        for f in self._files():
            yield from f.iter_batches(batch_size=batch_size, columns=columns)

    def rows_with_ids(self, ids: set[str], columns: list[str]) -> pa.Table:
        """Only the rows whose `id` is in `ids` (what a grid shows), never the whole dataset:
        each shard's ids are read first, its other columns only where it holds a wanted row."""
        import pyarrow as pa
        import pyarrow.compute as pc

        wanted = pa.array(sorted(ids), pa.string())
        cols = [C.ID, *[c for c in columns if c != C.ID]]
        found = []
        for f in self._files():
            mask = pc.is_in(f.read(columns=[C.ID]).column(0), value_set=wanted)
            if pc.any(mask).as_py():
                found.append(f.read(columns=cols).filter(mask))
        return pa.concat_tables(found) if found else self.schema.empty_table().select(cols)

    def to_ray(self):
        """A Ray Data dataset over the committed shards (starts or joins Ray as needed). Ray
        Data reads the files itself: sizes and checksums are not checked on this path."""
        import ray.data
        from pyarrow.fs import FSSpecHandler, PyFileSystem

        fs, root = url_to_fs(self.uri)
        paths = [f"{root}/{f.path}" for f in self.manifest.files]
        if not paths:
            return ray.data.from_arrow(self.schema.empty_table())
        return ray.data.read_parquet(paths, filesystem=PyFileSystem(FSSpecHandler(fs)))


def open_dataset(uri: str) -> Dataset:
    """A committed dataset at `uri` (a local folder or any fsspec URI). Refuses uncommitted ones."""
    return Dataset(uri)
