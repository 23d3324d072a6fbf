"""`curate.dedup_exact`: drops byte-identical and pixel-identical duplicates, keeping the first
by `id`, and records every dropped row with what it duplicated."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict

from difforge.platform import columns as C
from difforge.platform.operator import MAIN, JobOperator, JobResult
from difforge.platform.spec import Resources

if TYPE_CHECKING:
    import pyarrow as pa

    from difforge.platform.context import JobContext


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")


def signatures(batch: pa.Table) -> pa.Table:
    import pyarrow as pa

    from difforge.operators.curate._hashes import content_hash, pixel_hash

    images = batch.column(C.IMAGE).to_pylist()
    return pa.table(
        {
            C.ID: batch.column(C.ID),
            "content_hash": [content_hash(b) for b in images],
            "pixel_hash": [pixel_hash(b) for b in images],
        }
    )


def pick_first(group: pa.Table) -> pa.Table:
    """Within one group of identical pixels: keep the lowest id, drop the rest."""
    import pyarrow as pa

    rows = sorted(group.to_pylist(), key=lambda r: r[C.ID])
    keep = rows[0]
    dropped = rows[1:]
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


class DropIds:
    """Removes the rows whose ids are listed in some shards (loaded once per task)."""

    def __init__(self, id_files: list[str], flag: str | None = None):
        self.id_files, self.flag, self._ids = id_files, flag, None

    def ids(self) -> dict[str, str]:
        if self._ids is None:
            import pyarrow.parquet as pq

            from difforge.platform.datasets import url_to_fs

            self._ids = {}
            for uri in self.id_files:
                fs, path = url_to_fs(uri)
                t = pq.read_table(path, filesystem=fs, columns=[C.ID, "duplicate_of"])
                self._ids.update(zip(t.column(0).to_pylist(), t.column(1).to_pylist(),
                                     strict=True))  # fmt: skip
        return self._ids

    def __call__(self, batch: pa.Table) -> pa.Table:
        import pyarrow as pa

        ids = self.ids()
        if self.flag:
            near = [ids.get(i) for i in batch.column(C.ID).to_pylist()]
            batch = batch.append_column(self.flag, pa.array([n is not None for n in near]))
            return batch.append_column(f"{self.flag}_id", pa.array(near, pa.string()))
        mask = [i not in ids for i in batch.column(C.ID).to_pylist()]
        return batch.filter(pa.array(mask, pa.bool_()))


def log_pairs(ctx: JobContext, pairs: list[tuple[str, str]], name: str) -> None:
    """Removed rows beside what they duplicated, as an image grid in MLflow."""
    if not pairs:
        return
    from difforge.platform.show import captioned_grid

    wanted = {i for p in pairs for i in p}
    images: dict[str, bytes] = {}
    for ds in ctx.inputs:
        for batch in ds.iter_batches(columns=[C.ID, C.IMAGE], batch_size=4096):
            for i, b in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist(), strict=True):
                if i in wanted:
                    images[i] = b
    items = []
    for dropped, kept in pairs:
        items += [(images.get(kept), f"kept {kept}"), (images.get(dropped), f"drop {dropped}")]
    ctx.tracker.log_image(captioned_grid(items, columns=8), name)


def side_pairs(uris: list[str], n: int = 16) -> list[tuple[str, str]]:
    import pyarrow.parquet as pq

    from difforge.platform.datasets import url_to_fs

    pairs: list[tuple[str, str]] = []
    for uri in uris:
        if len(pairs) >= n:
            break
        fs, path = url_to_fs(uri)
        t = pq.read_table(path, filesystem=fs, columns=[C.ID, "duplicate_of"])
        pairs += list(zip(t.column(0).to_pylist(), t.column(1).to_pylist(), strict=True))
    return pairs[:n]


def drop_duplicates(ctx: JobContext, files: list, dup_entries: list[dict[str, Any]],
                    flag: str | None, grid_name: str) -> JobResult:  # fmt: skip
    """Second pass of both dedups: remove (or flag) the listed ids from every shard, and log
    the pairs removed as an image grid."""
    from difforge.platform.datasets import join
    from difforge.platform.parallel import map_files

    res = ctx.resources
    root = ctx.outputs["duplicates"].uri
    id_files = [join(root, e["path"]) for e in dup_entries if e["path"]]
    main = map_files(files, DropIds(id_files, flag), {MAIN: ctx.outputs[MAIN]},
                     res.batch_size, res.num_cpus)[MAIN]  # fmt: skip
    log_pairs(ctx, side_pairs(id_files), grid_name)
    return JobResult(entries={MAIN: main, "duplicates": dup_entries})


class DedupExact(JobOperator):
    """Drops byte- and pixel-identical duplicates (keeping the lowest id) into `duplicates`."""

    name = "curate.dedup_exact"
    version = 1
    Params = Params
    reads = (C.ID, C.IMAGE)
    side_outputs: ClassVar[tuple[str, ...]] = ("duplicates",)
    resources = Resources(batch_size=2048)

    @classmethod
    def side_output_columns(cls, params, name):
        return {C.ID, "duplicate_of", "kind"}

    def run(self, ctx: JobContext) -> JobResult:
        from difforge.platform.parallel import group_and_write, read_files

        source = ctx.inputs[0]
        res = ctx.resources
        sigs = read_files(source.shards(), signatures, res.batch_size, res.num_cpus,
                          columns=[C.ID, C.IMAGE])  # fmt: skip
        side = {"duplicates": ctx.outputs["duplicates"]}
        dup_entries = group_and_write(sigs, "pixel_hash", pick_first, side)["duplicates"]
        return drop_duplicates(ctx, source.shards(), dup_entries, None, "duplicates.png")
