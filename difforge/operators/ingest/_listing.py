"""Listing source files on any fsspec filesystem, with what identifies their content."""

from __future__ import annotations

from typing import Any, ClassVar

from difforge.platform.datasets import url_to_fs
from difforge.platform.errors import DifforgeError
from difforge.platform.fingerprint import fingerprint
from difforge.platform.operator import SourceOperator


def list_files(
    uri: str, extensions: tuple[str, ...] | None = None
) -> tuple[str, list[dict[str, Any]]]:
    """(root path, [{rel, size, stamp}]) sorted by rel; stamp is the ETag or modification time."""
    fs, root = url_to_fs(uri)
    if not fs.exists(root):
        raise DifforgeError(f"{uri}: no such file or folder")
    if fs.isfile(root):
        info = fs.info(root)
        parent, name = root.rsplit("/", 1) if "/" in root else ("", root)
        return parent, [{"rel": name, "size": info.get("size"), "stamp": _stamp(info)}]
    found = fs.find(root, detail=True)
    files = []
    for path, info in found.items():
        rel = path[len(root.rstrip("/")) + 1 :]
        name = rel.rsplit("/", 1)[-1]
        if name.startswith((".", "_")):
            continue
        if extensions and not name.lower().endswith(extensions):
            continue
        files.append({"rel": rel, "size": info.get("size"), "stamp": _stamp(info)})
    files.sort(key=lambda f: f["rel"])
    return root, files


def _stamp(info: dict[str, Any]) -> str:
    for key in ("ETag", "etag", "mtime", "LastModified", "last_modified", "created"):
        if info.get(key) is not None:
            return str(info[key])
    return ""


class PerFileSource(SourceOperator):
    """A source that reads `params.path` (a file or a folder of them) one file per read task,
    fingerprinted by the listing (sizes and modification times, or ETags)."""

    extensions: ClassVar[tuple[str, ...]] = ()

    def _listing(self) -> tuple[str, list[dict[str, Any]]]:
        root, files = list_files(self.params.path, self.extensions)
        if not files:
            raise DifforgeError(f"{self.params.path}: no {'/'.join(self.extensions)} files found")
        return root, files

    def source_fingerprint(self) -> str:
        return fingerprint({"files": self._listing()[1]})

    def read_tasks(self, rows_per_task: int) -> list[dict[str, Any]]:
        root, files = self._listing()
        return [{"root": root, "rel": f["rel"]} for f in files]
