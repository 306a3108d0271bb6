"""The store's hit/miss counters: one shared array the producer and every consumer process update, and
``StoreStats``, a snapshot of it."""

from __future__ import annotations

import multiprocessing as mp
from dataclasses import dataclass
from typing import Any

# counters shared by the producer and every consumer process (indices into one shared array)
PRODUCED, FAILED, FRESH, REUSED, MISSED, WAITED, DROPPED = range(7)
_COUNTER_NAMES = ("produced", "failed", "fresh", "reused", "missed", "waited", "dropped")


@dataclass
class StoreStats:
    produced: int = 0
    failed: int = 0
    fresh: int = 0
    reused: int = 0
    missed: int = 0
    waited: int = 0
    dropped: int = 0
    queued: int = -1

    @property
    def requests(self) -> int:
        return self.fresh + self.reused + self.missed

    @property
    def hit_rate(self) -> float:
        return (self.fresh + self.reused) / self.requests if self.requests else float("nan")

    @classmethod
    def total(cls, parts: "list[StoreStats]") -> "StoreStats":
        """Counters summed over stores (the DDP ranks' producers); ``queued`` too when every part knows it."""
        vals = {k: sum(getattr(p, k) for p in parts) for k in _COUNTER_NAMES}
        queued = -1 if any(p.queued < 0 for p in parts) else sum(p.queued for p in parts)
        return cls(**vals, queued=queued)

    def minus(self, other: "StoreStats") -> "StoreStats":
        vals = {k: getattr(self, k) - getattr(other, k) for k in _COUNTER_NAMES}
        return StoreStats(**vals, queued=self.queued)

    def summary(self) -> str:
        hr = "n/a" if self.requests == 0 else f"{100 * self.hit_rate:.1f}%"
        return (f"hit rate {hr} (fresh {self.fresh}, reused {self.reused}, missed {self.missed}), "
                f"produced {self.produced}, failed {self.failed}, dropped {self.dropped}, in store {self.queued}")


class SharedCounters:
    """A few int64 counters in shared memory, safe to update from any process that inherited them."""

    def __init__(self, ctx: Any = None) -> None:
        ctx = ctx or mp.get_context("spawn")
        self._arr = ctx.Array("q", len(_COUNTER_NAMES))

    def add(self, index: int, n: int = 1) -> None:
        with self._arr.get_lock():
            self._arr[index] += n

    def snapshot(self, queued: int = -1) -> StoreStats:
        with self._arr.get_lock():
            vals = list(self._arr[:])
        return StoreStats(**dict(zip(_COUNTER_NAMES, vals)), queued=queued)
