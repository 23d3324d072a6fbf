"""`corrupt.captions`: slight caption corruption (Chen et al.): swap captions between random
pairs of rows at ratio eta (their CC3M setting), or replace a fraction of words. Deterministic
from a seed and the row ids, whatever the block layout."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from difforge.platform import columns as C
from difforge.platform.operator import (
    MAIN,
    Columns,
    JobOperator,
    JobResult,
    StepOutcome,
)
from difforge.platform.resources import Resources

if TYPE_CHECKING:
    import pyarrow as pa

    from difforge.platform.context import FinalizeContext, JobContext

# Replacement words for `mode: words`: common concrete nouns, so a corrupted caption stays
# fluent but says something wrong.
WORDS = (
    "dog cat car tree house bird boat chair table flower horse bicycle mountain river street "
    "window door book cup bottle phone clock shoe shirt hat bag ball train plane bridge beach"
).split()


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")

    corruption_ratio: float = Field(ge=0, le=1, description="eta: the fraction corrupted")
    mode: Literal["swap", "words"] = Field(
        "swap",
        description="swap: pairs of rows exchange captions; words: each word replaced "
        "with probability eta",
    )
    seed: int = 0
    buckets: int = Field(64, ge=1, description="swap partners are drawn within hash buckets")


def draw(seed: int, *parts: Any) -> int:
    return int.from_bytes(
        hashlib.sha256(":".join(map(str, (seed, *parts))).encode()).digest()[:8], "big"
    )


def u01(seed: int, *parts: Any) -> float:
    return draw(seed, *parts) / 2**64


class SelectForSwap:
    def __init__(self, p: dict):
        self.p = p

    def __call__(self, batch: pa.Table) -> pa.Table:
        import pyarrow as pa

        p = self.p
        rows = [
            {
                C.ID: i,
                C.CAPTION: c,
                "bucket": draw(p["seed"], "bucket", i) % p["buckets"],
                "order": draw(p["seed"], "order", i),
            }
            for i, c in zip(
                batch.column(C.ID).to_pylist(), batch.column(C.CAPTION).to_pylist(), strict=True
            )
            if u01(p["seed"], "select", i) < p["corruption_ratio"]
        ]
        schema = pa.schema(
            [
                (C.ID, pa.string()),
                (C.CAPTION, pa.string()),
                ("bucket", pa.int64()),
                ("order", pa.uint64()),
            ]
        )
        return pa.Table.from_pylist(rows, schema=schema)


def pair_up(group: pa.Table) -> pa.Table:
    """Within a bucket, in a seeded order: rows 0<->1, 2<->3, ... exchange captions."""
    import pyarrow as pa

    rows = sorted(group.to_pylist(), key=lambda r: (r["order"], r[C.ID]))
    ids, captions = [], []
    for a, b in zip(rows[0::2], rows[1::2], strict=False):
        ids += [a[C.ID], b[C.ID]]
        captions += [b[C.CAPTION], a[C.CAPTION]]
    return pa.table(
        {C.ID: pa.array(ids, pa.string()), "new_caption": pa.array(captions, pa.string())}
    )


class Apply:
    def __init__(self, p: dict, swap_files: list[str]):
        self.p, self.swap_files, self._swaps = p, swap_files, None

    def swaps(self) -> dict[str, str]:
        if self._swaps is None:
            import pyarrow.parquet as pq

            from difforge.platform.datasets import url_to_fs

            self._swaps = {}
            for uri in self.swap_files:
                fs, path = url_to_fs(uri)
                t = pq.read_table(path, filesystem=fs)
                self._swaps.update(
                    zip(
                        t.column(C.ID).to_pylist(), t.column("new_caption").to_pylist(), strict=True
                    )
                )
        return self._swaps

    def words(self, row_id: str, caption: str | None) -> str | None:
        if not caption:
            return caption
        p = self.p
        out = [
            WORDS[draw(p["seed"], "word", row_id, k) % len(WORDS)]
            if u01(p["seed"], "replace", row_id, k) < p["corruption_ratio"]
            else w
            for k, w in enumerate(caption.split())
        ]
        return " ".join(out)

    def __call__(self, batch: pa.Table) -> pa.Table:
        import pyarrow as pa

        ids = batch.column(C.ID).to_pylist()
        clean = batch.column(C.CAPTION).to_pylist()
        if self.p["mode"] == "swap":
            swaps = self.swaps()
            new = [swaps.get(i, c) for i, c in zip(ids, clean, strict=True)]
        else:
            new = [self.words(i, c) for i, c in zip(ids, clean, strict=True)]
        i = batch.column_names.index(C.CAPTION)
        batch = batch.set_column(i, C.CAPTION, pa.array(new, pa.string()))
        batch = batch.append_column("caption_clean", pa.array(clean, pa.string()))
        flags = [a != b for a, b in zip(new, clean, strict=True)]
        return batch.append_column("corrupted", pa.array(flags, pa.bool_()))


class Captions(JobOperator):
    """Corrupts a fraction eta of captions: pairwise swaps, or word replacements."""

    name = "corrupt.captions"
    version = 1
    Params = Params
    resources = Resources(batch_size=8192)

    def columns(self) -> Columns:
        written = {C.CAPTION, "caption_clean", "corrupted"}
        return Columns(reads={C.ID, C.CAPTION}, writes=written)

    def run(self, ctx: JobContext) -> JobResult:
        from difforge.platform.datasets import join
        from difforge.platform.outputs import open_output
        from difforge.platform.parallel import group_and_write, map_files, read_files

        p, res = self.params.model_dump(), ctx.resources
        files = ctx.inputs[0].shards()
        swap_files: list[str] = []
        if p["mode"] == "swap":
            chosen = read_files(
                files, SelectForSwap(p), res.batch_size, res.num_cpus, columns=[C.ID, C.CAPTION]
            )
            swaps = open_output(join(ctx.work_uri, "swaps"))  # working data, never committed
            # small inputs pair up in one task (a shuffle's fixed cost is seconds), the same pairs
            entries = group_and_write(
                chosen, "bucket", pair_up, {"swaps": swaps}, rows=ctx.inputs[0].num_rows
            )["swaps"]
            swap_files = [join(swaps.uri, e["path"]) for e in entries if e["path"]]
        main = map_files(
            files, Apply(p, swap_files), {MAIN: ctx.outputs[MAIN]}, res.batch_size, res.num_cpus
        )[MAIN]
        return JobResult(entries={MAIN: main})

    def finalize(self, outcome: StepOutcome, ctx: FinalizeContext) -> dict[str, float]:
        from difforge.platform.summaries import column_sum

        n = column_sum(outcome.iter_main(["corrupted"]), "corrupted")
        return {"achieved_corruption_ratio": n / max(1, outcome.rows_out), "captions_changed": n}

    def metadata(self, inputs: list[Any]) -> dict[str, Any]:
        return {"corruption": {"kind": "captions", **self.params.model_dump()}}
