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
    SyntheticCase,
    load_case,
    save_case,
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
