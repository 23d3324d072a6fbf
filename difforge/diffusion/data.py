"""Training data: a committed dataset read as a stream, in an order fixed by the seed.

Every worker of a training job reads the dataset's Parquet shards itself, in the same order:

- epoch `e` visits every row once. Its order: the shards shuffled by (seed, e), cut into
  *windows* of consecutive shards holding at least a window's rows (`shuffle_mb` of decoded
  samples), and the rows of each window shuffled by (seed, e, window). A worker holds at most
  three windows (the current one, the one before it while a batch straddles the two, and the
  next one, read ahead in a thread), so its memory is bounded by the window, not by the
  dataset; a dataset smaller than one window is shuffled whole each epoch.
- the epochs follow one another as one stream of rows; optimizer step `s`'s micro batch `k`
  (of `grad_accum`) takes the global rows `[(s * grad_accum + k) * B, ... + B)` for the global
  micro batch `B = micro * world`, and rank `r` takes its `micro` of them. So each example is
  seen once per epoch, the order depends only on the seed (not on the number of reads, the
  block layout or timing), and a run resumed at step `s` (after a killed worker or driver)
  continues exactly where it was.

Batches are as mixed as a window is: rows written in class order (a class-sorted folder) mix
across the classes of the window's shards; `shuffle_mb` trades memory for mixing.

A stream may skip rows (`keep`, a function of the rows' ids, such as a classifier's held-out
split): `with_kept_rows` counts what each shard keeps, once, before the workers start, and the
order is then over the kept rows only. `read_batches` reads rows in shard order, one shard at a
time, for evaluation passes that must not hold a whole dataset.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import Field

from difforge.platform import columns as C

if TYPE_CHECKING:
    import numpy as np

#: which of a shard's rows a stream keeps, from their ids (a boolean mask)
Keep = Callable[[list], "np.ndarray"]

#: MiB of decoded samples a worker shuffles together (16,384 latents of 4x32x32 float32, or
#: 341 RGB images of 256x256 as float32); it holds three such windows at most
DEFAULT_SHUFFLE_MB = 256

#: a training operator's `shuffle_mb` param
ShuffleMB = Annotated[
    int,
    Field(
        ge=1,
        description="MiB of decoded samples each worker shuffles together (it holds "
        "three such windows at most); the whole input is shuffled each epoch when smaller",
    ),
]


@dataclass
class Batch:
    """x0 as float32 [B, C, H, W] in the model's space; labels [B]; condition embeddings; an
    auxiliary tensor column's values (REPA's encoder features)."""

    x0: np.ndarray
    labels: np.ndarray | None
    cond: np.ndarray | None
    aux: np.ndarray | None = None


@dataclass
class _Window:
    x: np.ndarray
    labels: np.ndarray | None
    cond: np.ndarray | None
    aux: np.ndarray | None = None

    def take(self, idx: np.ndarray) -> _Window:
        """These rows, in this order."""
        return _Window(
            *(None if a is None else a[idx] for a in (self.x, self.labels, self.cond, self.aux))
        )


class ShardStream:
    """One rank's micro batches from a committed dataset's shards (see the module's doc).

    `shards` are the dataset's `shards()` (file, bytes, sha256, rows); `column` is `image`
    (decoded and scaled to [-1, 1]) or `latent`; a window holds `window_bytes` of decoded
    samples (at least one row). `batch(i)` is this rank's `i`-th micro batch
    (`i = step * grad_accum + micro_step`). With `keep`, the shards' `rows` must be the rows
    each keeps (`with_kept_rows`). `aux` names a tensor column read beside x0 (`Batch.aux`)."""

    def __init__(
        self,
        shards: list[dict[str, Any]],
        column: str,
        seed: int,
        micro: int,
        rank: int = 0,
        world: int = 1,
        window_bytes: int = DEFAULT_SHUFFLE_MB << 20,
        keep: Keep | None = None,
        aux: str | None = None,
    ):
        import numpy as np

        self.keep, self.aux = keep, aux
        self.shards = [s for s in shards if s["rows"]]
        if not self.shards:
            raise ValueError("the training input has no rows")
        self.column, self.seed, self.micro = column, seed, micro
        self.rank, self.world = rank, world
        self.rows = np.array([s["rows"] for s in self.shards], dtype=np.int64)
        self.n = int(self.rows.sum())
        self._plans: dict[int, tuple[list[list[int]], list[int]]] = {}
        self._cache: dict[tuple[int, int], _Window] = {}
        self._ahead: tuple[tuple[int, int], threading.Thread, dict] | None = None
        #: seconds `batch` spent waiting for reads (the rest of a step is compute)
        self.wait_s = 0.0
        self._interval: tuple[float, float] | None = None  # (start, wait_s then) for timing()
        first = _read(self.shards[0], column, keep, aux)
        self.sample_shape = tuple(first.x.shape[1:])
        self.has_labels = first.labels is not None
        self.cond_shape = tuple(first.cond.shape[1:]) if first.cond is not None else None
        self.aux_shape = tuple(first.aux.shape[1:]) if first.aux is not None else None
        # the aux column does not size the windows: the order is the same with or without it
        # (a REPA run sees its control's batches); its memory comes on top
        row_bytes = first.x[0].nbytes + (first.cond[0].nbytes if first.cond is not None else 0)
        self.window_rows = max(1, window_bytes // row_bytes)

    def __len__(self) -> int:
        return self.n

    # -- the order -----------------------------------------------------------------------
    def epoch_plan(self, epoch: int) -> tuple[list[list[int]], list[int]]:
        """The epoch's windows (shard indices, in order) and the row offset each starts at."""
        plan = self._plans.get(epoch)
        if plan is None:
            import numpy as np

            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))
            windows, starts, current, rows, start = [], [], [], 0, 0
            for i in order.tolist():
                current.append(i)
                rows += int(self.rows[i])
                if rows >= self.window_rows:
                    windows.append(current)
                    starts.append(start)
                    current, start, rows = [], start + rows, 0
            if current:
                windows.append(current)
                starts.append(start)
            plan = self._plans[epoch] = (windows, starts)
            if len(self._plans) > 2:
                self._plans.pop(min(self._plans))
        return plan

    def positions(self, index: int) -> list[tuple[int, int, int]]:
        """(epoch, window, row in the shuffled window) of each row of micro batch `index`."""
        start = (index * self.world + self.rank) * self.micro
        out = []
        pos = start
        while pos < start + self.micro:
            epoch, offset = divmod(pos, self.n)
            windows, starts = self.epoch_plan(epoch)
            w = bisect.bisect_right(starts, offset) - 1
            end_of_window = starts[w + 1] if w + 1 < len(starts) else self.n
            take = min(start + self.micro - pos, end_of_window - offset)
            out += [(epoch, w, offset - starts[w] + k) for k in range(take)]
            pos += take
        return out

    def timing(self) -> dict[str, float]:
        """Where this rank's time went since the last call (or its first batch): seconds
        waiting for data and the rest, computing; keyed by rank for the step's metrics."""
        now = time.perf_counter()
        start, waited_before = self._interval or (now, 0.0)
        self._interval = (now, self.wait_s)
        waited = self.wait_s - waited_before
        return {
            f"data_wait_s/rank{self.rank}": waited,
            f"compute_s/rank{self.rank}": max(0.0, now - start - waited),
        }

    # -- reading -------------------------------------------------------------------------
    def batch(self, index: int) -> Batch:
        import numpy as np

        if self._interval is None:
            self._interval = (time.perf_counter(), self.wait_s)
        parts: dict[tuple[int, int], list[int]] = {}
        for epoch, w, row in self.positions(index):
            parts.setdefault((epoch, w), []).append(row)
        picked = [self._window(key).take(np.asarray(rows)) for key, rows in parts.items()]
        w = _concat(picked)
        return Batch(w.x, w.labels, w.cond, w.aux)

    def _next_key(self, key: tuple[int, int]) -> tuple[int, int]:
        epoch, w = key
        windows, _ = self.epoch_plan(epoch)
        return (epoch, w + 1) if w + 1 < len(windows) else (epoch + 1, 0)

    def _window(self, key: tuple[int, int]) -> _Window:
        window = self._cache.get(key)
        if window is None:
            t0 = time.perf_counter()
            if self._ahead is not None and self._ahead[0] == key:
                _, thread, box = self._ahead
                thread.join()
                self._ahead = None
                if "error" in box:
                    raise box["error"]
                window = box["window"]
            else:
                window = self._load(key)
            self.wait_s += time.perf_counter() - t0
            # keep this window and the one before it (a batch may straddle the two)
            self._cache = {k: v for k, v in self._cache.items() if k == self._prev(key)}
            self._cache[key] = window
            self._read_ahead(self._next_key(key))
        return window

    def _prev(self, key: tuple[int, int]) -> tuple[int, int] | None:
        epoch, w = key
        if w > 0:
            return (epoch, w - 1)
        if epoch == 0:
            return None
        return (epoch - 1, len(self.epoch_plan(epoch - 1)[0]) - 1)

    def _read_ahead(self, key: tuple[int, int]) -> None:
        if key in self._cache or (self._ahead is not None and self._ahead[0] == key):
            return
        box: dict[str, Any] = {}

        def load() -> None:
            try:
                box["window"] = self._load(key)
            except BaseException as exc:  # noqa: BLE001 - raised where the window is needed
                box["error"] = exc

        thread = threading.Thread(target=load, daemon=True)
        thread.start()
        self._ahead = (key, thread, box)

    def _load(self, key: tuple[int, int]) -> _Window:
        import numpy as np

        epoch, w = key
        windows, _ = self.epoch_plan(epoch)
        window = _concat(
            [_read(self.shards[i], self.column, self.keep, self.aux) for i in windows[w]]
        )
        return window.take(np.random.default_rng([self.seed, epoch, w]).permutation(len(window.x)))


def _read(
    shard: dict[str, Any], column: str, keep: Keep | None = None, aux: str | None = None
) -> _Window:
    """A shard's (kept) rows: x0 float32 [N, C, H, W] in the model's space, labels, condition,
    and the `aux` column where asked (an error names it when the shard lacks it)."""
    import numpy as np
    import pyarrow.parquet as pq

    from difforge.platform.datasets import read_shard
    from difforge.platform.imaging import to_array
    from difforge.platform.tensors import to_numpy

    pf = pq.ParquetFile(read_shard(shard["file"], shard.get("bytes"), shard.get("sha256", "")))
    names = pf.schema_arrow.names
    if aux is not None and aux not in names:
        raise ValueError(f"the training input has no column {aux!r} (columns: {names})")
    wanted = [c for c in (column, C.LABEL, C.COND_EMBEDDING, aux) if c is not None and c in names]
    if keep is None:
        t = pf.read(columns=wanted)
    else:  # decode only the kept rows
        t = pf.read(columns=[C.ID, *wanted])
        t = t.filter(keep(t.column(C.ID).to_pylist())).drop_columns([C.ID])
    if column == C.LATENT:
        x = to_numpy(t.column(C.LATENT)).astype(np.float32)
    elif t.num_rows:
        arr = np.stack([to_array(b) for b in t.column(C.IMAGE).to_pylist()])
        arr = arr[:, None] if arr.ndim == 3 else arr.transpose(0, 3, 1, 2)
        x = arr.astype(np.float32) / 127.5 - 1.0
    else:
        x = np.zeros((0, 1, 1, 1), np.float32)
    return _Window(
        x,
        t.column(C.LABEL).to_numpy().astype(np.int64) if C.LABEL in t.column_names else None,
        to_numpy(t.column(C.COND_EMBEDDING)).astype(np.float32)
        if C.COND_EMBEDDING in t.column_names
        else None,
        to_numpy(t.column(aux)).astype(np.float32) if aux is not None else None,
    )


def _concat(parts: list[_Window]) -> _Window:
    import numpy as np

    parts = [p for p in parts if len(p.x)] or parts[:1]

    def cat(name: str):
        return (
            None
            if getattr(parts[0], name) is None
            else np.concatenate([getattr(p, name) for p in parts])
        )

    return _Window(np.concatenate([p.x for p in parts]), cat("labels"), cat("cond"), cat("aux"))


def with_kept_rows(shards: list[dict[str, Any]], keep: Keep) -> list[dict[str, Any]]:
    """The shards with `rows` counting the rows `keep` keeps (reads only the id column)."""
    import pyarrow.parquet as pq

    from difforge.platform.datasets import read_shard

    out = []
    for s in shards:
        pf = pq.ParquetFile(read_shard(s["file"], s.get("bytes"), s.get("sha256", "")))
        ids = pf.read(columns=[C.ID]).column(C.ID).to_pylist()
        out.append({**s, "rows": int(keep(ids).sum()) if ids else 0})
    return out


def read_batches(
    shards: list[dict[str, Any]], column: str, limit: int | None = None, keep: Keep | None = None
) -> Iterator[Batch]:
    """The (kept) rows in shard order, one shard at a time, up to `limit` rows in all."""
    left = limit if limit is not None else float("inf")
    for s in shards:
        if left <= 0:
            return
        w = _read(s, column, keep)
        n = int(min(left, len(w.x)))
        if n:
            yield Batch(
                w.x[:n],
                w.labels[:n] if w.labels is not None else None,
                w.cond[:n] if w.cond is not None else None,
            )
        left -= n
