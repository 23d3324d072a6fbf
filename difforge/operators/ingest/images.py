"""`ingest.images`: a folder of image files (local or any fsspec URI), with labels or captions."""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from difforge.operators.ingest._listing import (
    VERIFY_FIELD,
    Verify,
    check_listed,
    list_files,
    stamp_of,
)
from difforge.platform import columns as C
from difforge.platform.datasets import url_to_fs
from difforge.platform.errors import DifforgeError
from difforge.platform.fingerprint import fingerprint
from difforge.platform.operator import Columns, SourceOperator
from difforge.platform.resources import Resources

if TYPE_CHECKING:
    import pyarrow as pa

log = logging.getLogger("difforge")

EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(description="folder of images: a local path or an fsspec URI (s3://...)")
    labels: Literal["none", "folders"] = Field(
        "none", description="folders: the first sub-folder's name is the class"
    )
    sidecar: str | None = Field(
        None,
        description="CSV or JSONL with a `file` column (relative path) and `label` and/or "
        "`caption` columns",
    )
    extensions: list[str] = Field(list(EXTENSIONS), description="file name endings to read")
    verify: Verify = VERIFY_FIELD


def parse_sidecar(uri: str, data: bytes) -> dict[str, dict[str, Any]]:
    """A sidecar's rows by file, each with its row number (`_row`, 1 = the first data row).
    Refused, naming the file and the row: bytes that are not UTF-8, no `file` column, a label
    that is not an integer class index, and one file listed twice with different values."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DifforgeError(f"{uri}: line {line}: not UTF-8 text ({exc.reason})") from None
    if uri.endswith((".jsonl", ".json")):
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append((n, json.loads(line)))
                except ValueError as exc:
                    raise DifforgeError(f"{uri}: line {n}: not a JSON object ({exc})") from None
    else:  # CSV: the header is line 1
        rows = [(n, r) for n, r in enumerate(csv.DictReader(io.StringIO(text)), 2)]
    out: dict[str, dict[str, Any]] = {}
    for n, row in rows:
        if not isinstance(row, dict) or not row.get("file"):
            raise DifforgeError(f"{uri}: line {n}: needs a `file` value (the image's path)")
        label = row.get("label")
        if label not in (None, ""):
            try:
                row["label"] = int(label)
            except (TypeError, ValueError):
                raise DifforgeError(
                    f"{uri}: line {n}: label {label!r} is not an integer class index"
                ) from None
        key = str(row["file"])
        earlier = out.get(key)
        if earlier is not None:
            a = {k: v for k, v in earlier.items() if k != "_row"}
            if a != row:
                raise DifforgeError(
                    f"{uri}: lines {earlier['_row']} and {n} both describe {key}, differently"
                )
        out[key] = {**row, "_row": n}
    return out


class Images(SourceOperator):
    """Image files from a folder; original bytes kept, labels from folders or a sidecar."""

    name = "ingest.images"
    version = 2  # 2: reads the plan's listing (labels too); `verify`; sidecars checked
    Params = Params
    resources = Resources(batch_size=1000)

    def columns(self) -> Columns:
        cols = {*C.IMAGE_COLUMNS, C.SOURCE}
        if self.params.labels == "folders" or self.params.sidecar:
            cols.add(C.LABEL)
        if self.params.sidecar:
            cols.add(C.CAPTION)
        return Columns(writes=cols)

    _listed: tuple[str, list[dict[str, Any]], list[dict[str, Any]] | None] | None = None

    def _listing(self) -> tuple[str, list[dict[str, Any]], list[dict[str, Any]] | None]:
        """(root, files, sidecar listing), taken once: the fingerprint and the read tasks agree
        on what there is to read (a folder changed later fails the read, naming the file)."""
        if self._listed is None:
            p = self.params
            root, files = list_files(p.path, tuple(e.lower() for e in p.extensions), p.verify)
            if not files:
                raise DifforgeError(f"{p.path}: no image files found")
            side = list_files(p.sidecar, verify=p.verify)[1] if p.sidecar else None
            if side:
                self._check_sidecar(files, side)
            self._listed = (root, files, side)
        return self._listed

    def source_fingerprint(self) -> str:
        root, files, side = self._listing()
        return fingerprint({"files": files, "sidecar": side})

    def _sidecar(self, listed: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
        if not self.params.sidecar or listed is None:
            return {}
        fs, path = url_to_fs(self.params.sidecar)
        try:
            raw: bytes | BaseException = fs.cat_file(path)
        except Exception as exc:  # noqa: BLE001 - judged by check_listed
            raw = exc
        checked = check_listed(self.params.sidecar, listed, raw, stamp_of(fs, path))
        return parse_sidecar(self.params.sidecar, checked)

    def _check_sidecar(self, files: list[dict[str, Any]], side: list[dict[str, Any]]) -> None:
        """At plan time: the sidecar parses, and what it and the folder disagree on is counted
        and logged (entries naming no listed image; images it does not mention)."""
        rows = self._sidecar(side[0])
        listed = {f["rel"] for f in files}
        missing = sorted(set(rows) - listed)
        if missing:
            log.warning(
                "%s: %d entr%s name no image in %s and are ignored (first: %s, row %d)",
                self.params.sidecar,
                len(missing),
                "y" if len(missing) == 1 else "ies",
                self.params.path,
                missing[0],
                rows[missing[0]]["_row"],
            )
        absent = sorted(listed - set(rows))
        if absent:
            what = "label and caption" if self.params.labels != "folders" else "caption"
            log.warning(
                "%s: %d image(s) of %s have no entry, so no %s (first: %s)",
                self.params.sidecar,
                len(absent),
                self.params.path,
                what,
                absent[0],
            )

    def classes(self, files: list[dict[str, Any]]) -> list[str]:
        return sorted({f["rel"].split("/", 1)[0] for f in files if "/" in f["rel"]})

    def read_tasks(self, rows_per_task: int) -> list[dict[str, Any]]:
        root, files, side = self._listing()
        classes = {c: i for i, c in enumerate(self.classes(files))}
        listed = []
        for f in files:
            entry = {k: f[k] for k in ("rel", "size", "stamp", "sha256") if k in f}
            if self.params.labels == "folders" and "/" in f["rel"]:
                entry["label"] = classes[f["rel"].split("/", 1)[0]]
            listed.append(entry)
        sidecar = side[0] if side else None
        return [
            {"files": listed[s : s + rows_per_task], "sidecar": sidecar}
            for s in range(0, len(listed), rows_per_task)
        ]

    def read(self, task: Mapping[str, Any]) -> Iterator[pa.Table]:
        import pyarrow as pa

        from difforge.platform.imaging import describe

        fs, root = url_to_fs(self.params.path)
        root = root.rstrip("/")
        sidecar = self._sidecar(task.get("sidecar"))
        rows: dict[str, list] = {
            k: []
            for k in (
                C.ID,
                C.IMAGE,
                C.FORMAT,
                C.WIDTH,
                C.HEIGHT,
                C.MODE,
                C.SOURCE,
                C.LABEL,
                C.CAPTION,
            )
        }
        paths = [f"{root}/{f['rel']}" for f in task["files"]]
        contents = fs.cat(paths, on_error="return")
        for listed, path in zip(task["files"], paths, strict=True):
            rel = listed["rel"]
            # vanished or changed since listed: the step fails, naming it; unreadable: kept
            # with empty bytes, and curation rejects it with a reason
            data = check_listed(
                fs.unstrip_protocol(path), listed, contents.get(path), stamp_of(fs, path)
            )
            fmt, w, h, mode = describe(data) if data else (None, None, None, None)
            extra = sidecar.get(rel, {})
            label = listed.get("label", extra.get("label"))
            rows[C.ID].append(rel)
            rows[C.IMAGE].append(data)
            rows[C.FORMAT].append(fmt)
            rows[C.WIDTH].append(w)
            rows[C.HEIGHT].append(h)
            rows[C.MODE].append(mode)
            rows[C.SOURCE].append(fs.unstrip_protocol(path))
            rows[C.LABEL].append(int(label) if label not in (None, "") else None)
            rows[C.CAPTION].append(extra.get("caption"))
        types = {
            C.WIDTH: pa.int32(),
            C.HEIGHT: pa.int32(),
            C.LABEL: pa.int64(),
            C.IMAGE: pa.binary(),
            C.CAPTION: pa.string(),
            C.FORMAT: pa.string(),
            C.MODE: pa.string(),
        }
        keep = set(self.columns().writes)
        yield pa.table(
            {k: pa.array(v, types.get(k, pa.string())) for k, v in rows.items() if k in keep}
        )

    def metadata(self, inputs: list[Any]) -> dict[str, Any]:
        if self.params.labels != "folders":
            return {"source": self.params.path}
        return {"source": self.params.path, "classes": self.classes(self._listing()[1])}
