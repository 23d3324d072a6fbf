"""Choices made from row ids alone, so that they hold whatever the order, the batching or the
number of workers: a fraction of the rows, an order of them, a noise per row."""

from __future__ import annotations

import hashlib


def id_hash(row_id: str, salt: str, digits: int = 8) -> int:
    return int(hashlib.sha256(f"{salt}:{row_id}".encode()).hexdigest()[:digits], 16)


def id_fraction(ids: list[str], fraction: float, salt: str):
    """A boolean mask that picks about `fraction` of the rows, by id."""
    import numpy as np

    keys = np.asarray([id_hash(i, salt) for i in ids], dtype=np.int64)
    return keys < fraction * 0xFFFFFFFF


def id_noise(ids: list[str], shape: tuple[int, ...], seed: int):
    """Standard normal noise of `shape` for each row, from its id and the seed: [n, *shape]."""
    import torch

    return torch.stack(
        [
            torch.randn(shape, generator=torch.Generator().manual_seed(id_hash(i, str(seed), 15)))
            for i in ids
        ]
    )
