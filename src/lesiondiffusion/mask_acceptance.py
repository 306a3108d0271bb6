"""Mask acceptance: LMNet's sample becomes a binary lesion mask on the input grid, or the reason it is
unusable (then the pipeline redraws it with new noise, up to ``SynthesisConfig.max_retries`` times).

The checks, in order: finite values; enough of LMNet's own mask in (or hugging) its organ; clipped to
the box (and to the organ for lesions that must stay inside it); the largest component; a volume of at
least ``min_volume_fraction`` of the report's ellipsoid; the placement rule's organ fraction.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
from scipy import ndimage

from .geometry import CropGeometry
from .placement import organ_fraction_rule

# Placement categories whose lesion must stay inside the organ (the mask is clipped to it); the others
# may leave the organ but must overlap it as ``placement.organ_fraction_rule`` says (the same rule
# placement applied to the box).
INSIDE_ORGAN = ("within_parenchyma", "lumen")


def accept_mask(it: Any, sample: np.ndarray, organs: Any, config: Any) -> str | None:
    """Binary mask on the input grid from LMNet's sample (set on ``it.mask`` with its measures in
    ``it.info``), or the reason it is unusable. ``it`` is the pipeline's per-lesion item, ``config`` its
    ``SynthesisConfig``."""
    if not np.isfinite(sample).all():
        return "LMNet produced NaN/inf values (check the bundle weights)"
    geo, region, box = it.geometry, it.region, it.box
    assert geo is not None and region is not None
    mask = sample_to_grid(geo, region, sample, config.mask_threshold)
    in_box = np.zeros(mask.shape, dtype=bool)
    in_box[tuple(slice(l - s.start, h - s.start) for l, h, s in zip(box.lo, box.hi, region))] = True
    organ = np.isin(organs.labels[region], organs.ids(box.organ_names))
    raw = int(mask.sum())
    # share of LMNet's own mask (before the box and organ clipping below) inside the organ
    raw_organ_fraction = float((mask & organ).sum()) / raw if raw else 0.0
    if raw:
        in_organ = mask_in_organ_fraction(mask, organ, config.organ_margin_vox)
        it.info["mask_in_organ_fraction"] = in_organ
        if in_organ < config.min_mask_in_organ:
            near = f" or within {config.organ_margin_vox} voxel(s) of it" if config.organ_margin_vox else ""
            return (f"only {in_organ:.0%} of the generated mask lies in {box.organ_names}{near} "
                    f"(needs >= {config.min_mask_in_organ:.0%}, SynthesisConfig.min_mask_in_organ)")
    mask &= in_box
    inside = box.category in INSIDE_ORGAN
    if inside:
        mask &= organ
    if not mask.any():
        return "empty mask" + (" inside the box and organ" if raw else "")
    labels, n = ndimage.label(mask)
    if n > 1:  # the component that overlaps the box most (all of it is in the box now: the largest)
        sizes = np.bincount(labels.ravel())[1:]
        mask = labels == (int(np.argmax(sizes)) + 1)
    vox_ml = float(np.prod(organs.spacing)) / 1000.0
    volume_ml = float(mask.sum()) * vox_ml
    sx, sy, sz = it.report.size_mm
    expected_ml = math.pi / 6 * sx * sy * sz / 1000.0
    if volume_ml < config.min_volume_fraction * expected_ml:
        return (
            f"mask volume {volume_ml:.3f} ml is below {config.min_volume_fraction:g} x the report's "
            f"{expected_ml:.3f} ml ({list(it.report.size_mm)} mm)"
        )
    organ_fraction = float((mask & organ).sum()) / float(mask.sum())
    spec = it.catalog.placement
    if config.min_organ_fraction is not None:
        spec = dataclasses.replace(spec, min_organ_fraction=config.min_organ_fraction)
    problem = organ_fraction_rule(box.category, organ_fraction, spec)
    if problem is not None:
        return f"mask: {problem.replace('lies in the organ', f'lies in {box.organ_names}')}"
    it.mask = mask
    it.info.update(mask_volume_ml=volume_ml, expected_volume_ml=expected_ml, organ_fraction=organ_fraction,
                   raw_organ_fraction=raw_organ_fraction, attempts=it.attempts)
    return None


def mask_in_organ_fraction(mask: np.ndarray, organ: np.ndarray, margin_vox: int) -> float:
    """Share of ``mask`` inside ``organ`` grown by ``margin_vox`` voxels (face connectivity): the single
    in-organ measure of ``SynthesisConfig.min_mask_in_organ`` for every placement kind."""
    n = int(mask.sum())
    if n == 0:
        return 0.0
    near = ndimage.binary_dilation(organ, iterations=margin_vox) if margin_vox > 0 and organ.any() else organ
    return float((mask & near).sum()) / n


def sample_to_grid(geo: CropGeometry, region: tuple[slice, ...], sample: np.ndarray, threshold: float = 0.0) -> np.ndarray:
    """LMNet's sample (values in [-1, 1] on its crop) -> binary mask on the input voxels of ``region``.

    The sample is resampled as a continuous field and thresholded on the input grid, not binarised
    first: at a coarse synthesis spacing (large lesions) a binarised mask would come back as a staircase
    of coarse voxels (a ball at 3x the spacing: sphericity 0.93 instead of 0.99)."""
    full = np.full(geo.image_size, -1.0, dtype=np.float32)
    full[geo.mask_slices()] = np.clip(sample, -1.0, 1.0)
    return geo.back(full, region, order=1, cval=-1.0) > threshold
