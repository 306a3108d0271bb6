"""``StoreClient``: the consumer side of a ``SampleStore``, in whichever process runs the data loader."""

from __future__ import annotations

import os
import queue as queue_mod
from pathlib import Path
from typing import Any

import numpy as np

from .case import SyntheticCase, load_case
from .counters import DROPPED, FRESH, MISSED, REUSED, WAITED, SharedCounters


class StoreClient:
    """Consumer side of a ``SampleStore``; lives in whichever process runs the data loader.

    Each draw takes a fresh case from the queue when one is there; otherwise it reuses a case from
    this process's small pool (each case at most ``reuse`` draws; 0 = unlimited); otherwise it is a
    miss and returns None so the caller uses a real case, or, with ``wait=True``, blocks until the
    producer delivers (never while the pool has a reusable case).
    """

    def __init__(self, q: Any, counters: SharedCounters, crashed: Any, stopped: Any, *, reuse: int,
                 pool_size: int, wait: bool) -> None:
        self.q, self.counters, self.crashed, self.stopped = q, counters, crashed, stopped
        self.reuse, self.pool_size, self.wait = reuse, max(1, pool_size), wait
        self._pool: list[list[Any]] = []   # [case, draws left]

    def _take(self, case: SyntheticCase) -> SyntheticCase:
        self._pool.append([case, self.reuse if self.reuse > 0 else -1])
        if len(self._pool) > self.pool_size:
            self._pool.pop(0)
            self.counters.add(DROPPED)
        return self._use(len(self._pool) - 1)

    def _use(self, idx: int) -> SyntheticCase:
        entry = self._pool[idx]
        if entry[1] > 0:
            entry[1] -= 1
            if entry[1] == 0:
                self._pool.pop(idx)
        return entry[0]

    def _fetch(self, timeout: float | None) -> SyntheticCase | None:
        try:
            path = self.q.get_nowait() if timeout is None else self.q.get(timeout=timeout)
        except queue_mod.Empty:
            return None
        try:
            case = load_case(Path(path))
        except (OSError, ValueError, KeyError):  # spool already deleted (store closed) or unreadable
            return None
        finally:
            try:
                os.unlink(path)
            except OSError:
                pass
        self.counters.add(FRESH)
        return self._take(case)

    def draw(self) -> SyntheticCase | None:
        # np.random, not random: nnU-Net seeds numpy per augmentation worker, so workers differ
        case = self._fetch(None)
        if case is not None:
            return case
        if self._pool:
            self.counters.add(REUSED)
            return self._use(int(np.random.randint(len(self._pool))))
        if self.wait:
            self.counters.add(WAITED)
            while not self.crashed.is_set():
                case = self._fetch(0.2)
                if case is not None:
                    return case
                if self.stopped.is_set():
                    break
        # a crashed producer makes this a miss; the training loop then raises its traceback
        self.counters.add(MISSED)
        return None
