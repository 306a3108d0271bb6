"""How much of the machine the producer may use: ``Throttle`` (a duty cycle in shared memory, obeyed by
the producer) and ``ThrottleController`` (the trainer side, which sets the duty to keep training within a
time budget)."""

from __future__ import annotations

import multiprocessing as mp
import time
from collections import deque
from typing import Any

import numpy as np


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
        # around it (on an idle 2-core VM single fits of one producer's k ranged +14 % .. +60 %)
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
