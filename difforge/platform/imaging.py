"""Image helpers of the operator SDK: decode, describe, encode, to arrays (Pillow, lazily)."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image


def encode_png(array_or_image: np.ndarray | Image.Image) -> bytes:
    from PIL import Image

    img = array_or_image
    if not isinstance(img, Image.Image):
        img = Image.fromarray(img)
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def describe(data: bytes) -> tuple[str | None, int | None, int | None, str | None]:
    """(format, width, height, mode) from the header alone; Nones when it is not an image."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            return (img.format or "").lower() or None, img.width, img.height, img.mode
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        return None, None, None, None


def decode(data: bytes) -> Image.Image:
    """Decode fully (raises on truncated or invalid data). In a pass of fused steps, an image
    an earlier step decoded is not decoded again: the result is shared, never change it in
    place (PIL's convert, resize and the like return new images)."""
    from PIL import Image

    from difforge.platform import batch_cache

    img = batch_cache.recall(data)
    if img is None:
        img = Image.open(io.BytesIO(data))
        img.load()
        remember_decoded(data, img)
    return img


def remember_decoded(data: bytes, img: Image.Image) -> None:
    """Offer a fully decoded image to later steps of a fused pass (see `decode`)."""
    from difforge.platform import batch_cache

    batch_cache.remember(data, img, img.width * img.height * len(img.getbands()))


def replace_columns(table, columns: dict):
    """`table` with these columns set (replaced in place where present, appended otherwise)."""
    for name, col in columns.items():
        if name in table.column_names:
            table = table.set_column(table.column_names.index(name), name, col)
        else:
            table = table.append_column(name, col)
    return table


def to_array(data: bytes, mode: str | None = None) -> np.ndarray:
    import numpy as np

    img = decode(data)
    if mode and img.mode != mode:
        img = img.convert(mode)
    return np.asarray(img)


def channels_first(images: list[bytes], channels: int) -> np.ndarray:
    """Encoded images decoded to one uint8 array [N, C, H, W], in grey (1 channel) or RGB."""
    import numpy as np

    arr = np.stack([to_array(b, "L" if channels == 1 else "RGB") for b in images])
    return arr[:, None] if arr.ndim == 3 else arr.transpose(0, 3, 1, 2)


def without_image(table):
    """The table without its encoded image and what describes it (`columns.ENCODED_IMAGE`)."""
    from difforge.platform import columns as C

    return table.drop_columns([c for c in C.ENCODED_IMAGE if c in table.column_names])
