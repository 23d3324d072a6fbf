"""`ingest.images`: a folder of image files (local or any fsspec URI), with labels or captions."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from difforge.operators.ingest._listing import list_files
from difforge.platform import columns as C
from difforge.platform.datasets import url_to_fs
from difforge.platform.errors import DifforgeError
from difforge.platform.fingerprint import fingerprint
from difforge.platform.operator import SourceOperator
from difforge.platform.spec import Resources

if TYPE_CHECKING:
    import pyarrow as pa

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


class Images(SourceOperator):
    """Image files from a folder; original bytes kept, labels from folders or a sidecar."""

    name = "ingest.images"
    version = 1
    Params = Params
    resources = Resources(batch_size=1000)
    writes = (*C.IMAGE_COLUMNS, C.SOURCE)

    @classmethod
    def output_columns(cls, params, input_columns):
        cols = set(cls.writes)
        if params.labels == "folders" or params.sidecar:
            cols.add(C.LABEL)
        if params.sidecar:
            cols.add(C.CAPTION)
        return cols

    def _listing(self) -> tuple[str, list[dict[str, Any]]]:
        root, files = list_files(self.params.path, tuple(e.lower() for e in self.params.extensions))
        if not files:
            raise DifforgeError(f"{self.params.path}: no image files found")
        return root, files

    def source_fingerprint(self) -> str:
        root, files = self._listing()
        side = list_files(self.params.sidecar)[1] if self.params.sidecar else None
        return fingerprint({"files": files, "sidecar": side})

    def _sidecar(self) -> dict[str, dict[str, Any]]:
        if not self.params.sidecar:
            return {}
        fs, path = url_to_fs(self.params.sidecar)
        text = fs.cat_file(path).decode()
        if path.endswith((".jsonl", ".json")):
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            rows = list(csv.DictReader(io.StringIO(text)))
        if rows and "file" not in rows[0]:
            raise DifforgeError(f"{self.params.sidecar}: needs a `file` column")
        return {str(r["file"]): r for r in rows}

    def classes(self, files: list[dict[str, Any]]) -> list[str]:
        return sorted({f["rel"].split("/", 1)[0] for f in files if "/" in f["rel"]})

    def read_tasks(self, rows_per_task: int) -> list[dict[str, Any]]:
        root, files = self._listing()
        rels = [f["rel"] for f in files]
        return [{"files": rels[s : s + rows_per_task]} for s in range(0, len(rels), rows_per_task)]

    def read(self, task: Mapping[str, Any]) -> Iterator[pa.Table]:
        import pyarrow as pa

        from difforge.operators.imaging import describe

        fs, root = url_to_fs(self.params.path)
        root = root.rstrip("/")
        sidecar = self._sidecar()
        classes = (
            {c: i for i, c in enumerate(self.metadata()["classes"])}
            if self.params.labels == "folders"
            else {}
        )
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
        paths = [f"{root}/{rel}" for rel in task["files"]]
        contents = fs.cat(paths, on_error="return")
        for rel, path in zip(task["files"], paths, strict=True):
            data = contents.get(path)
            if isinstance(data, Exception):
                data = b""  # unreadable: kept with empty bytes; curation rejects it with a reason
            fmt, w, h, mode = describe(data) if data else (None, None, None, None)
            extra = sidecar.get(rel, {})
            label = extra.get("label")
            if self.params.labels == "folders" and "/" in rel:
                label = classes.get(rel.split("/", 1)[0])
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
        keep = self.output_columns(self.params, [])
        yield pa.table(
            {k: pa.array(v, types.get(k, pa.string())) for k, v in rows.items() if k in keep}
        )

    def metadata(self) -> dict[str, Any]:
        if self.params.labels != "folders":
            return {"source": self.params.path}
        return {"source": self.params.path, "classes": self.classes(self._listing()[1])}
