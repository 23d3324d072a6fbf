"""`curate.dedup_exact`: drops byte-identical and pixel-identical duplicates, keeping the first
by `id`, and records every dropped row with what it duplicated (the dedup shape: rows with the
same pixels share a key)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict

from difforge.platform import columns as C
from difforge.platform.dedup import DUPLICATES, DedupOperator
from difforge.platform.operator import Columns
from difforge.platform.resources import Resources

if TYPE_CHECKING:
    import pyarrow as pa


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DedupExact(DedupOperator):
    """Drops byte- and pixel-identical duplicates (keeping the lowest id) into `duplicates`."""

    name = "curate.dedup_exact"
    version = 1
    Params = Params
    resources = Resources(batch_size=2048)
    one_key_per_row = True
    match_many_keys = True
    single_task_rows = 2_000_000  # keys of ~150 bytes a row: 300 MB a grouping task at most

    def columns(self) -> Columns:
        duplicates = {C.ID, "duplicate_of", "kind"}
        return Columns(reads={C.ID, C.IMAGE}, writes=(), sides={DUPLICATES: duplicates})

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
        """Within each group of identical pixels (many groups at once): keep the lowest id,
        drop the rest; `kind` says whether a dropped row's bytes are the kept row's too."""
        import numpy as np
        import pyarrow as pa
        import pyarrow.compute as pc

        t = group.sort_by([("key", "ascending"), (C.ID, "ascending")])
        keys = np.asarray(t.column("key").to_pylist(), dtype=object)
        first = np.r_[True, keys[1:] != keys[:-1]] if len(keys) else np.zeros(0, bool)
        keeper = pa.array(np.maximum.accumulate(np.where(first, np.arange(len(keys)), 0)))
        ids, content = t.column(C.ID).cast(pa.string()), t.column("content_hash")
        gone = pa.array(~first)
        same = pc.equal(content, content.take(keeper)).filter(gone).to_numpy(zero_copy_only=False)
        return pa.table(
            {
                C.ID: ids.filter(gone),
                "duplicate_of": ids.take(keeper).filter(gone),
                "kind": pa.array(np.where(same, "bytes", "pixels").tolist(), pa.string()),
            }
        )
