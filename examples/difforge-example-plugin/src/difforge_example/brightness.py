"""`example.min_brightness`: rejects images whose mean brightness is below a threshold.

A filter: `judge` says, row by row, keep (None) or why not; difforge writes the kept rows to the
step's dataset and the others, with their reason and detail, to its `rejects`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

from difforge.platform import columns as C
from difforge.platform.imaging import decode
from difforge.platform.operator import Columns, FilterOperator, Verdicts
from difforge.platform.resources import Resources

if TYPE_CHECKING:
    import pyarrow as pa


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a typo in YAML is an error

    threshold: float = Field(20.0, ge=0, le=255, description="lowest mean pixel value kept")


class MinBrightness(FilterOperator):
    """Rejects images darker on average than `threshold` (0-255)."""

    name = "example.min_brightness"
    version = 1  # bump when what it writes changes: its steps then recompute
    Params = Params
    resources = Resources(batch_size=512)

    def columns(self) -> Columns:
        return Columns(reads={C.ID, C.IMAGE}, writes=())  # rows kept as they came

    def judge(self, batch: pa.Table) -> Verdicts:
        import numpy as np

        reasons, details = [], []
        for data in batch.column(C.IMAGE).to_pylist():
            try:
                mean = float(np.asarray(decode(data).convert("L")).mean())
            except Exception as exc:  # an undecodable image is rejected, never fatal
                reasons.append("undecodable")
                details.append(type(exc).__name__)
                continue
            dark = mean < self.params.threshold
            reasons.append("too_dark" if dark else None)
            details.append(f"mean {mean:.1f} < {self.params.threshold:g}" if dark else None)
        return Verdicts(reasons, details)
