"""Sample store: bounded producer, reuse limit, hit/miss counters, dropped NaNs, crash traceback,
and the offline cache (resumable, atomic, no duplicates)."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from lesiondiffusion.store import (
    OfflineCache,
    OfflineCacheReader,
    ProducerCrashed,
    SampleStore,
    Shard,
    ThrottleController,
    SyntheticCase,
    load_case,
    save_case,
    validate_case,
)


def _case(seed: int, nan: bool = False) -> SyntheticCase:
    rng = np.random.default_rng(seed)
    data = rng.standard_normal((1, 6, 6, 6)).astype(np.float32)
    if nan:
        data[0, 1, 1, 1] = np.nan
    seg = np.zeros((1, 6, 6, 6), np.int16)
    seg[0, 2:4, 2:4, 2:4] = 1
    locs = {1: np.argwhere(seg > 0)}
    return SyntheticCase(f"s{seed}", data, seg, {"class_locations": locs}, {"seed": seed, "report": {"x": 1}})


class FakeFactory:
    """Picklable stand-in for the synthetic-case factory (runs in the spawned producer too)."""

    def __init__(self, nan_every: int = 0, crash_at: int | None = None, fail_all: bool = False,
                 interrupt_at: int | None = None) -> None:
        self.nan_every, self.crash_at, self.fail_all, self.interrupt_at = nan_every, crash_at, fail_all, interrupt_at
        self.calls = 0

    def build(self) -> "FakeFactory":
        return self

    def __call__(self, seed: int):
        self.calls += 1
        if self.crash_at is not None and seed >= self.crash_at:
            raise ValueError(f"generator exploded at seed {seed}")
        if self.interrupt_at is not None and seed == self.interrupt_at:
            raise KeyboardInterrupt
        if self.fail_all:
            return None, "no placement: organ absent"
        return _case(seed, nan=bool(self.nan_every) and seed % self.nan_every == 1), None


def test_reuse_limit_and_counters_thread_mode():
    store = SampleStore(FakeFactory().build, size=3, reuse=2, worker="thread", seed=100).start()
    try:
        assert store.wait_for(3, 10) >= 3
        client = store.client(pool_size=8, on_miss="real")
        seen: dict[str, int] = {}
        for _ in range(40):
            case = client.draw()
            if case is not None:
                seen[case.name] = seen.get(case.name, 0) + 1
        assert seen and max(seen.values()) <= 2  # each case used at most `reuse` times
        stats = store.stats()
        assert stats.fresh == len(seen)
        assert stats.fresh + stats.reused + stats.missed == 40
        assert 0 < stats.hit_rate <= 1
        store.check()
    finally:
        store.close()


def test_empty_store_is_a_miss_not_a_wait():
    store = SampleStore(FakeFactory(fail_all=True).build, size=2, reuse=1, worker="thread",
                        max_consecutive_failures=10**9).start()
    try:
        client = store.client(on_miss="real")
        t = time.monotonic()
        assert client.draw() is None
        assert time.monotonic() - t < 0.5
        assert store.stats().missed == 1
    finally:
        store.close()


def test_nan_cases_dropped_and_counted():
    store = SampleStore(FakeFactory(nan_every=2).build, size=4, reuse=1, worker="thread", seed=0).start()
    try:
        store.wait_for(4, 10)
        client = store.client()
        got = [client.draw() for _ in range(4)]
        assert all(c is not None and np.isfinite(c.data).all() for c in got)
        assert store.stats().failed >= 2
    finally:
        store.close()


def test_crashed_producer_raises_its_traceback_process_mode():
    store = SampleStore(FakeFactory(crash_at=3).build, size=8, reuse=1, worker="process", seed=0).start()
    try:
        with pytest.raises(ProducerCrashed, match="generator exploded at seed 3"):
            store.wait_for(100, 60)
        # the consumer is never left waiting on a dead producer
        client = store.client(on_miss="wait")
        for _ in range(10):
            if client.draw() is None:
                break
        else:
            pytest.fail("wait-mode client kept returning cases after the crash")
    finally:
        store.close()


def test_persistent_failures_stop_the_producer_with_reasons():
    store = SampleStore(FakeFactory(fail_all=True).build, size=2, worker="thread", max_consecutive_failures=5).start()
    try:
        with pytest.raises(ProducerCrashed, match="organ absent"):
            store.wait_for(1, 10)
    finally:
        store.close()


def test_refresh_once_recycles_without_limit_and_process_mode_delivers():
    store = SampleStore(FakeFactory().build, size=2, reuse=1, refresh="once", worker="process", seed=5).start()
    try:
        assert store.wait_for(2, 60) == 2
        client = store.client(on_miss="wait")
        # a multiprocessing queue hands an item over through a feeder thread, so a case the producer
        # has counted can still be in flight; the client reuses s5 meanwhile (it never waits while it
        # holds a reusable case), and s6 must arrive within a few seconds
        names: list[str] = []
        deadline = time.monotonic() + 10
        while len(names) < 10 or ("s6" not in names and time.monotonic() < deadline):
            names.append(client.draw().name)
        assert set(names) == {"s5", "s6"}
        assert store.stats().produced == 2
    finally:
        store.close()
    import os

    assert not os.path.exists(store.spool)


def test_case_roundtrip_keeps_class_locations(tmp_path):
    case = _case(3)
    save_case(tmp_path / "c.npz", case)
    back = load_case(tmp_path / "c.npz")
    np.testing.assert_array_equal(back.data, case.data)
    np.testing.assert_array_equal(back.seg, case.seg)
    np.testing.assert_array_equal(back.properties["class_locations"][1], case.properties["class_locations"][1])
    assert back.meta == case.meta


def test_offline_cache_interrupted_build_finishes_without_duplicates(tmp_path):
    root = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        OfflineCache(root, {"plans": "p"}).build(FakeFactory(interrupt_at=3, nan_every=5).build, 6, seed=0,
                                                 progress=False, lazy=True)
    done_before = sorted(p.name for p in (root / "cases").glob("*.npz"))
    assert done_before == ["synth_000000.npz", "synth_000002.npz"]  # seed 1 was NaN -> failed record
    # simulate a crash in the middle of writing: a stray temp file and a sidecar without its case
    (root / "cases" / ".synth_000004.npz.abc.npz").write_bytes(b"partial")
    (root / "cases" / "synth_000009.json").write_text("{not json")
    factory = FakeFactory(nan_every=5)
    manifest = OfflineCache(root, {"plans": "p"}).build(factory.build, 6, seed=0, progress=False, lazy=True)
    assert manifest["n_cases"] == 6
    idx = [c["index"] for c in manifest["cases"]]
    assert len(idx) == len(set(idx)) == 6 and 1 not in idx and 6 not in idx  # NaN seeds 1 and 6 skipped
    assert {f["index"] for f in manifest["failures"]} == {1, 6}
    assert all(c["seed"] == c["index"] and c["meta"]["report"] for c in manifest["cases"])
    assert factory.calls == 5  # only the missing indices 3..7 were synthesised (6 failed)
    on_disk = json.loads((root / "manifest.json").read_text())
    assert on_disk["n_cases"] == 6
    # a finished cache re-runs without loading any generator
    OfflineCache(root, {"plans": "p"}).build(lambda: pytest.fail("generator built"), 6, progress=False, lazy=True)
    reader = OfflineCacheReader(root, expect={"plans": "p"})
    case = reader.draw()
    assert case.seg.max() == 1 and np.isfinite(case.data).all()
    with pytest.raises(Exception, match="identity key 'plans'"):
        OfflineCacheReader(root, expect={"plans": "other"})
    with pytest.raises(Exception, match="different settings"):
        OfflineCache(root, {"plans": "other"}).build(factory.build, 6, progress=False, lazy=True)


def test_missing_cache_names_the_fix(tmp_path):
    with pytest.raises(Exception, match="lesiondiffusion cache build"):
        OfflineCacheReader(tmp_path / "nope")


def _build_shard(root: str, shard: str, n: int) -> None:
    # runs in a spawned process: one shard of a sharded build, as `cache build --shard K/N` does
    OfflineCache(root, {"plans": "p"}).build(FakeFactory(nan_every=5).build, n, seed=0, progress=False, lazy=True,
                                             shard=Shard.parse(shard))


def test_two_processes_fill_one_sharded_cache_then_verify(tmp_path):
    """Two processes build shards 0/2 and 1/2 of one cache at the same time: no index twice, each
    case's seed is seed + index, failures are skipped inside each shard, and the manifest lists all n."""
    import multiprocessing as mp

    root = tmp_path / "cache"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_build_shard, args=(str(root), f"{k}/2", 7)) for k in range(2)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(60)
        assert proc.exitcode == 0
    manifest = json.loads((root / "manifest.json").read_text())
    idx = [c["index"] for c in manifest["cases"]]
    assert manifest["n_cases"] == 7 and len(set(idx)) == 7
    assert all(c["seed"] == c["index"] for c in manifest["cases"])
    assert {f["index"] for f in manifest["failures"]} == {1, 6}  # NaN seeds, replaced within their own shard
    assert sorted(idx) == [0, 2, 3, 4, 5, 7, 8]
    assert sum(i % 2 == 0 for i in idx) == Shard(0, 2).quota(7) == 4
    # resuming a finished shard loads no generator
    assert OfflineCache(root, {"plans": "p"}).build(lambda: pytest.fail("generator built"), 7, progress=False,
                                                     lazy=True, shard=Shard(1, 2))["n_cases"] == 7
    # a shard that finishes first leaves no manifest; verify sets a damaged case aside and writes one
    (root / "manifest.json").unlink()
    with pytest.raises(Exception, match="cache verify"):
        OfflineCacheReader(root)
    bad = root / "cases" / manifest["cases"][0]["file"]
    bad.write_bytes(b"PK\x03\x04 truncated")
    manifest, problems = OfflineCache(root).verify()
    assert len(problems) == 1 and bad.name in problems[0] and (root / "rejected" / bad.name).is_file()
    assert manifest["n_cases"] == 6 and manifest["identity"] == {"plans": "p"}
    assert OfflineCacheReader(root, expect={"plans": "p"}).draw().seg.max() == 1


def test_shard_parsing_names_the_fix():
    assert Shard.parse("1/4") == Shard(1, 4) and [Shard(k, 3).quota(7) for k in range(3)] == [3, 2, 2]
    assert Shard.from_env({"RANK": "2", "WORLD_SIZE": "3"}) == Shard(2, 3) and Shard.from_env({}) is None
    for bad in ("4/4", "x", "1/0"):
        with pytest.raises(Exception, match="K/N|0..N-1"):
            Shard.parse(bad)


class SlowFactory:
    """Each synthesis takes ``seconds`` of wall time (a stand-in for a generator on a shared device)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def build(self) -> "SlowFactory":
        return self

    def __call__(self, seed: int):
        time.sleep(self.seconds)
        return _case(seed), None


def test_throttle_controller_fits_plain_time_and_sets_duty_to_the_budget():
    """Iterations slow down by 100 % while the producer works (it takes k = 1/2 of training's time per busy
    second): a 5 % budget allows a duty of 0.05 / (1.05 k) = 0.095; a producer that costs less than the
    budget runs unthrottled. Every probe_every iterations it is paused."""
    from lesiondiffusion.store import Throttle

    rng = np.random.default_rng(0)
    for slowdown, want in ((1.0, 0.0952), (0.02, 1.0)):
        throttle = Throttle()
        ctl = ThrottleController(throttle, 0.05, probe_every=50, probe_len=3, first_probe=50)
        duties = []
        for i in range(120):
            # a paused producer finishes the synthesis under way first: the probe waits for idle iterations
            f = 0.0 if throttle.duty == 0.0 and i not in (50, 100) else float(rng.uniform(0.1, 1.0))
            k = slowdown / (1 + slowdown)  # busy share f of an iteration of t seconds: t = 0.1 + k f t
            ctl.observe(0.1 / (1 - k * f) + rng.normal(0, 0.002), f)
            duties.append(throttle.duty)
        assert ctl.plain == pytest.approx(0.1, rel=0.05) and ctl.slowdown == pytest.approx(slowdown, rel=0.2, abs=0.02)
        assert ctl.duty == pytest.approx(want, rel=0.2)
        assert [i for i, d in enumerate(duties) if d == 0.0] == [49, 50, 51, 52, 99, 100, 101, 102]  # probes
        assert duties[103] == pytest.approx(want, rel=0.2)
        assert "budget 5%" in ctl.summary()


def test_producer_obeys_the_duty_cycle():
    store = SampleStore(SlowFactory(0.02).build, size=1000, reuse=1, worker="thread", seed=0)
    store.throttle.set_duty(0.0)
    store.start()
    try:
        time.sleep(0.3)
        assert store.stats().produced == 0  # paused: nothing synthesised
        store.throttle.set_duty(0.5)
        b0, t0 = store.throttle.busy_seconds(), time.monotonic()
        time.sleep(1.0)
        share = (store.throttle.busy_seconds() - b0) / (time.monotonic() - t0)
        assert 0.2 < share < 0.8 and store.stats().produced > 2  # loose: shared, oversubscribed CI machine
    finally:
        store.close()


class BatchFactory(FakeFactory):
    """Records the seed groups it was asked for in one call (the producer's batch)."""

    def __init__(self) -> None:
        super().__init__(nan_every=4)
        self.groups: list[list[int]] = []

    def batch(self, seeds):
        self.groups.append(list(seeds))
        return [self(s) for s in seeds]


def test_producer_batches_seeds_per_generator_call():
    factory = BatchFactory()
    store = SampleStore(factory.build, size=6, reuse=1, worker="thread", seed=10, stride=3, batch=3).start()
    try:
        assert store.wait_for(6, 10) >= 6
    finally:
        store.close()
    assert factory.groups[:2] == [[10, 13, 16], [19, 22, 25]]  # the rank stride holds inside a batch
    assert store.stats().failed >= 2  # NaN seeds 13 and 25 are dropped one by one, their batch-mates kept


def test_pause_takes_effect_between_denoising_steps():
    """A synthesis far longer than a training iteration must not run through a pause: the producer hooks
    the throttle into the generator's step callback, so busy time stops growing within one step."""
    import threading

    from lesiondiffusion.store import Throttle

    throttle, stop = Throttle(), threading.Event()
    steps_done: list[int] = []

    def long_synthesis() -> None:  # 200 steps of 10 ms: one "synthesis" of ~2 s
        throttle.start(stop)
        for i in range(200):
            time.sleep(0.01)
            steps_done.append(i)
            throttle.checkpoint(stop)
        throttle.end(stop)

    t = threading.Thread(target=long_synthesis)
    t.start()
    try:
        time.sleep(0.2)
        throttle.set_duty(0.0)
        time.sleep(0.1)
        b0, n0 = throttle.busy_seconds(), len(steps_done)
        time.sleep(0.4)
        assert throttle.busy_seconds() - b0 < 0.02 and len(steps_done) - n0 == 0  # paused mid-synthesis
        throttle.set_duty(1.0)
        time.sleep(0.2)
        assert len(steps_done) > n0 and throttle.busy_seconds() > b0  # and resumes where it stopped
    finally:
        throttle.set_duty(1.0)
        stop.set()
        t.join()
    assert len(steps_done) == 200


def test_an_empty_label_is_a_fault_unless_the_case_is_a_no_lesion_control():
    case = _case(1)
    case.seg[:] = 0
    assert validate_case(case) == "no lesion voxels in the synthetic label"
    case.meta["inpainted"] = False  # written by the trainer's factory for the no_lesion control only
    assert validate_case(case) is None
    case.data[0, 0, 0, 0] = np.nan
    assert validate_case(case) is not None  # the control's cases are checked like any other
