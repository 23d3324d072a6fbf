"""Values worth keeping while one batch passes through a chain of fused steps.

When steps run in one pass (`curate.validate` then `image.resize`, say), the second would
decode the images the first has just decoded. Inside `scope()` (the executor opens one per
batch of a pass) `remember` keeps such values by key, up to a byte budget, and `recall` finds
them; outside any scope both do nothing, so operators use them unconditionally. Kept values
are shared: whoever recalls one must not change it in place.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable, Iterator
from contextlib import contextmanager
from typing import Any

MAX_BYTES = 256 * 2**20

_local = threading.local()


@contextmanager
def scope(max_bytes: int = MAX_BYTES) -> Iterator[None]:
    previous = getattr(_local, "cache", None)
    _local.cache = ({}, [0, max_bytes])
    try:
        yield
    finally:
        _local.cache = previous


def remember(key: Hashable, value: Any, nbytes: int) -> None:
    cache = getattr(_local, "cache", None)
    if cache is None:
        return
    values, budget = cache
    if budget[0] + nbytes > budget[1] or key in values:
        return
    values[key] = value
    budget[0] += nbytes


def recall(key: Hashable) -> Any | None:
    cache = getattr(_local, "cache", None)
    return None if cache is None else cache[0].get(key)
