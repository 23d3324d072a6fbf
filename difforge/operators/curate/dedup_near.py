"""`curate.dedup_near`: perceptual-hash near-duplicate removal across a whole dataset, or
against a reference dataset (for example an evaluation split), with a Hamming threshold.

It scales: rows are compared only with rows that share a band of their hash (a shuffle in
Ray, nothing collected on the driver), and the copy kept is defined: the lowest `id`. A row is
dropped when a row with a lower id (or, in reference mode, any reference row) is within the
threshold."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from difforge.platform import columns as C
from difforge.platform.dedup import DUPLICATES, DedupOperator
from difforge.platform.operator import Columns
from difforge.platform.resources import Resources

if TYPE_CHECKING:
    import pyarrow as pa


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")

    threshold: int = Field(6, ge=0, le=20, description="largest Hamming distance (of 64 bits)")
    action: Literal["drop", "flag"] = Field(
        "drop", description="flag: keep every row, add `near_duplicate` and its id"
    )


class DedupNear(DedupOperator):
    """Removes (or flags) perceptual near-duplicates, within a dataset or against a reference."""

    name = "curate.dedup_near"
    version = 1
    Params = Params
    inputs: ClassVar[tuple[int, int]] = (1, 2)
    resources = Resources(batch_size=2048)
    rank = ("distance",)  # matched under several bands: the closest match is kept
    grid = "near_duplicates.png"

    def columns(self) -> Columns:
        flagged = ("near_duplicate", "near_duplicate_id") if self.params.action == "flag" else ()
        duplicates = {C.ID, "duplicate_of", "distance"}
        return Columns(reads={C.ID, C.IMAGE}, writes=flagged, sides={DUPLICATES: duplicates})

    def flag_column(self) -> str | None:
        return "near_duplicate" if self.params.action == "flag" else None

    def keys(self, batch: pa.Table, role: str) -> pa.Table:
        """A row per (image, band of its hash): images within `threshold` bits share a band."""
        import pyarrow as pa

        from difforge.operators.curate._hashes import bands, phash

        ids, hashes, keys = [], [], []
        for row_id, data in zip(
            batch.column(C.ID).to_pylist(), batch.column(C.IMAGE).to_pylist(), strict=True
        ):
            h = phash(data)
            if h is None:
                continue  # not an image: nothing to compare (curate.validate rejects it)
            for band, value in bands(h, self.params.threshold):
                ids.append(row_id)
                hashes.append(h)
                keys.append(f"{band}:{value}")
        return pa.table(
            {
                C.ID: pa.array(ids, pa.string()),
                "key": pa.array(keys, pa.string()),
                "phash": pa.array(hashes, pa.int64()),
                "role": pa.array([role] * len(ids), pa.string()),
            }
        )

    def match(self, group: pa.Table, reference: bool) -> pa.Table:
        """Every main row with a lower-id neighbour (or, against a reference, a reference
        neighbour) within the threshold: its closest one."""
        import numpy as np
        import pyarrow as pa

        from difforge.operators.curate._hashes import hamming

        ids = np.asarray(group.column(C.ID).to_pylist(), dtype=object)
        h = group.column("phash").to_numpy()
        ref = np.asarray(group.column("role").to_pylist()) == "ref"
        against_ref = reference
        out_id, out_near, out_d = [], [], []
        if len(ids) > 1 and (ref.any() or not against_ref):
            d = hamming(h[:, None], h[None, :])
            close = d <= self.params.threshold
            for i in np.flatnonzero(~ref):
                cand = np.flatnonzero(close[i])
                if against_ref:
                    cand = cand[ref[cand]]  # only reference neighbours count
                else:
                    cand = cand[ids[cand] < ids[i]]
                if len(cand):
                    j = cand[np.argmin(d[i, cand])]
                    out_id.append(ids[i])
                    out_near.append(ids[j])
                    out_d.append(int(d[i, j]))
        return pa.table(
            {
                C.ID: pa.array(out_id, pa.string()),
                "duplicate_of": pa.array(out_near, pa.string()),
                "distance": pa.array(out_d, pa.int64()),
            }
        )
