"""Fixed-shape tensor columns (Arrow's canonical extension type), to and from numpy."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa


def to_column(array: np.ndarray) -> pa.Array:
    """[N, *shape] -> a FixedShapeTensorArray of N tensors."""
    import numpy as np
    import pyarrow as pa

    return pa.FixedShapeTensorArray.from_numpy_ndarray(np.ascontiguousarray(array))


def to_numpy(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A tensor column (chunked or not, sliced or not) -> [N, *shape]."""
    import numpy as np
    import pyarrow as pa

    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    shape = tuple(column.type.shape)
    parts = []
    for chunk in chunks:
        values = chunk.storage.flatten().to_numpy(zero_copy_only=False)
        parts.append(values.reshape((len(chunk), *shape)))
    if not parts:
        return np.zeros((0, *shape), dtype=column.type.value_type.to_pandas_dtype())
    return np.concatenate(parts)
