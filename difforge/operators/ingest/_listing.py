"""Listing source files on any fsspec filesystem, and reading exactly what was listed.

A file source lists its files once, when the run is planned: that listing is its fingerprint
and the only thing its read tasks read. A file that vanished or changed between the listing and
its read fails the step with its name, so nothing is committed under a fingerprint that does not
describe what was read (a rerun lists again and reads the folder as it is then).

What a listing detects (`verify`):
- `size+mtime` (the default): a file added, removed or renamed, or rewritten with another size
  or modification time (ETag on S3): the read compares both with the listing's.
- `content`: also any change of bytes; every file is read and hashed (SHA-256) when the run is
  planned, and again when it is read.
"""

from __future__ import annotations

import hashlib
from typing import Any, ClassVar, Literal

from pydantic import Field

from difforge.platform.datasets import url_to_fs
from difforge.platform.errors import DifforgeError
from difforge.platform.fingerprint import fingerprint
from difforge.platform.operator import SourceOperator

Verify = Literal["size+mtime", "content"]

VERIFY_FIELD = Field(
    "size+mtime",
    description="what the listing that fingerprints the files records: size+mtime (sizes and "
    "modification times, or ETags), or content (SHA-256 of every file: slower, exact)",
)


def list_files(
    uri: str, extensions: tuple[str, ...] | None = None, verify: Verify = "size+mtime"
) -> tuple[str, list[dict[str, Any]]]:
    """(root path, [{rel, size, stamp[, sha256]}]) sorted by rel; stamp is the ETag or
    modification time."""
    fs, root = url_to_fs(uri)
    if not fs.exists(root):
        raise DifforgeError(f"{uri}: no such file or folder")
    if fs.isfile(root):
        info = fs.info(root)
        parent, name = root.rsplit("/", 1) if "/" in root else ("", root)
        files = [{"rel": name, "size": info.get("size"), "stamp": _stamp(info)}]
    else:
        files = []
        for path, info in fs.find(root, detail=True).items():
            rel = path[len(root.rstrip("/")) + 1 :]
            name = rel.rsplit("/", 1)[-1]
            if name.startswith((".", "_")):
                continue
            if extensions and not name.lower().endswith(extensions):
                continue
            files.append({"rel": rel, "size": info.get("size"), "stamp": _stamp(info)})
        files.sort(key=lambda f: f["rel"])
        parent = root.rstrip("/")
    if verify == "content":
        paths = [f"{parent}/{f['rel']}" if parent else f["rel"] for f in files]
        for f, path in zip(files, paths, strict=True):
            f["sha256"] = hashlib.sha256(fs.cat_file(path)).hexdigest()
    return parent, files


def _stamp(info: dict[str, Any]) -> str:
    for key in ("ETag", "etag", "mtime", "LastModified", "last_modified", "created"):
        if info.get(key) is not None:
            return str(info[key])
    return ""


def _gone(uri: str) -> DifforgeError:
    return DifforgeError(
        f"{uri}: listed when the run was planned, gone when read; nothing was committed: "
        "run again to read the folder as it is now"
    )


def _changed(uri: str, listed: str, found: str) -> DifforgeError:
    return DifforgeError(
        f"{uri}: changed between the run's listing and its read ({listed} listed, {found} "
        "found); nothing was committed: run again to read it as it is now"
    )


def stamp_of(fs: Any, path: str) -> str | BaseException:
    """A file's modification time (ETag on S3) now, or the error asking for it."""
    try:
        return _stamp(fs.info(path))
    except Exception as exc:  # noqa: BLE001 - judged by check_listed
        return exc


def check_listed(
    uri: str,
    listed: dict[str, Any],
    data: bytes | BaseException | None,
    stamp: str | BaseException | None = None,
) -> bytes:
    """The bytes read for a listed file, refused if the file vanished or changed since the run
    listed it: its size, its modification time or ETag (`stamp`, taken after the read, against
    the listing's), its SHA-256 where the listing has one. Other read errors (permissions, a
    broken file) give empty bytes: curation then rejects the row with a reason."""
    if isinstance(data, FileNotFoundError) or data is None or isinstance(stamp, FileNotFoundError):
        raise _gone(uri)
    if isinstance(data, BaseException):
        return b""
    if len(data) != listed["size"]:
        raise _changed(uri, f"{listed['size']} bytes", f"{len(data)}")
    if isinstance(stamp, str) and listed.get("stamp") and stamp != listed["stamp"]:
        raise _changed(uri, f"modified {listed['stamp']}", f"modified {stamp}")
    if listed.get("sha256") and hashlib.sha256(data).hexdigest() != listed["sha256"]:
        raise _changed(uri, "its SHA-256", "other bytes")
    return data


def check_size(fs: Any, path: str, listed: dict[str, Any]) -> None:
    """Refuse a listed file, about to be streamed, that vanished or changed size or
    modification time since."""
    uri = fs.unstrip_protocol(path)
    try:
        info = fs.info(path)
    except FileNotFoundError:
        raise _gone(uri) from None
    if info["size"] != listed["size"]:
        raise _changed(uri, f"{listed['size']} bytes", f"{info['size']}")
    if listed.get("stamp") and _stamp(info) != listed["stamp"]:
        raise _changed(uri, f"modified {listed['stamp']}", f"modified {_stamp(info)}")


class PerFileSource(SourceOperator):
    """A source that reads `params.path` (a file or a folder of them) one file per read task,
    fingerprinted by its listing, taken once when the run is planned."""

    extensions: ClassVar[tuple[str, ...]] = ()
    _listed: tuple[str, list[dict[str, Any]]] | None = None

    def _listing(self) -> tuple[str, list[dict[str, Any]]]:
        if self._listed is None:  # once per plan: the fingerprint and the read tasks agree
            verify = getattr(self.params, "verify", "size+mtime")
            root, files = list_files(self.params.path, self.extensions, verify)
            if not files:
                what = "/".join(self.extensions)
                raise DifforgeError(f"{self.params.path}: no {what} files found")
            self._listed = (root, files)
        return self._listed

    def source_fingerprint(self) -> str:
        return fingerprint({"files": self._listing()[1]})

    def read_tasks(self, rows_per_task: int) -> list[dict[str, Any]]:
        root, files = self._listing()
        return [{"root": root, **f} for f in files]

    def read_listed(self, task: dict[str, Any]) -> tuple[str, bytes]:
        """A task's file (its URI, its bytes), checked against the listing."""
        fs, _ = url_to_fs(self.params.path)
        path = f"{task['root']}/{task['rel']}" if task["root"] else task["rel"]
        try:
            data: bytes | BaseException = fs.cat_file(path)
        except Exception as exc:  # noqa: BLE001 - judged by check_listed
            data = exc
        uri = fs.unstrip_protocol(path)
        return uri, check_listed(uri, task, data, stamp_of(fs, path))
