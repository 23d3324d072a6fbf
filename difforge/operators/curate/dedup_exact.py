"""`curate.dedup_exact`: drops byte-identical and pixel-identical duplicates, keeping the first
by `id`, and records every dropped row with what it duplicated (the dedup shape: rows with the
same pixels share a key)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict

from difforge.platform import columns as C
from difforge.platform.dedup import DedupOperator
from difforge.platform.spec import Resources

if TYPE_CHECKING:
    import pyarrow as pa


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DedupExact(DedupOperator):
    """Drops byte- and pixel-identical duplicates (keeping the lowest id) into `duplicates`."""

    name = "curate.dedup_exact"
    version = 1
    Params = Params
    reads = (C.ID, C.IMAGE)
    resources = Resources(batch_size=2048)
    one_key_per_row = True
    single_task_rows = 2_000_000  # keys of ~150 bytes a row: 300 MB a grouping task at most

    @classmethod
    def side_output_columns(cls, params, name):
        return {C.ID, "duplicate_of", "kind"}

    def keys(self, batch: pa.Table, role: str) -> pa.Table:
        """The key is a hash of the decoded pixels; the bytes' hash tells the two kinds apart."""
        import pyarrow as pa

        from difforge.operators.curate._hashes import content_hash, pixel_hash

        images = batch.column(C.IMAGE).to_pylist()
        return pa.table(
            {
                C.ID: batch.column(C.ID),
                "key": [pixel_hash(b) for b in images],
                "content_hash": [content_hash(b) for b in images],
            }
        )

    def match(self, group: pa.Table, reference: bool) -> pa.Table:
        """Within one group of identical pixels: keep the lowest id, drop the rest."""
        import pyarrow as pa

        rows = sorted(group.to_pylist(), key=lambda r: r[C.ID])
        keep, dropped = rows[0], rows[1:]
        return pa.table(
            {
                C.ID: pa.array([r[C.ID] for r in dropped], pa.string()),
                "duplicate_of": pa.array([keep[C.ID]] * len(dropped), pa.string()),
                "kind": pa.array(
                    ["bytes" if r["content_hash"] == keep["content_hash"] else "pixels"
                     for r in dropped], pa.string(),
                ),
            }
        )  # fmt: skip
