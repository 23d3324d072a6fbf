"""`corrupt.labels`: slight label corruption (Chen et al., "Slight Corruption in Pre-training
Data Makes Better Diffusion Models"): a fraction eta of class labels flipped on purpose."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from difforge.platform import columns as C
from difforge.platform.errors import DifforgeError
from difforge.platform.operator import Columns, MapOperator, StepOutcome
from difforge.platform.resources import Resources

if TYPE_CHECKING:
    import pyarrow as pa

    from difforge.platform.context import FinalizeContext


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")

    corruption_ratio: float = Field(
        ge=0, le=1, description="eta: the fraction of labels flipped (the paper uses 0.025-0.2)"
    )
    seed: int = 0
    num_classes: int | None = Field(
        None, ge=2, description="default: the `classes` recorded in the input's manifest"
    )
    class_map: dict[int, int] | None = Field(
        None, description="asymmetric corruption: a flipped label c becomes class_map[c]"
    )


def row_draws(seed: int, row_id: str) -> tuple[float, int]:
    """Two draws from the row's own stream: uniform in [0, 1) and a 64-bit integer. They depend
    on the seed and the row id only, never on blocks, batches or workers."""
    digest = hashlib.sha256(f"corrupt.labels:{seed}:{row_id}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    return u, int.from_bytes(digest[8:16], "big")


def corrupt_label(label: int, u: float, r: int, p: Params, num_classes: int) -> int:
    if u >= p.corruption_ratio:
        return label
    if p.class_map is not None:
        return p.class_map.get(label, label)
    other = r % (num_classes - 1)  # uniform over the other classes
    return other if other < label else other + 1


class Labels(MapOperator):
    """Flips a fraction eta of class labels (uniformly to another class, or by a class map)."""

    name = "corrupt.labels"
    version = 1
    Params = Params
    resources = Resources(batch_size=8192)

    def columns(self) -> Columns:
        return Columns(reads={C.ID, C.LABEL}, writes={C.LABEL, "label_clean", "corrupted"})

    def setup(self, ctx) -> None:
        n = self.params.num_classes
        if n is None:
            classes = ctx.metadata(0).get("classes")
            if not classes:
                raise DifforgeError(
                    "corrupt.labels: the input records no `classes`; set params.num_classes"
                )
            n = len(classes)
        self.num_classes = n

    def process(self, batch: pa.Table) -> pa.Table:
        import pyarrow as pa

        p = self.params
        labels = batch.column(C.LABEL).to_pylist()
        new = []
        for row_id, label in zip(batch.column(C.ID).to_pylist(), labels, strict=True):
            u, r = row_draws(p.seed, row_id)
            new.append(corrupt_label(label, u, r, p, self.num_classes))
        corrupted = [a != b for a, b in zip(new, labels, strict=True)]
        i = batch.column_names.index(C.LABEL)
        batch = batch.set_column(i, C.LABEL, pa.array(new, pa.int64()))
        batch = batch.append_column("label_clean", pa.array(labels, pa.int64()))
        return batch.append_column("corrupted", pa.array(corrupted, pa.bool_()))

    def finalize(self, outcome: StepOutcome, ctx: FinalizeContext) -> dict[str, float]:
        from difforge.platform.summaries import column_sum

        flipped = column_sum(outcome.iter_main(["corrupted"]), "corrupted")
        n = max(1, outcome.rows_out)
        return {"achieved_corruption_ratio": flipped / n, "labels_flipped": float(flipped)}

    def metadata(self, inputs: list[Any]) -> dict[str, Any]:
        return {
            "corruption": {
                "kind": "labels",
                "corruption_ratio": self.params.corruption_ratio,
                "seed": self.params.seed,
                "class_map": self.params.class_map,
            }
        }
