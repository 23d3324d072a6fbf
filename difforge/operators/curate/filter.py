"""`curate.filter`: declarative filters on columns; each reports how many rows it removed."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from difforge.platform import columns as C
from difforge.platform.operator import FilterOperator, StepOutcome, Verdicts
from difforge.platform.spec import Resources

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


SIZE = ("min_width", "max_width", "min_height", "max_height", "min_aspect", "max_aspect")
CAPTION = ("min_caption_words", "max_caption_words")


class Filter(FilterOperator):
    """Keeps rows that pass every configured filter; the others go to `rejects`, named by filter."""

    name = "curate.filter"
    version = 1
    Params = Params
    resources = Resources(batch_size=4096)

    @classmethod
    def required_columns(cls, params: Params) -> set[str]:
        cols = {C.ID}
        if any(getattr(params, f) is not None for f in SIZE):
            cols |= {C.WIDTH, C.HEIGHT}
        if params.labels is not None:
            cols.add(C.LABEL)
        if any(getattr(params, f) is not None for f in CAPTION):
            cols.add(C.CAPTION)
        return cols

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
        return None

    def judge(self, batch: pa.Table) -> Verdicts:
        cols = [c for c in (C.WIDTH, C.HEIGHT, C.LABEL, C.CAPTION) if c in batch.column_names]
        return Verdicts([self._failed(r) for r in batch.select(cols).to_pylist()])

    def finalize(self, outcome: StepOutcome, ctx: FinalizeContext) -> dict[str, float]:
        rejects = outcome.sides["rejects"]
        counts = Counter()
        if rejects.num_rows:
            counts.update(rejects.to_arrow(columns=[C.REASON]).column(C.REASON).to_pylist())
        active = [f for f in Params.model_fields if getattr(self.params, f) is not None]
        return {f"removed_by_{f}": float(counts.get(f, 0)) for f in active}
