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


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture(scope="session")
def shared_ct_dir() -> Path:
    if not (SHARED_CT / "example_ct_sm.nii.gz").exists():
        pytest.skip(f"real CT example not found at {SHARED_CT} (../shared is absent)")
    return SHARED_CT
