"""`ingest.fashion_mnist`: the Fashion-MNIST IDX files that Debian's dataset-fashion-mnist installs."""

from __future__ import annotations

import gzip
import os
from collections.abc import Iterator, Mapping
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from difforge.platform import columns as C
from difforge.platform.errors import DifforgeError
from difforge.platform.fingerprint import fingerprint
from difforge.platform.operator import Columns, SourceOperator
from difforge.platform.resources import Resources

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")

    split: Literal["train", "test"] = Field(
        "train", description="60,000 train or 10,000 test images"
    )
    limit: int | None = Field(None, ge=1, description="take the first N images (default: all)")
    root: str = Field(DEFAULT_ROOT, description="folder holding the four IDX .gz files")


@lru_cache(maxsize=2)
def _load(images_path: str, labels_path: str) -> tuple[np.ndarray, np.ndarray]:
    """Parse IDX files (cached per worker process, so each task does not re-read them)."""
    import numpy as np

    with gzip.open(images_path, "rb") as f:
        raw = f.read()
    n, rows, cols = (int.from_bytes(raw[i : i + 4], "big") for i in (4, 8, 12))
    images = np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(n, rows, cols)
    with gzip.open(labels_path, "rb") as f:
        labels = np.frombuffer(f.read(), dtype=np.uint8, offset=8).astype(np.int64)
    return images, labels


class FashionMnist(SourceOperator):
    """Fashion-MNIST (28x28 grayscale, 10 classes) from the IDX files of dataset-fashion-mnist."""

    name = "ingest.fashion_mnist"
    version = 1
    Params = Params
    resources = Resources(batch_size=5000)

    def columns(self) -> Columns:
        return Columns(writes={*C.IMAGE_COLUMNS, C.LABEL})

    def _paths(self) -> tuple[str, str]:
        images, labels = FILES[self.params.split]
        root = self.params.root
        paths = (os.path.join(root, images), os.path.join(root, labels))
        missing = [p for p in paths if not os.path.exists(p)]
        if missing:
            raise DifforgeError(
                f"Fashion-MNIST files not found: {', '.join(missing)}. Install them with "
                "`sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or set "
                "params.root to a folder holding the IDX .gz files"
            )
        return paths

    def source_fingerprint(self) -> str:
        stats = [(p, os.path.getsize(p), os.path.getmtime(p)) for p in self._paths()]
        return fingerprint({"files": stats})

    def _count(self) -> int:
        with gzip.open(self._paths()[1], "rb") as f:
            n = int.from_bytes(f.read(8)[4:8], "big")
        return min(n, self.params.limit or n)

    def read_tasks(self, rows_per_task: int) -> list[dict[str, Any]]:
        n = self._count()
        return [{"start": s, "stop": min(s + rows_per_task, n)} for s in range(0, n, rows_per_task)]

    def read(self, task: Mapping[str, Any]) -> Iterator[pa.Table]:
        import pyarrow as pa

        from difforge.platform.imaging import encode_png

        images, labels = _load(*self._paths())
        start, stop = task["start"], task["stop"]
        split = self.params.split
        n = stop - start
        yield pa.table(
            {
                C.ID: [f"fashion-mnist/{split}/{i:05d}" for i in range(start, stop)],
                C.IMAGE: pa.array([encode_png(images[i]) for i in range(start, stop)], pa.binary()),
                C.FORMAT: ["png"] * n,
                C.WIDTH: pa.array([images.shape[2]] * n, pa.int32()),
                C.HEIGHT: pa.array([images.shape[1]] * n, pa.int32()),
                C.MODE: ["L"] * n,
                C.LABEL: pa.array(labels[start:stop], pa.int64()),
            }
        )

    def metadata(self, inputs: list[Any]) -> dict[str, Any]:
        return {"dataset": "fashion-mnist", "split": self.params.split, "classes": CLASSES}
