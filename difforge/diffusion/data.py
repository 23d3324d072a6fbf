"""Training data sources: what a recipe draws its batches from.

A recipe asks a source for a batch with a random generator of its own; every draw is a function
of (seed, step, micro step, rank), so the position of a resumed run is its optimizer step and
it continues the same sequence. `InMemorySource` holds the whole input (what fits one worker's
memory); a streaming source (reading shards as the recipe goes) plugs in behind the same
interface without changing the recipes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from difforge.platform import columns as C

if TYPE_CHECKING:
    import numpy as np


@dataclass
class Batch:
    """x0 as float32 [B, C, H, W] in the model's space; labels [B]; condition embeddings."""

    x0: np.ndarray
    labels: np.ndarray | None
    cond: np.ndarray | None


class TrainingSource(Protocol):
    """The interface of a training data source."""

    #: one sample's shape, [C, H, W]
    sample_shape: tuple[int, ...]
    has_labels: bool
    #: the condition embedding's shape per sample, or None without one
    cond_shape: tuple[int, ...] | None

    def __len__(self) -> int: ...

    def batch(self, rng: np.random.Generator, size: int) -> Batch:
        """`size` rows drawn with `rng` (uniformly, with replacement)."""
        ...


class InMemorySource:
    """The whole input decoded once into memory: images scaled to [-1, 1], or latents."""

    def __init__(self, files: list[str], column: str):
        self.x, self.labels, self.cond = _load_arrays(files, column)
        self.sample_shape = tuple(self.x.shape[1:])
        self.has_labels = self.labels is not None
        self.cond_shape = tuple(self.cond.shape[1:]) if self.cond is not None else None

    def __len__(self) -> int:
        return len(self.x)

    def batch(self, rng: np.random.Generator, size: int) -> Batch:
        idx = rng.integers(0, len(self.x), size)
        return Batch(
            self.x[idx],
            self.labels[idx] if self.labels is not None else None,
            self.cond[idx] if self.cond is not None else None,
        )


def _load_arrays(files: list[str], column: str):
    """x0 as float32 [N, C, H, W] in the model's space, labels, and condition embeddings."""
    import numpy as np
    import pyarrow.parquet as pq

    from difforge.platform.datasets import url_to_fs
    from difforge.platform.imaging import to_array
    from difforge.platform.tensors import to_numpy

    xs, labels, conds = [], [], []
    for uri in files:
        fs, path = url_to_fs(uri)
        schema = pq.read_schema(path, filesystem=fs)
        cols = [c for c in (column, C.LABEL, C.COND_EMBEDDING) if c in schema.names]
        t = pq.read_table(path, filesystem=fs, columns=cols)
        if column == C.LATENT:
            xs.append(to_numpy(t.column(C.LATENT)).astype(np.float32))
        else:
            arr = np.stack([to_array(b) for b in t.column(C.IMAGE).to_pylist()])
            arr = arr[:, None] if arr.ndim == 3 else arr.transpose(0, 3, 1, 2)
            xs.append(arr.astype(np.float32) / 127.5 - 1.0)
        if C.LABEL in t.column_names:
            labels.append(t.column(C.LABEL).to_numpy().astype(np.int64))
        if C.COND_EMBEDDING in t.column_names:
            conds.append(to_numpy(t.column(C.COND_EMBEDDING)).astype(np.float32))
    x = np.concatenate(xs)
    return (
        x,
        (np.concatenate(labels) if labels else None),
        (np.concatenate(conds) if conds else None),
    )
