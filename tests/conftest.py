"""Shared test fixtures: seeds, thread limits and the real CT example from ../shared."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_CT = REPO_ROOT.parent / "shared" / "data" / "ct" / "totalsegmentator_example"
# benchmarks/toydata.py (the toy pretraining dataset several tests build on) is not installed with the package
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))


@pytest.fixture(autouse=True, scope="session")
def _limit_threads():
    # CI has 2 cores; oversubscribed BLAS/torch threads make tiny tests slower, not faster
    import torch

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    yield


@pytest.fixture(autouse=True)
def _fresh_catalog_state():
    """Each test starts with the catalog state of a fresh process. The organ registry (organs and synonyms
    declared by catalogs) and ``use_catalog_dirs`` folders live for the rest of a process, which is right
    for one command but lets one test's catalogs leak into the next (a catalog path set by ``monkeypatch``
    is gone after its test, what its catalogs declared was not). Parsed catalogs are cached per file, so
    the cache is cleared too: a catalog read again declares its organs again."""
    from lesiondiffusion import catalog, vocabulary

    organs, dirs = dict(vocabulary._DECLARED_ORGANS), list(catalog._EXTRA_DIRS)
    yield
    vocabulary._DECLARED_ORGANS.clear()
    vocabulary._DECLARED_ORGANS.update(organs)
    catalog._EXTRA_DIRS[:] = dirs
    catalog._load_cached.cache_clear()


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture(scope="session")
def shared_ct_dir() -> Path:
    if not (SHARED_CT / "example_ct_sm.nii.gz").exists():
        pytest.skip(f"real CT example not found at {SHARED_CT} (../shared is absent)")
    return SHARED_CT
