"""The producer: the loop that runs in the spawned process (or thread), builds the generator once and
keeps the store's queue full of spooled case files."""

from __future__ import annotations

import gc
import logging
import multiprocessing as mp
import os
import queue as queue_mod
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from ..errors import SynthesisError
from .case import CaseFactory, save_case, validate_case
from .counters import FAILED, PRODUCED, SharedCounters
from .throttle import Throttle

log = logging.getLogger(__name__)


def _producer_loop(factory_builder: Callable[[], CaseFactory], out_q: Any, stop: Any, crashed: Any, done: Any,
                   err_q: Any, counters: SharedCounters, seed: int, limit: int | None,
                   max_consecutive_failures: int, spool: str, nice: int = 0, stride: int = 1,
                   throttle: Throttle | None = None, batch: int = 1, ready: Any = None,
                   threads: int | None = None) -> None:
    """Runs in the producer process/thread: build the factory once, then keep the queue full
    (``batch`` > 1: ``factory.batch(seeds)`` makes that many cases in one generator call). ``ready`` is
    set once the factory is built; ``threads`` caps the process's torch/OpenMP threads."""
    factory = None
    orphan: _StopWhenParentDies | None = None
    try:
        if mp.current_process().name == "lesion-producer":  # own process: its priority and threads only
            if nice:
                os.nice(nice)  # on a shared CPU the training loop keeps priority; the producer uses idle time
            if threads:
                _limit_threads(int(threads))
            parent = mp.parent_process()
            if parent is not None:
                stop = orphan = _StopWhenParentDies(stop, parent.pid)
        factory = factory_builder()
        if ready is not None:
            ready.set()
        generator = getattr(factory, "generator", None)
        if throttle is not None and hasattr(generator, "step_callback"):
            generator.step_callback = lambda _step: throttle.checkpoint(stop)
        made, consecutive, i = 0, 0, 0
        reasons: dict[str, int] = {}
        while not stop.is_set() and (limit is None or made < limit):
            # stride = DDP world size: ranks draw disjoint seed streams
            seeds = [seed + (i + j) * stride for j in range(batch)]
            i += batch
            if throttle is not None and not throttle.start(stop):
                break
            ready: list[tuple[str | None, str | None]] = []
            try:
                many = factory.batch(seeds) if batch > 1 else [factory(seeds[0])]  # type: ignore[attr-defined]
                for case_seed, (case, reason) in zip(seeds, many):
                    if case is not None:
                        reason = validate_case(case)
                    path = None
                    if reason is None:
                        path = os.path.join(spool, f"case_{case_seed}.npz")
                        save_case(Path(path), case)
                    ready.append((path, reason))
            finally:
                if throttle is not None:
                    throttle.end(stop)
            for path, reason in ready:
                if reason is not None:
                    counters.add(FAILED)
                    consecutive += 1
                    reasons[reason] = reasons.get(reason, 0) + 1
                    log.debug("synthesis dropped: %s", reason)
                    if consecutive >= max_consecutive_failures:
                        top = ", ".join(f"{r} (x{n})" for r, n in sorted(reasons.items(), key=lambda x: -x[1])[:5])
                        raise SynthesisError(
                            f"{consecutive} syntheses in a row failed; reasons: {top}. Check that the templates "
                            "contain the organs the catalogs need and that the generator works on them.")
                    continue
                consecutive = 0
                while not stop.is_set():
                    try:
                        out_q.put(path, timeout=0.2)
                        counters.add(PRODUCED)
                        made += 1
                        break
                    except queue_mod.Full:
                        continue
        if orphan is not None and orphan.parent_gone():
            # nobody will read the queued cases or delete them: free the spool (RAM in /dev/shm) ourselves
            shutil.rmtree(spool, ignore_errors=True)
            return
        done.set()
    except BaseException:  # the consumer side re-raises this traceback in the training loop
        err_q.put(traceback.format_exc())
        crashed.set()
    finally:
        factory = None  # frees the generator (and its GPU memory) as soon as production ends
        _free_accelerator_memory()


class _StopWhenParentDies:
    """The stop event as the producer process sees it: also set once the training process is gone.

    A training ended by SIGTERM (``kill``, a batch scheduler's time limit) or SIGKILL runs no clean-up, and
    a daemon child outlives such a parent: the producer kept its generator's memory (about 1 GB on CPU)
    and waited forever on the full queue, and the spool folder stayed in /dev/shm. The parent is gone
    when this process was handed to another parent (``os.getppid`` changed)."""

    def __init__(self, stop: Any, parent_pid: int) -> None:
        self._stop, self._parent = stop, parent_pid

    def parent_gone(self) -> bool:
        return os.getppid() != self._parent

    def is_set(self) -> bool:
        return self._stop.is_set() or self.parent_gone()

    def wait(self, timeout: float | None = None) -> bool:
        # in slices of a second, so a parent that dies during a long throttle rest is noticed soon
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.is_set():
            left = 1.0 if deadline is None else min(1.0, deadline - time.monotonic())
            if left <= 0:
                break
            self._stop.wait(left)
        return self.is_set()


def _limit_threads(n: int) -> None:
    """Cap torch's intra-op threads (and OpenMP's, if torch is not imported yet) in the producer process.
    A CPU generator with as many threads as cores competes with every thread of the training loop, and
    OpenMP threads spin between parallel regions, so a niced producer still costs the trainer time."""
    os.environ["OMP_NUM_THREADS"] = str(n)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(n)


def _free_accelerator_memory() -> None:
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
