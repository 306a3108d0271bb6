"""``SampleStore``: owns the producer, the bounded queue and the spool folder the queued cases are
written to; hands out ``StoreClient`` objects to consumers."""

from __future__ import annotations

import atexit
import logging
import multiprocessing as mp
import os
import queue as queue_mod
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

from ..errors import LesionDiffusionError
from .case import CaseFactory
from .client import StoreClient
from .counters import SharedCounters, StoreStats
from .faults import ProducerCrashed, exit_reason
from .producer import _producer_loop
from .throttle import Throttle

log = logging.getLogger(__name__)


def spool_base(spool_dir: str | os.PathLike | None = None) -> str:
    """The folder queued cases are spooled in: ``spool_dir`` (config ``store.spool_dir``), else ``/dev/shm``
    when writable (RAM, no disk traffic), else the system temp folder."""
    if spool_dir is not None:
        return os.path.expanduser(os.path.expandvars(str(spool_dir)))
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else tempfile.gettempdir()


def check_spool_space(base: str, need_bytes: int, what: str, source: str = "lesiondiffusion.yaml") -> None:
    """Refuse to start when the spool folder cannot hold the queued cases (a full /dev/shm otherwise kills
    the producer mid-epoch). ``source``: the configuration file to name in the fix (it may be anywhere,
    e.g. $LESIONDIFFUSION_CONFIG)."""
    free = shutil.disk_usage(base).free
    if free < need_bytes:
        raise LesionDiffusionError(
            f"The sample store needs about {need_bytes / 2**20:.0f} MiB in its spool folder {base} ({what}) but only "
            f"{free / 2**20:.0f} MiB are free. Set store.spool_dir in {source} to a folder with more "
            "space (e.g. a local disk), or lower store.size.")


def _spool_dir(spool_dir: str | os.PathLike | None = None) -> str:
    return tempfile.mkdtemp(prefix="lesiondiffusion_store_", dir=spool_base(spool_dir))


class SampleStore:
    """Owns the producer and the bounded queue; hands out ``StoreClient`` objects to consumers.

    ``factory_builder`` must be picklable for ``worker="process"`` (it runs in a spawned process,
    which also keeps the generator's memory and GIL out of the training process). ``refresh="once"``
    stops the producer after ``size`` cases; the clients then recycle those cases without a limit.
    The producer synthesises seeds ``seed, seed + stride, seed + 2 * stride, ...``: DDP rank r of W
    passes ``seed = base + r`` and ``stride = W``, so no two ranks ever produce the same case.
    """

    def __init__(self, factory_builder: Callable[[], CaseFactory], *, size: int = 32, reuse: int = 8,
                 refresh: str = "continuous", worker: str = "process", seed: int = 0, stride: int = 1,
                 max_consecutive_failures: int = 50, nice: int = 0, batch: int = 1,
                 spool_dir: str | os.PathLike | None = None, threads: int | None = None) -> None:
        self._batch = max(1, int(batch))
        self.throttle = Throttle(mp.get_context("spawn"))   # duty 1 (unthrottled) until a controller sets it
        self.size, self.reuse, self.refresh, self.worker = size, reuse, refresh, worker
        self._ctx = mp.get_context("spawn")
        self.queue = self._ctx.Queue(maxsize=size)
        self.stop_event = self._ctx.Event()
        self.crashed = self._ctx.Event()
        self.done = self._ctx.Event()
        self.ready = self._ctx.Event()  # the producer's generator is built (start-up over)
        self._threads = threads
        self._err_q = self._ctx.Queue()
        self.counters = SharedCounters(self._ctx)
        self._builder = factory_builder
        self._seed, self._stride = seed, max(1, int(stride))
        self._max_fail = max_consecutive_failures
        self._nice = nice
        self._runner: Any = None
        self._error: str | None = None
        self.spool = _spool_dir(spool_dir)
        # a training that dies with an exception never reaches on_train_end: still free /dev/shm
        atexit.register(self.close)

    def start(self) -> "SampleStore":
        args = (self._builder, self.queue, self.stop_event, self.crashed, self.done, self._err_q, self.counters,
                self._seed, self.size if self.refresh == "once" else None, self._max_fail, self.spool, self._nice,
                self._stride, self.throttle, self._batch, self.ready, self._threads)
        if self.worker == "thread":
            self._runner = threading.Thread(target=_producer_loop, args=args, daemon=True, name="lesion-producer")
        else:
            self._runner = self._ctx.Process(target=_producer_loop, args=args, daemon=True, name="lesion-producer")
        self._runner.start()
        return self

    def client(self, pool_size: int | None = None, on_miss: str = "real") -> "StoreClient":
        reuse = 0 if self.refresh == "once" else self.reuse
        return StoreClient(self.queue, self.counters, self.crashed, self.stop_event, reuse=reuse,
                           pool_size=pool_size or self.size, wait=on_miss == "wait")

    def check(self) -> None:
        """Raise ``ProducerCrashed`` with the producer's traceback if it died."""
        if self._error is None and self.crashed.is_set():
            try:
                self._error = self._err_q.get(timeout=5)
            except queue_mod.Empty:
                self._error = "(no traceback received)"
        if self._error is None and self._runner is not None and not self.done.is_set() \
                and not self.stop_event.is_set() and not self._runner.is_alive():
            code = getattr(self._runner, "exitcode", None)
            self._error = f"The producer process exited unexpectedly ({exit_reason(code)})."
        if self._error is not None:
            raise ProducerCrashed(f"The lesion synthesis producer crashed; training stops.\n{self._error}")

    def wait_for(self, n: int, timeout: float) -> int:
        """Block until ``n`` cases are queued (or the producer finished/crashed); returns the count reached."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check()
            have = self.counters.snapshot().produced
            if have >= n or self.done.is_set():
                return have
            time.sleep(0.05)
        return self.counters.snapshot().produced

    def wait_ready(self, timeout: float) -> bool:
        """Block until the producer has built its generator (its start-up is over) or finished/crashed;
        False on timeout."""
        deadline = time.monotonic() + timeout
        while not self.ready.wait(0.1):
            self.check()
            if self.done.is_set() or time.monotonic() > deadline:
                return self.ready.is_set()
        return True

    def stats(self) -> StoreStats:
        try:
            queued = self.queue.qsize()
        except NotImplementedError:  # macOS has no sem_getvalue
            queued = -1
        return self.counters.snapshot(queued=queued)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the producer and free its generator; cases already spooled stay drawable."""
        self.stop_event.set()
        if self._runner is not None:
            self._runner.join(timeout)
            if self._runner.is_alive() and hasattr(self._runner, "terminate"):
                log.warning("producer did not stop within %.0f s; terminating it", timeout)
                self._runner.terminate()
                self._runner.join(timeout)
        self._runner = None

    def close(self) -> None:
        """Stop the producer and delete the spool folder with any unread cases."""
        atexit.unregister(self.close)
        self.stop()
        self.queue.cancel_join_thread()
        shutil.rmtree(self.spool, ignore_errors=True)

    def __del__(self) -> None:
        spool = getattr(self, "spool", None)
        if spool and os.path.isdir(spool) and (self._runner is None or not self._runner.is_alive()):
            shutil.rmtree(spool, ignore_errors=True)
