"""`curate.filter`: declarative filters on columns; each reports how many rows it removed.

Scores (`curate.score`'s, or any numeric column) are thresholded with `min_score` /
`max_score`; for each, the step logs the scores' histogram with the threshold, and a grid of the
images just above and just below it (`<column>_threshold.png`): what the threshold keeps and
what it drops, where it decides."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from difforge.platform import columns as C
from difforge.platform.operator import Columns, FilterOperator, StepOutcome, Verdicts
from difforge.platform.resources import Resources

if TYPE_CHECKING:
    import pyarrow as pa

    from difforge.platform.context import FinalizeContext


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")

    min_width: int | None = Field(None, ge=1)
    max_width: int | None = Field(None, ge=1)
    min_height: int | None = Field(None, ge=1)
    max_height: int | None = Field(None, ge=1)
    min_aspect: float | None = Field(None, gt=0, description="smallest width / height")
    max_aspect: float | None = Field(None, gt=0, description="largest width / height")
    labels: list[int] | None = Field(None, description="keep only these labels")
    min_caption_words: int | None = Field(None, ge=0)
    max_caption_words: int | None = Field(None, ge=1)
    min_score: dict[str, float] | None = Field(
        None, description="keep rows whose score column is at least this: {aesthetic: 5.0}"
    )
    max_score: dict[str, float] | None = Field(
        None, description="keep rows whose score column is at most this: {watermark: 0.5}"
    )


SIZE = ("min_width", "max_width", "min_height", "max_height", "min_aspect", "max_aspect")
CAPTION = ("min_caption_words", "max_caption_words")


class Filter(FilterOperator):
    """Keeps rows that pass every configured filter; the others go to `rejects`, named by filter."""

    name = "curate.filter"
    version = 2  # 2: min_score, max_score
    Params = Params
    resources = Resources(batch_size=4096)

    def scored(self) -> dict[str, dict[str, float]]:
        """{column: {"min": t, "max": t}} of the score thresholds."""
        out: dict[str, dict[str, float]] = {}
        for bound in ("min", "max"):
            for col, t in (getattr(self.params, f"{bound}_score") or {}).items():
                out.setdefault(col, {})[bound] = t
        return out

    def columns(self) -> Columns:
        params = self.params
        cols = {C.ID}
        if any(getattr(params, f) is not None for f in SIZE):
            cols |= {C.WIDTH, C.HEIGHT}
        if params.labels is not None:
            cols.add(C.LABEL)
        if any(getattr(params, f) is not None for f in CAPTION):
            cols.add(C.CAPTION)
        for bound in (params.min_score, params.max_score):
            cols |= set(bound or {})
        return Columns(reads=cols, writes=())

    def _failed(self, row: dict[str, Any]) -> str | None:
        p = self.params
        w, h = row.get(C.WIDTH), row.get(C.HEIGHT)
        checks = (
            ("min_width", lambda v: w is not None and w >= v),
            ("max_width", lambda v: w is not None and w <= v),
            ("min_height", lambda v: h is not None and h >= v),
            ("max_height", lambda v: h is not None and h <= v),
            ("min_aspect", lambda v: bool(w and h) and w / h >= v),
            ("max_aspect", lambda v: bool(w and h) and w / h <= v),
            ("labels", lambda v: row.get(C.LABEL) in v),
            ("min_caption_words", lambda v: len((row.get(C.CAPTION) or "").split()) >= v),
            ("max_caption_words", lambda v: len((row.get(C.CAPTION) or "").split()) <= v),
        )
        for name, ok in checks:
            value = getattr(p, name)
            if value is not None and not ok(value):
                return name
        for col, bounds in self.scored().items():  # a missing score fails its filter
            v = row.get(col)
            if "min" in bounds and (v is None or v < bounds["min"]):
                return f"min_score.{col}"
            if "max" in bounds and (v is None or v > bounds["max"]):
                return f"max_score.{col}"
        return None

    def judge(self, batch: pa.Table) -> Verdicts:
        wanted = (C.WIDTH, C.HEIGHT, C.LABEL, C.CAPTION, *self.scored())
        cols = [c for c in wanted if c in batch.column_names]
        return Verdicts([self._failed(r) for r in batch.select(cols).to_pylist()])

    def finalize(self, outcome: StepOutcome, ctx: FinalizeContext) -> dict[str, float]:
        from difforge.platform.summaries import value_counts

        rejects = outcome.sides["rejects"]
        counts = value_counts(rejects.iter_batches(columns=[C.REASON]), C.REASON)
        active = [
            f
            for f in Params.model_fields
            if getattr(self.params, f) is not None and not f.endswith("_score")
        ]
        active += [f"{b}_score.{col}" for col, bounds in self.scored().items() for b in bounds]
        for col, bounds in self.scored().items():
            preview_threshold(outcome, ctx, col, bounds)
        return {f"removed_by_{f}": float(counts.get(f, 0)) for f in active}


def preview_threshold(
    outcome: StepOutcome, ctx: FinalizeContext, col: str, bounds: dict[str, float], n: int = 8
) -> None:
    """The histogram of a score with its thresholds, and the `n` images on either side of
    each threshold (kept nearest it, and rejected nearest it) as `<col>_threshold.png`. Read a
    shard at a time: the histogram is drawn from `numeric_summary`'s sample of the scores, and
    only the shown rows' images are read."""
    import itertools

    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from difforge.platform.datasets import url_to_fs
    from difforge.platform.show import log_histogram
    from difforge.platform.summaries import nearest_rows, numeric_summary

    rejects = outcome.sides["rejects"]

    def kept():
        return outcome.iter_main([C.ID, col])

    def dropped(reason: str | None = None):
        for b in rejects.iter_batches(columns=[C.ID, col, C.REASON]):
            yield b if reason is None else b.filter(pc.equal(b.column(C.REASON), reason))

    scores = numeric_summary(
        itertools.chain(kept(), dropped()), col, outcome.rows_out + rejects.num_rows
    )
    log_histogram(ctx, scores.sample, col, bounds)
    if C.IMAGE not in outcome.column_names():
        return
    items: list[tuple[str, str, float]] = []  # (where, id, score)
    for bound, t in bounds.items():
        for where, rows in (("kept", kept()), ("dropped", dropped(f"{bound}_score.{col}"))):
            near = nearest_rows(rows, col, t, n)
            if near is not None:
                items += [
                    (where, i, s)
                    for i, s in zip(
                        near.column(C.ID).to_pylist(), near.column(col).to_pylist(), strict=True
                    )
                ]
    wanted = {i for _, i, _ in items}
    images: dict[str, bytes] = {}
    for uri in outcome.main_files:  # only the shown rows' images are read
        fs, path = url_to_fs(uri)
        t = pq.read_table(
            path, filesystem=fs, columns=[C.ID, C.IMAGE], filters=[(C.ID, "in", sorted(wanted))]
        )
        images.update(zip(t.column(C.ID).to_pylist(), t.column(C.IMAGE).to_pylist(), strict=True))
    if rejects.num_rows:
        shown = rejects.rows_with_ids(wanted - set(images), [C.IMAGE])
        images.update(
            zip(shown.column(C.ID).to_pylist(), shown.column(C.IMAGE).to_pylist(), strict=True)
        )
    from difforge.platform.show import captioned_grid

    grid = [(images.get(i), f"{where} {s:.3g}") for where, i, s in items]
    if grid:
        ctx.log.log_image(captioned_grid(grid, columns=n), f"{col}_threshold.png")
