"""Reports derived from images: measure a lesion mask against its CT and organ map, and choose each
report attribute by one documented threshold table (``THRESHOLDS``), recording the measured value.

Owns ``measure_extent_mm`` (the lesion extent through the affine, shared with ``pretrain check``),
``derive_reports`` (one report per connected lesion component) and the threshold table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from scipy import ndimage

from .errors import LesionDiffusionError


def measure_extent_mm(mask: np.ndarray, affine: np.ndarray) -> tuple[float, float, float]:
    """Extent in mm of a lesion mask along the world x, y, z axes (voxel centres' span plus one voxel's
    extent along each world axis), the convention of a report's ``size_mm``."""
    idx = np.argwhere(np.asarray(mask, bool))
    if len(idx) == 0:
        return (0.0, 0.0, 0.0)
    m = np.asarray(affine, dtype=np.float64)[:3, :3]
    world = idx @ m.T
    voxel = np.abs(m).sum(axis=1)  # a voxel's extent along each world axis
    return tuple(float(v) for v in (world.max(axis=0) - world.min(axis=0) + voxel))  # type: ignore[return-value]
