"""`ingest.parquet`: an existing Parquet dataset on any fsspec URI, with columns mapped."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from difforge.operators.ingest._listing import VERIFY_FIELD, PerFileSource, Verify
from difforge.platform import columns as C
from difforge.platform.errors import DifforgeError
from difforge.platform.operator import Columns
from difforge.platform.resources import Resources

if TYPE_CHECKING:
    import pyarrow as pa


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(description="a Parquet file or folder of them (local path or fsspec URI)")
    columns: dict[str, str] = Field(
        default_factory=dict, description="rename source columns: {source_name: difforge_name}"
    )
    id_column: str | None = Field(
        None, description="source column holding a stable row id (default: file and row number)"
    )
    verify: Verify = VERIFY_FIELD


class Parquet(PerFileSource):
    """Rows of existing Parquet files; columns renamed to difforge's vocabulary."""

    name = "ingest.parquet"
    version = 2  # 2: read tasks read the plan's listing; `verify`
    Params = Params
    extensions = (".parquet", ".pq")
    resources = Resources(batch_size=1)  # files per read task

    def columns(self) -> Columns:
        return Columns(writes=None)  # known only once the files are read

    def read(self, task: Mapping[str, Any]) -> Iterator[pa.Table]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        from difforge.platform.imaging import describe

        uri, data = self.read_listed(task)
        try:
            table = pq.read_table(pa.BufferReader(data))
        except (pa.ArrowException, OSError) as exc:
            raise DifforgeError(
                f"{uri}: not a readable Parquet file ({len(data):,} bytes): {exc}"
            ) from None
        names = [self.params.columns.get(n, n) for n in table.column_names]
        table = table.rename_columns(names)
        if self.params.id_column:
            col = self.params.columns.get(self.params.id_column, self.params.id_column)
            if col not in table.column_names:
                raise DifforgeError(f"{task['rel']}: no id column '{self.params.id_column}'")
            ids = pa.compute.cast(table.column(col), pa.string())
            table = table.drop_columns([col]) if col != C.ID else table.drop_columns([C.ID])
        else:
            ids = pa.array([f"{task['rel']}#{i}" for i in range(table.num_rows)], pa.string())
        table = table.append_column(C.ID, ids) if C.ID not in table.column_names else table
        if C.IMAGE in table.column_names and C.WIDTH not in table.column_names:
            info = [
                describe(b) if b else (None, None, None, None)
                for b in table.column(C.IMAGE).to_pylist()
            ]
            for k, name in enumerate((C.FORMAT, C.WIDTH, C.HEIGHT, C.MODE)):
                if name not in table.column_names:
                    typ = pa.int32() if name in (C.WIDTH, C.HEIGHT) else pa.string()
                    table = table.append_column(name, pa.array([i[k] for i in info], typ))
        yield table
