"""`curate.dedup_near`: perceptual-hash near-duplicate removal across a whole dataset, or
against a reference dataset (for example an evaluation split), with a Hamming threshold.

It scales: rows are compared only with rows that share a band of their hash (a shuffle in
Ray, nothing collected on the driver), and the copy kept is defined: the lowest `id`. A row is
dropped when a row with a lower id (or, in reference mode, any reference row) is within the
threshold."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from difforge.operators.curate.dedup_exact import drop_duplicates
from difforge.platform import columns as C
from difforge.platform.operator import JobOperator, JobResult, passthrough
from difforge.platform.spec import Resources

if TYPE_CHECKING:
    import pyarrow as pa

    from difforge.platform.context import JobContext


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")

    threshold: int = Field(6, ge=0, le=20, description="largest Hamming distance (of 64 bits)")
    action: Literal["drop", "flag"] = Field(
        "drop", description="flag: keep every row, add `near_duplicate` and its id"
    )


class Signatures:
    def __init__(self, role: str, threshold: int):
        self.role, self.threshold = role, threshold

    def __call__(self, batch: pa.Table) -> pa.Table:
        import pyarrow as pa

        from difforge.operators.curate._hashes import bands, phash

        ids, hashes, keys = [], [], []
        for row_id, data in zip(batch.column(C.ID).to_pylist(),
                                batch.column(C.IMAGE).to_pylist(), strict=True):  # fmt: skip
            h = phash(data)
            if h is None:
                continue  # not an image: nothing to compare (curate.validate rejects it)
            for band, value in bands(h, self.threshold):
                ids.append(row_id)
                hashes.append(h)
                keys.append(f"{band}:{value}")
        n = len(ids)
        return pa.table(
            {
                C.ID: pa.array(ids, pa.string()),
                "phash": pa.array(hashes, pa.int64()),
                "band": pa.array(keys, pa.string()),
                "role": pa.array([self.role] * n, pa.string()),
            }
        )


class NearPairs:
    """Within one band bucket: every (row, lower-id or reference neighbour) within threshold."""

    def __init__(self, threshold: int, reference: bool):
        self.threshold, self.reference = threshold, reference

    def __call__(self, group: pa.Table) -> pa.Table:
        import numpy as np
        import pyarrow as pa

        from difforge.operators.curate._hashes import hamming

        ids = np.asarray(group.column(C.ID).to_pylist(), dtype=object)
        h = group.column("phash").to_numpy()
        ref = np.asarray(group.column("role").to_pylist()) == "ref"
        out_id, out_near, out_d = [], [], []
        if len(ids) > 1 and (ref.any() or not self.reference):
            d = hamming(h[:, None], h[None, :])
            close = d <= self.threshold
            for i in np.flatnonzero(~ref):
                cand = np.flatnonzero(close[i])
                if self.reference:
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


def closest(group: pa.Table) -> pa.Table:
    """One row per dropped id: its closest (then lowest-id) match across bands."""
    rows = sorted(group.to_pylist(), key=lambda r: (r["distance"], r["duplicate_of"]))
    return group.from_pylist(rows[:1], schema=group.schema)


class DedupNear(JobOperator):
    """Removes (or flags) perceptual near-duplicates, within a dataset or against a reference."""

    name = "curate.dedup_near"
    version = 1
    Params = Params
    inputs: ClassVar[tuple[int, int]] = (1, 2)
    reads = (C.ID, C.IMAGE)
    side_outputs: ClassVar[tuple[str, ...]] = ("duplicates",)
    resources = Resources(batch_size=2048)

    @classmethod
    def output_columns(cls, params, input_columns):
        flagged = ("near_duplicate", "near_duplicate_id") if params.action == "flag" else ()
        return passthrough(input_columns, add=flagged)

    @classmethod
    def side_output_columns(cls, params, name):
        return {C.ID, "duplicate_of", "distance"}

    def run(self, ctx: JobContext) -> JobResult:
        from difforge.platform.parallel import (
            as_function,
            default_partitions,
            group_and_write,
            read_files,
        )

        p, res = self.params, ctx.resources
        cols = [C.ID, C.IMAGE]
        sigs = read_files(ctx.inputs[0].shards(), Signatures("main", p.threshold),
                          res.batch_size, res.num_cpus, cols)  # fmt: skip
        if len(ctx.inputs) > 1:
            ref = read_files(ctx.inputs[1].shards(), Signatures("ref", p.threshold),
                             res.batch_size, res.num_cpus, cols)  # fmt: skip
            sigs = sigs.union(ref)
        pairs = sigs.groupby("band", num_partitions=default_partitions()).map_groups(
            as_function(NearPairs(p.threshold, reference=len(ctx.inputs) > 1)),
            batch_format="pyarrow",
        )
        side = {"duplicates": ctx.outputs["duplicates"]}
        dup_entries = group_and_write(pairs, C.ID, closest, side)["duplicates"]
        flag = "near_duplicate" if p.action == "flag" else None
        return drop_duplicates(ctx, ctx.inputs[0].shards(), dup_entries, flag,
                               "near_duplicates.png")  # fmt: skip
