"""Image signatures for deduplication: content hashes and the DCT perceptual hash."""

from __future__ import annotations

import hashlib

import numpy as np


def content_hash(data: bytes) -> str:
    return hashlib.sha256(data or b"").hexdigest()


def pixel_hash(data: bytes) -> str:
    """A hash of the decoded pixels (mode and size included): re-encodings of one image agree.
    Falls back to the bytes' hash for data that does not decode."""
    from difforge.platform.imaging import decode

    try:
        img = decode(data)
    except Exception:
        return "bytes:" + content_hash(data)
    h = hashlib.sha256(f"{img.mode}:{img.width}x{img.height}:".encode())
    h.update(img.tobytes())
    return h.hexdigest()


def phash(data: bytes) -> int | None:
    """64-bit DCT perceptual hash: the signs of the 8x8 lowest frequencies of a 32x32 grey
    thumbnail against their median. Resizing, re-encoding and small brightness changes move
    few bits; different images differ in about half."""
    from PIL import Image
    from scipy.fft import dctn

    from difforge.platform.imaging import decode

    try:
        img = decode(data).convert("L").resize((32, 32), Image.Resampling.LANCZOS)
    except Exception:
        return None
    coeffs = dctn(np.asarray(img, dtype=np.float64), type=2, norm="ortho")[:8, :8]
    flat = coeffs.flatten()
    bits = flat > np.median(flat[1:])
    return int(np.packbits(bits).view(">u8")[0]) - 2**63  # as a signed int64


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bitwise Hamming distances between int64 hashes (broadcasting)."""
    x = np.bitwise_xor(a, b).view(np.uint64)
    counts = np.zeros(x.shape, dtype=np.int64)
    for shift in range(0, 64, 8):
        counts += _POPCOUNT[((x >> np.uint64(shift)) & np.uint64(0xFF)).astype(np.int64)]
    return counts


_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.int64)


def bands(h: int, threshold: int) -> list[tuple[int, int]]:
    """Split a hash into threshold+1 bands: two hashes within `threshold` bits agree on at
    least one band (pigeonhole), so comparing only rows that share a band finds every pair."""
    n = threshold + 1
    u = h + 2**63
    edges = np.linspace(0, 64, n + 1).astype(int)
    return [
        (k, (u >> int(lo)) & ((1 << int(hi - lo)) - 1))
        for k, (lo, hi) in enumerate(zip(edges[:-1], edges[1:], strict=True))
    ]
