"""Synthetic sample store: a background producer feeding a bounded queue, and an offline disk cache.

The producer (a spawned process by default, or a thread) builds the generator once, keeps it resident
and fills a bounded queue with ready-to-train synthetic cases. Consumers (the training data loader,
possibly in several augmentation worker processes) draw through a ``StoreClient`` that never blocks
while a case is available, reuses each case at most ``reuse`` times and counts hits and misses in
shared counters. The ``OfflineCache`` writes the same cases to disk once (resumable, atomic) and
``OfflineCacheReader`` serves them with no generator loaded.

Cases travel as files in a spool folder (``/dev/shm`` when available) and only their paths go
through the queue: a path is a message far below the pipe's atomic-write size, so stopping or
killing the producer can never leave half a message that would block a reader, and the producer
never holds unread cases in its queue feeder.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import multiprocessing as mp
import os
import queue as queue_mod
import shutil
import tempfile
import threading
import time
import traceback
import zipfile
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np

from .errors import LesionDiffusionError, SynthesisError
from .io import atomic_path, remove_stale_temporaries, write_json

log = logging.getLogger(__name__)

# counters shared by the producer and every consumer process (indices into one shared array)
PRODUCED, FAILED, FRESH, REUSED, MISSED, WAITED, DROPPED = range(7)
_COUNTER_NAMES = ("produced", "failed", "fresh", "reused", "missed", "waited", "dropped")


@dataclass
class SyntheticCase:
    """One preprocessed synthetic training case, in the layout nnU-Net's data loader crops from.

    ``data`` is float32 (C, X, Y, Z), already normalised like the real preprocessed cases; ``seg`` is
    int16 (1, X, Y, Z) with the dataset's label ids; ``properties`` carries ``class_locations`` for
    foreground oversampling; ``meta`` holds the reports, seed and template name (JSON-serialisable).
    """

    name: str
    data: np.ndarray
    seg: np.ndarray
    properties: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)


class CaseFactory(Protocol):
    """Makes one synthetic case from a seed, or returns ``(None, reason)`` when synthesis failed.
    Factories used with a producer ``batch`` > 1 also have ``batch(seeds)``: one result per seed."""

    def __call__(self, seed: int) -> tuple[SyntheticCase | None, str | None]: ...


class ProducerCrashed(RuntimeError):
    """The background producer died; the message carries its traceback."""


def validate_case(case: SyntheticCase) -> str | None:
    """Reason to drop ``case`` (NaN/inf data, shape mismatch, no lesion voxels), or None when usable."""
    if case.data.ndim != 4 or case.seg.ndim != 4 or case.data.shape[1:] != case.seg.shape[1:]:
        return f"shape mismatch data {case.data.shape} vs seg {case.seg.shape}"
    if not np.isfinite(case.data).all():
        return "non-finite values in the synthetic image"
    if not (case.seg > 0).any():
        return "no lesion voxels in the synthetic label"
    return None


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


class Throttle:
    """Duty-cycle limit on the producer, in shared memory (set by the trainer, obeyed by the producer).

    ``duty`` is the share of wall time the producer may work (1 = unthrottled, 0 = paused): after each
    busy span of ``d`` seconds (a denoising step, or a synthesis without steps) it rests
    ``d * (1 - duty) / duty``. The producer also publishes
    how many seconds it has been busy (``busy_seconds``), which is how the trainer sees, per training
    iteration, what share of it overlapped with synthesis.
    """

    def __init__(self, ctx: Any = None) -> None:
        ctx = ctx or mp.get_context("spawn")
        self._duty = ctx.Value("d", 1.0)
        self._busy = ctx.Array("d", 2)   # [busy seconds finished, start of the current busy span or 0]
        # set while duty > 0: a paused producer sleeps on it instead of polling the duty, so a pause costs
        # no wake-ups per training iteration and a resume is immediate
        self._resume = ctx.Event()
        self._resume.set()

    @property
    def duty(self) -> float:
        return float(self._duty.value)

    def set_duty(self, value: float) -> None:
        value = float(min(1.0, max(0.0, value)))
        before = self._duty.value
        self._duty.value = value
        if (before <= 0.0) != (value <= 0.0):  # only pause/resume transitions touch the event
            if value > 0.0:
                self._resume.set()
            else:
                self._resume.clear()

    def _wait_while_paused(self, stop: Any) -> bool:
        """Sleep until the duty is positive again; False when ``stop`` was set. Wakes twice a second at
        most (to see ``stop``), not once per training iteration."""
        while self.duty <= 0.0:
            if stop.is_set():
                return False
            self._resume.wait(0.5)
        return not stop.is_set()

    def busy_seconds(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now  # CLOCK_MONOTONIC: one clock for all processes
        with self._busy.get_lock():
            done, since = self._busy[0], self._busy[1]
        return done + (now - since if since > 0 else 0.0)

    def start(self, stop: Any) -> bool:
        """Producer side: wait while paused; mark the start of a busy span. False when stopping."""
        if not self._wait_while_paused(stop):
            return False
        with self._busy.get_lock():
            self._busy[1] = time.monotonic()
        return True

    def checkpoint(self, stop: Any) -> None:
        """Producer side, between denoising steps: a pause (duty 0) and the duty cycle's rest take effect
        here instead of after the whole synthesis, which on a shared CPU (a niced producer gets a small
        share of the cores) can outlast hundreds of training iterations, so a rest only after it would
        never come. Paused and resting time is not counted as busy."""
        duty = self.duty
        if duty >= 1.0:
            return
        now = time.monotonic()
        with self._busy.get_lock():
            spent = now - self._busy[1] if self._busy[1] > 0 else 0.0
            self._busy[0] += spent
            self._busy[1] = 0.0
        if duty > 0.0:
            stop.wait(spent * (1.0 - duty) / duty)
        self._wait_while_paused(stop)
        with self._busy.get_lock():
            self._busy[1] = time.monotonic()

    def end(self, stop: Any) -> None:
        """Producer side: close the busy span and rest as long as the duty cycle asks."""
        now = time.monotonic()
        with self._busy.get_lock():
            spent = now - self._busy[1]
            self._busy[0] += spent
            self._busy[1] = 0.0
        duty = self.duty
        if 0.0 < duty < 1.0:
            stop.wait(spent * (1.0 - duty) / duty)


class ThrottleController:
    """Trainer side of ``Throttle``: keeps training within ``budget`` of plain nnU-Net's iteration time.

    Every training iteration reports its wall time ``t`` and the share ``f`` of it the producer was
    busy, i.e. ``b = f * t`` busy seconds. Over a sliding window it fits ``t = plain + k * b`` with means:
    ``plain``, the iteration time without the producer (plain nnU-Net's, measured online, not in a
    separate run), is the mean idle iteration (``f < 0.05``) and ``k``, the training time each busy
    producer second costs (the share of the cores it takes), is ``(mean t - plain) / mean b`` over busy
    iterations (``f > 0.3``). Means, not medians: a niced producer on a CPU gets its cores in slices, so
    most busy iterations run at plain speed and a few take 2-4x as long; a median of busy iterations
    misses that tail, which is where the overhead is (on an idle 2-core VM it read +13 % for +35 %, and the
    "5 %" rows ran 13-21 % slower than plain). A neighbour's burst lands on idle and busy iterations
    alike, so it cancels in the difference of the means. Linear in ``b``, not in ``f``: ``t = plain + extra * f`` would be biased, since a
    slower iteration overlaps more producer time (at ``k = 0.5`` it read a 100 % slowdown as 73 %). With
    duty ``d`` (busy share of the wall time) an iteration costs ``plain / (1 - k d)``, so the duty for an
    overhead of ``budget`` is ``budget / ((1 + budget) k)`` (at most 1), with ``k`` raised by one standard
    error of its estimate so that noise keeps the producer under the budget rather than around it. The fit needs iterations with
    and without synthesis: a full store idles the producer, and from iteration ``first_probe`` on, every
    ``probe_every`` iterations the producer is paused until ``probe_len`` iterations have run without it,
    in case it never idles. Until the first fit the producer runs unthrottled. (A cautious start at the
    duty for ``k = 1`` was tried: at that duty a GPU producer's short steps overlap every iteration a
    little, so there were no busy iterations to fit and it never left the cautious duty.)
    """

    def __init__(self, throttle: Throttle, budget: float, *, window: int = 500, probe_every: int = 100,
                 probe_len: int = 4, first_probe: int = 20, min_duty: float = 0.01) -> None:
        from collections import deque

        self.throttle, self.budget = throttle, float(budget)
        self.samples: Any = deque(maxlen=window)
        self.probe_every, self.probe_len, self.min_duty = probe_every, probe_len, min_duty
        self.first_probe = first_probe
        self.duty = throttle.duty
        self.plain: float | None = None
        self.cost = 0.0                       # training seconds per busy producer second (k)
        self.cost_bound = 0.0                 # k plus one standard error: what the duty is set from
        self.slowdown: float | None = None    # iteration slowdown while the producer works all the time
        self._i = 0
        self._last: tuple[float, float] | None = None
        self._probe_idle: int | None = None   # idle iterations seen in the probe under way

    def reset_clock(self) -> None:
        """Forget the last tick (call when iterations pause, e.g. for validation between epochs)."""
        self._last = None

    def tick(self, now: float | None = None) -> None:
        """Call at the start of every training iteration."""
        now = time.monotonic() if now is None else now
        busy = self.throttle.busy_seconds(now)
        if self._last is not None and now > self._last[0]:
            dt = now - self._last[0]
            self.observe(dt, min(1.0, max(0.0, (busy - self._last[1]) / dt)))
        self._last = (now, busy)

    def observe(self, seconds: float, busy_share: float) -> None:
        self.samples.append((seconds, busy_share))
        self._i += 1
        self._fit()
        # the first probe after first_probe iterations, not at the start: pausing then would cost the
        # warm-up's fresh cases, and a store that fills up idles the producer anyway
        if self._probe_idle is not None:
            # a pause reaches the producer only at its next denoising step (Throttle.checkpoint) or after
            # the synthesis under way (placement, encoding, start-up have no steps), so the probe lasts
            # until probe_len iterations have actually run without the producer
            self._probe_idle += busy_share < 0.05
            if self._probe_idle >= self.probe_len:
                self._probe_idle = None
        else:
            k = self._i - self.first_probe
            if k >= 0 and k % self.probe_every == 0:
                self._probe_idle = 0
        self.throttle.set_duty(0.0 if self._probe_idle is not None else self.duty)

    def _fit(self) -> None:
        if len(self.samples) < 8:
            return
        t = np.asarray([s[0] for s in self.samples])
        f = np.asarray([s[1] for s in self.samples])
        if f.max() - f.min() < 0.3:  # not enough contrast between idle and busy iterations yet
            return
        # group means, not a least-squares line (a neighbour's burst during a probe tilted a fitted line to
        # intercepts of a tenth of the fastest idle iteration at load 8) and not medians (they drop the
        # slow tail where a niced producer's cost sits): the budget is on the mean iteration time
        idle, busy = f < 0.05, f > 0.3
        if idle.sum() < 3 or busy.sum() < 3:
            return
        plain = float(np.mean(t[idle]))
        b = float(np.mean(f[busy] * t[busy]))
        k = (float(np.mean(t[busy])) - plain) / b
        # the budget is a limit, not a target: the duty is set from k plus one standard error of the
        # difference of means, so on a noisy machine the producer stays under the budget instead of
        # around it (on an idle 2-core VM single fits of one producer's k ranged +14 % .. +55 %)
        se = float(np.sqrt(np.var(t[busy]) / busy.sum() + np.var(t[idle]) / idle.sum())) / b
        self.plain, self.cost = plain, min(0.999, max(0.0, k))
        self.cost_bound = min(0.999, max(0.0, k + se))
        self.slowdown = self.cost / (1.0 - self.cost)  # while synthesising all the time (d = 1)
        need = self.budget / ((1.0 + self.budget) * self.cost_bound) if self.cost_bound > 0 else 1.0
        self.duty = 1.0 if need >= 1.0 else max(self.min_duty, need)

    def estimated_overhead(self, last: int | None = None) -> float | None:
        """Mean extra iteration time over the window (or its ``last`` iterations, e.g. a benchmark's timed
        ones), as a share of the plain time (the budget's unit): ``k * mean(busy seconds) / plain``."""
        if self.slowdown is None or self.plain is None:
            return None
        recent = list(self.samples)[-last:] if last else list(self.samples)
        if not recent:
            return 0.0
        return self.cost * float(np.mean([sec * share for sec, share in recent])) / self.plain

    def summary(self) -> str:
        if self.slowdown is None:
            return (f"budget {100 * self.budget:g}%: still measuring ({len(self.samples)} iterations), "
                    f"producer duty {self.duty:.2f}")
        bound = self.cost_bound / (1.0 - self.cost_bound)
        return (f"budget {100 * self.budget:g}%: plain {self.plain:.3f} s/iter, +{100 * self.slowdown:.0f}% while "
                f"synthesising (at most +{100 * bound:.0f}%), producer duty {self.duty:.2f}, estimated overhead "
                f"{100 * (self.estimated_overhead() or 0):.1f}%")


def _producer_loop(factory_builder: Callable[[], CaseFactory], out_q: Any, stop: Any, crashed: Any, done: Any,
                   err_q: Any, counters: SharedCounters, seed: int, limit: int | None,
                   max_consecutive_failures: int, spool: str, nice: int = 0, stride: int = 1,
                   throttle: Throttle | None = None, batch: int = 1, ready: Any = None,
                   threads: int | None = None) -> None:
    """Runs in the producer process/thread: build the factory once, then keep the queue full
    (``batch`` > 1: ``factory.batch(seeds)`` makes that many cases in one generator call). ``ready`` is
    set once the factory is built; ``threads`` caps the process's torch/OpenMP threads."""
    factory = None
    try:
        if mp.current_process().name == "lesion-producer":  # own process: its priority and threads only
            if nice:
                os.nice(nice)  # on a shared CPU the training loop keeps priority; the producer uses idle time
            if threads:
                _limit_threads(int(threads))
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
        done.set()
    except BaseException:  # the consumer side re-raises this traceback in the training loop
        err_q.put(traceback.format_exc())
        crashed.set()
    finally:
        factory = None  # frees the generator (and its GPU memory) as soon as production ends
        _free_accelerator_memory()


def _limit_threads(n: int) -> None:
    """Cap torch's intra-op threads (and OpenMP's, if torch is not imported yet) in the producer process.
    A CPU generator with as many threads as cores competes with every thread of the training loop, and
    OpenMP threads spin between parallel regions, so a niced producer still costs the trainer time."""
    import sys

    os.environ["OMP_NUM_THREADS"] = str(n)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(n)


def _free_accelerator_memory() -> None:
    import gc
    import sys

    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


FAULT_ENV = "LESIONDIFFUSION_FAULT_FILE"


def record_fault(message: str) -> None:
    """Leave the cause of a fault in a data-loading worker where the training process finds it: the worker's
    own exception dies with it, and nnU-Net then only reports that its background workers are gone."""
    path = os.environ.get(FAULT_ENV)
    if not path:
        return
    try:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(" ".join(message.split()) + "\n")
    except OSError:
        pass


def exit_reason(code: int | None) -> str:
    """Words for a child process's exit code (a negative code is the signal that ended it)."""
    import signal

    if code is None or code >= 0:
        return f"exit code {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = f"signal {-code}"
    if -code == signal.SIGKILL:
        return f"killed by {name}: by hand (kill -9) or by the kernel when memory ran out"
    return f"ended by {name}"


def spool_base(spool_dir: str | os.PathLike | None = None) -> str:
    """The folder queued cases are spooled in: ``spool_dir`` (config ``store.spool_dir``), else ``/dev/shm``
    when writable (RAM, no disk traffic), else the system temp folder."""
    if spool_dir is not None:
        return os.path.expanduser(os.path.expandvars(str(spool_dir)))
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else tempfile.gettempdir()


def check_spool_space(base: str, need_bytes: int, what: str) -> None:
    """Refuse to start when the spool folder cannot hold the queued cases (a full /dev/shm otherwise kills
    the producer mid-epoch)."""
    free = shutil.disk_usage(base).free
    if free < need_bytes:
        raise LesionDiffusionError(
            f"The sample store needs about {need_bytes / 2**20:.0f} MiB in its spool folder {base} ({what}) but only "
            f"{free / 2**20:.0f} MiB are free. Set store.spool_dir in lesiondiffusion.yaml to a folder with more "
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


# ---------------------------------------------------------------------------------------------------
# offline cache

MANIFEST = "manifest.json"
_FORMAT = 1


def _case_paths(root: Path, index: int) -> tuple[Path, Path]:
    stem = f"synth_{index:06d}"
    return root / "cases" / f"{stem}.npz", root / "cases" / f"{stem}.json"


def save_case(path: Path, case: SyntheticCase) -> None:
    """Write a case as one .npz atomically (temp file + rename)."""
    props = {k: v for k, v in case.properties.items() if k != "class_locations"}
    locs = case.properties.get("class_locations", {})
    arrays = {"data": case.data.astype(np.float32, copy=False), "seg": case.seg.astype(np.int16, copy=False)}
    keys = []
    for i, (k, v) in enumerate(locs.items()):
        arrays[f"loc_{i}"] = np.asarray(v, dtype=np.int64).reshape(-1, case.seg.ndim)
        keys.append(list(k) if isinstance(k, tuple) else k)
    extra = json.dumps({"name": case.name, "properties": props, "loc_keys": keys, "meta": case.meta}, default=_jsonable)
    arrays["extra"] = np.frombuffer(extra.encode("utf-8"), dtype=np.uint8)
    with atomic_path(path, suffix=".npz") as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)


def load_case(path: Path) -> SyntheticCase:
    with np.load(path) as z:
        extra = json.loads(bytes(z["extra"]).decode("utf-8"))
        locs = {}
        for i, k in enumerate(extra["loc_keys"]):
            locs[tuple(k) if isinstance(k, list) else k] = z[f"loc_{i}"]
        props = dict(extra["properties"])
        props["class_locations"] = locs
        return SyntheticCase(extra["name"], z["data"], z["seg"], props, extra["meta"])


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count``: owns the case indices ``i`` with ``i % count == index``.

    Case ``i`` always has seed ``seed + i`` and its own file names, so N shards writing one cache folder
    never touch the same file and together produce exactly the cases one unsharded build would.
    """

    index: int = 0
    count: int = 1

    @classmethod
    def parse(cls, text: str) -> "Shard":
        try:
            k, n = (int(v) for v in str(text).split("/"))
        except ValueError:
            raise LesionDiffusionError(f"--shard {text!r}: write it as K/N, e.g. 0/4 for the first of 4 shards.") from None
        if n < 1 or not 0 <= k < n:
            raise LesionDiffusionError(f"--shard {text!r}: K must be in 0..N-1 and N >= 1 (e.g. 0/4 ... 3/4).")
        return cls(k, n)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> "Shard | None":
        """The shard of this process under ``torchrun`` (RANK / WORLD_SIZE), or None outside it."""
        env = dict(os.environ) if env is None else env
        if "RANK" not in env or "WORLD_SIZE" not in env:
            return None
        return cls.parse(f"{env['RANK']}/{env['WORLD_SIZE']}")

    def owns(self, index: int) -> bool:
        return index % self.count == self.index

    def quota(self, n: int) -> int:
        """Good cases this shard contributes to a cache of ``n``; the quotas of all shards sum to ``n``."""
        return len(range(self.index, n, self.count))

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def file_digest(path: str | os.PathLike, chunk: int = 1 << 20) -> tuple[int, str]:
    """``(size in bytes, sha256 hex)`` of one file, read in chunks."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while True:
            block = fh.read(chunk)
            if not block:
                break
            size += len(block)
            h.update(block)
    return size, h.hexdigest()


def folder_digest(folder: str | os.PathLike) -> str:
    """sha256 over every file of a folder (relative path + content, sorted): a bundle's identity by content,
    so a re-initialised or re-trained bundle at the same path is a different generator."""
    root = Path(folder)
    if root.is_file():
        return file_digest(root)[1]
    h = hashlib.sha256()
    for p in sorted(q for q in root.rglob("*") if q.is_file() and not q.name.startswith(".")):
        h.update(p.relative_to(root).as_posix().encode("utf-8") + b"\0")
        h.update(file_digest(p)[1].encode("ascii"))
    return h.hexdigest()


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out if out or not prefix else {prefix[:-1]: {}}
    return {prefix[:-1]: d}


def identity_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ between two cache identities, with both values (short)."""
    a, b = _flat(old), _flat(new)
    out = []
    for k in sorted(set(a) | set(b)):
        if a.get(k) != b.get(k):
            va, vb = repr(a.get(k, "<absent>")), repr(b.get(k, "<absent>"))
            out.append(f"{k}: {va[:70]} -> {vb[:70]}")
    return out


def case_is_intact(root: Path, info: dict[str, Any]) -> str | None:
    """Why a cached case file does not match the size and sha256 its sidecar recorded, or None.

    Caches written before sidecars carried hashes are checked by the zip CRCs instead."""
    npz = root / "cases" / info["file"]
    if not npz.is_file():
        return f"{npz} is missing"
    if "sha256" not in info:
        try:
            with zipfile.ZipFile(npz) as z:
                bad = z.testzip()
        except (OSError, zipfile.BadZipFile) as exc:
            return f"{npz} is unreadable ({exc})"
        return None if bad is None else f"{npz}: member {bad} is corrupt"
    if npz.stat().st_size != info.get("bytes"):
        return f"{npz} has {npz.stat().st_size} bytes, the manifest records {info.get('bytes')} (truncated or replaced)"
    if file_digest(npz)[1] != info["sha256"]:
        return f"{npz}: sha256 differs from the manifest's (the file was changed or damaged)"
    return None


class OfflineCache:
    """Build N synthetic cases on disk once: resumable, atomic, shardable, with a manifest of reports and seeds.

    Case ``i`` always uses seed ``seed + i`` and lives in ``cases/synth_{i:06d}.npz`` with a JSON
    sidecar written after it; a failed synthesis leaves ``failed/{i}.json``. A re-run skips every
    index that has a valid sidecar (or a failure record), so an interrupted build finishes without
    duplicates, and a half-written file never appears under a final name. With ``shard=Shard(k, N)``
    a process only works on its own indices until it has its quota of good cases; whichever shard
    finishes and finds ``n`` good cases in the folder writes the manifest (``verify`` does it too).
    """

    def __init__(self, root: str | os.PathLike, identity: dict[str, Any] | None = None) -> None:
        self.root = Path(root)
        self.identity = identity or {}
        self.damaged: list[str] = []  # cases whose file no longer matches its recorded size/sha256

    def _check_identity(self) -> None:
        path = self.root / "identity.json"
        if path.exists():
            old = json.loads(path.read_text())
            new = json.loads(json.dumps(self.identity, default=_jsonable))
            if old != new:
                changes = identity_changes(old, new)
                raise LesionDiffusionError(
                    f"{path}: this cache was built with different settings, so resuming would mix cases of two "
                    f"generators. Changed:\n  " + "\n  ".join(changes) +
                    "\nUse a new output folder, restore the old settings/bundle, or delete the old cache.")
        else:  # shards starting together all write the same content; the rename is atomic
            write_json(path, json.loads(json.dumps(self.identity, default=_jsonable)))

    def build(self, factory: CaseFactory | Callable[[], CaseFactory], n: int, *, seed: int = 0,
              progress: bool = True, lazy: bool = False, max_consecutive_failures: int = 50,
              shard: Shard | None = None) -> dict[str, Any] | None:
        """Synthesise until ``n`` good cases exist (this shard's quota of them with ``shard``);
        ``lazy=True`` means ``factory`` is a builder called only if work remains (so a finished cache
        needs no generator). Returns the manifest, or None when other shards still have work."""
        from tqdm import tqdm

        shard = shard or Shard()
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "cases").mkdir(exist_ok=True)
        (self.root / "failed").mkdir(exist_ok=True)
        for sub in ("cases", "failed"):  # a killed build's half-written temporaries (live builds' are kept)
            remove_stale_temporaries(self.root / sub, r"\.(synth_\d+\.(npz|json)|\d+\.json)\..+")
        self._check_identity()
        good = {i for i in self._valid_indices() if shard.owns(i)}
        # [0-9]*: a concurrent shard's temporary (.12.json.pid...json) is not a record yet
        failed = {int(p.stem) for p in (self.root / "failed").glob("[0-9]*.json")
                  if p.stem.isdigit() and shard.owns(int(p.stem))}
        quota = shard.quota(n)
        desc = "synthetic cases" + (f" (shard {shard})" if shard.count > 1 else "")
        bar = tqdm(total=quota, initial=min(len(good), quota), desc=desc, disable=not progress, unit="case")
        i, consecutive = shard.index, 0
        built = None
        while len(good) < quota:
            if i in good or i in failed:
                i += shard.count
                continue
            if built is None:
                built = factory() if lazy else factory
            case, reason = built(seed + i)
            if case is not None:
                reason = validate_case(case)
            if reason is not None:
                write_json(self.root / "failed" / f"{i}.json", {"index": i, "seed": seed + i, "reason": reason})
                failed.add(i)
                consecutive += 1
                if consecutive >= max_consecutive_failures:
                    raise SynthesisError(f"{consecutive} syntheses in a row failed (last: {reason}); the cache at "
                                         f"{self.root} keeps the {len(good)} finished cases of shard {shard}.")
            else:
                consecutive = 0
                npz, side = _case_paths(self.root, i)
                save_case(npz, case)
                nbytes, digest = file_digest(npz)
                write_json(side, {"index": i, "seed": seed + i, "file": npz.name, "bytes": nbytes, "sha256": digest,
                                  "name": case.name, "meta": json.loads(json.dumps(case.meta, default=_jsonable))})
                good.add(i)
                bar.update(1)
            i += shard.count
        bar.close()
        if shard.count > 1 and len(self._valid_indices()) < n:
            return None  # the last shard to finish sees all n cases and writes the manifest
        return self.write_manifest(n)

    def _valid_indices(self) -> set[int]:
        good = set()
        for side in (self.root / "cases").glob("synth_*.json"):
            try:
                info = json.loads(side.read_text())
                if info.get("file") != side.with_suffix(".npz").name:  # never follow a sidecar elsewhere
                    raise ValueError(f"file {info.get('file')!r}")
                problem = case_is_intact(self.root, info)
                if problem is None:
                    good.add(int(info["index"]))
                    continue
                log.warning("offline cache: %s; set aside in rejected/, the case is rebuilt", problem)
                self.damaged.append(problem)
                self._reject(side, self.root / "cases" / info["file"])
                continue
            except (ValueError, KeyError, OSError, TypeError):
                pass
            # a corrupt sidecar means the case is redone; set aside, never deleted (it may not be ours)
            log.warning("offline cache: %s is not a readable case record; set aside in rejected/", side)
            self._reject(side)
        return good

    def _reject(self, side: Path, npz: Path | None = None) -> None:
        rejected = self.root / "rejected"
        rejected.mkdir(exist_ok=True)
        side.replace(rejected / side.name)  # sidecar first: the index is no longer 'finished'
        if npz is not None and npz.exists():
            npz.replace(rejected / npz.name)

    def verify(self, n: int | None = None) -> tuple[dict[str, Any], list[str]]:
        """Load every finished case, move unreadable or invalid ones to ``rejected/`` (a re-run of the
        build redoes them) and write the manifest of the rest; returns (manifest, problems)."""
        identity = self.root / "identity.json"
        # identity.json is the first file `cache build` writes: without it (or a manifest) the folder is not
        # a cache, and verify would move or rewrite files some other program owns
        if not (self.root / "cases").is_dir() or not (identity.is_file() or (self.root / MANIFEST).is_file()):
            raise LesionDiffusionError(f"{self.root}: not an offline cache (no cases/ folder with the identity.json "
                                       "that 'lesiondiffusion cache build' writes); nothing was changed. Pass the "
                                       "folder 'cache build' wrote, or build one with 'lesiondiffusion cache build'.")
        if not self.identity and identity.is_file():
            try:
                self.identity = json.loads(identity.read_text())
            except (OSError, ValueError) as exc:
                raise LesionDiffusionError(f"{identity} is unreadable ({exc}); nothing was changed. Rebuild the cache "
                                           "with 'lesiondiffusion cache build' into a new folder.") from None
        problems = []
        for idx in sorted(self._valid_indices()):  # damaged files are dropped here (self.damaged)
            npz, side = _case_paths(self.root, idx)
            try:
                reason = validate_case(load_case(npz))
            except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
                reason = f"unreadable ({type(exc).__name__}: {exc})"
            if reason is not None:
                problems.append(f"{npz.name}: {reason}")
                self._reject(side, npz)
        return self.write_manifest(n), self.damaged + problems

    def write_manifest(self, n: int | None = None) -> dict[str, Any]:
        cases = []
        for idx in sorted(self._valid_indices()):
            _, side = _case_paths(self.root, idx)
            cases.append(json.loads(side.read_text()))
        if n is not None:
            cases = cases[:n]
        failures = [json.loads(p.read_text()) for p in sorted((self.root / "failed").glob("[0-9]*.json"))
                    if p.stem.isdigit()]
        manifest = {"format": _FORMAT, "identity": self.identity, "n_cases": len(cases), "cases": cases,
                    "failures": failures}
        write_json(self.root / MANIFEST, json.loads(json.dumps(manifest, default=_jsonable)))
        return manifest


class OfflineCacheReader:
    """Serves cases of a built cache at random (no generator, no producer); counts draws as hits."""

    def __init__(self, root: str | os.PathLike, counters: SharedCounters | None = None,
                 expect: dict[str, Any] | None = None) -> None:
        self.root = Path(root)
        path = self.root / MANIFEST
        if not path.is_file():
            if any((self.root / "cases").glob("synth_*.npz")):
                raise LesionDiffusionError(
                    f"The offline cache at {self.root} has cases but no {MANIFEST}: a sharded build has not finished. "
                    f"Finish every shard (re-run its 'lesiondiffusion cache build --shard K/N'), or write the manifest "
                    f"of the cases there with 'lesiondiffusion cache verify {self.root}'.")
            raise LesionDiffusionError(
                f"No offline cache at {self.root} ({MANIFEST} missing). Build it with 'lesiondiffusion cache build "
                "--config CFG --dataset DATASET -n N', or set mode: online.")
        manifest = json.loads(path.read_text())
        if not manifest.get("cases"):
            raise LesionDiffusionError(f"{path}: the cache holds no cases; rebuild it with 'lesiondiffusion cache build'.")
        for key, value in (expect or {}).items():
            have = manifest.get("identity", {}).get(key)
            if have != value:
                raise LesionDiffusionError(
                    f"{path}: identity key '{key}' is {have!r} but training uses {value!r}; rebuild the cache for "
                    "these plans/configuration with 'lesiondiffusion cache build'.")
        self.files = [self.root / "cases" / c["file"] for c in manifest["cases"]]
        self.records = {f: c for f, c in zip(self.files, manifest["cases"])}
        for f, c in self.records.items():  # sizes now (cheap); hashes on each read, below
            if not f.is_file() or ("bytes" in c and f.stat().st_size != c["bytes"]):
                raise self._damaged(case_is_intact(self.root, c) or f"{f} is damaged")
        self.manifest = manifest
        self.counters = counters or SharedCounters()

    def _damaged(self, problem: str) -> LesionDiffusionError:
        err = LesionDiffusionError(
            f"Offline cache {self.root}: {problem}. Run 'lesiondiffusion cache verify {self.root}' (sets damaged "
            "cases aside) and re-run the same 'lesiondiffusion cache build' to rebuild them.")
        record_fault(str(err))
        return err

    def draw(self) -> SyntheticCase:
        path = self.files[int(np.random.randint(len(self.files)))]
        record = self.records[path]
        data = path.read_bytes()
        if "sha256" in record and (len(data) != record.get("bytes") or hashlib.sha256(data).hexdigest() != record["sha256"]):
            raise self._damaged(f"{path}: size or sha256 differs from the manifest (changed or damaged since the build)")
        case = load_case(BytesIO(data))
        self.counters.add(FRESH)
        return case
