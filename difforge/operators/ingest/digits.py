"""`ingest.digits`: scikit-learn's bundled 8x8 digits, the tiny real dataset for tests."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from difforge.platform import columns as C
from difforge.platform.fingerprint import fingerprint
from difforge.platform.operator import Columns, SourceOperator
from difforge.platform.resources import Resources

if TYPE_CHECKING:
    import pyarrow as pa


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")

    split: Literal["all", "train", "test"] = Field(
        "all", description="test: every fifth image; train: the rest"
    )
    limit: int | None = Field(None, ge=1, description="take the first N images of the split")


def _indices(split: str, limit: int | None) -> list[int]:
    idx = list(range(1797))
    if split == "train":
        idx = [i for i in idx if i % 5 != 0]
    elif split == "test":
        idx = [i for i in idx if i % 5 == 0]
    return idx[:limit] if limit else idx


class Digits(SourceOperator):
    """scikit-learn's 1,797 handwritten digits (8x8 grayscale, 10 classes), bundled in its wheel."""

    name = "ingest.digits"
    version = 1
    Params = Params
    resources = Resources(batch_size=1000)

    def columns(self) -> Columns:
        return Columns(writes={*C.IMAGE_COLUMNS, C.LABEL})

    def source_fingerprint(self) -> str:
        from importlib.metadata import version

        return fingerprint({"scikit-learn": version("scikit-learn")})

    def read_tasks(self, rows_per_task: int) -> list[dict[str, Any]]:
        idx = _indices(self.params.split, self.params.limit)
        return [{"indices": idx[s : s + rows_per_task]} for s in range(0, len(idx), rows_per_task)]

    def read(self, task: Mapping[str, Any]) -> Iterator[pa.Table]:
        import numpy as np
        import pyarrow as pa
        from sklearn.datasets import load_digits

        from difforge.platform.imaging import encode_png

        digits = load_digits()
        idx = task["indices"]
        images = (digits.images[idx] * (255.0 / 16.0)).round().astype(np.uint8)
        n = len(idx)
        yield pa.table(
            {
                C.ID: [f"digits/{i:04d}" for i in idx],
                C.IMAGE: pa.array([encode_png(im) for im in images], pa.binary()),
                C.FORMAT: ["png"] * n,
                C.WIDTH: pa.array([8] * n, pa.int32()),
                C.HEIGHT: pa.array([8] * n, pa.int32()),
                C.MODE: ["L"] * n,
                C.LABEL: pa.array(digits.target[idx], pa.int64()),
            }
        )

    def metadata(self, inputs: list[Any]) -> dict[str, Any]:
        return {
            "dataset": "digits",
            "split": self.params.split,
            "classes": [str(i) for i in range(10)],
        }
