"""Lesions in the procedural phantoms: each one follows a report sampled from its catalog (shape, margin,
density and heterogeneity in the catalog's HU range, specific features, size fitted to the phantom organ,
location category through the real placement rules).

Used by ``phantoms.make_phantom`` (which re-exports the names tests use); imports nothing of ``phantoms``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage

from .catalog import Catalog, load_catalog
from .errors import CatalogError, LesionDiffusionError
from .organs import TOTALSEG_V2, OrganMap
from .placement import LesionBox, NoPlacement, place_lesion
from .report import LesionReport, normalize_value

# the two contrast phases a phantom (and its lesions' HU ranges) can be in
ENHANCED = "enhanced CT"
NON_CONTRAST = "non-contrast CT"


def _voxel_radii(size_mm: Sequence[float], spacing: Sequence[float]) -> np.ndarray:
    return np.maximum(np.asarray(size_mm, float) / 2.0 / np.asarray(spacing, float), 0.75)


def _ellipsoid_vox(shape, centre, radii) -> np.ndarray:
    idx = np.ogrid[tuple(slice(0, n) for n in shape)]
    d = sum(((g - c) / r) ** 2 for g, c, r in zip(idx, centre, radii))
    return d <= 1.0


def _perturb(mask: np.ndarray, rng: np.random.Generator, amount: float) -> np.ndarray:
    """Roughen a mask's boundary with smooth noise on its signed distance (amount ~ radius share)."""
    if not mask.any():
        return mask
    inside = ndimage.distance_transform_edt(mask)
    outside = ndimage.distance_transform_edt(~mask)
    sdf = inside - outside
    scale = max(1.0, float(inside.max()))
    noise = ndimage.gaussian_filter(rng.standard_normal(mask.shape).astype(np.float32), 1.5)
    noise /= max(float(noise.std()), 1e-6)
    out = sdf + amount * scale * noise > 0
    return out if out.any() else mask


def _lesion_mask(box: "LesionBox", organ_mask: np.ndarray, body: np.ndarray, spacing, rng) -> np.ndarray:
    """Binary lesion mask whose morphology follows the report's shape and location."""
    rep = box.report
    shape = organ_mask.shape
    radii = _voxel_radii(box.size_mm, spacing)
    centre = np.asarray(box.center_vox, float)
    shp = rep.shape
    if shp == "irregular":
        # a core with off-centre lobes and a noisy boundary: clearly less spherical and convex
        mask = _ellipsoid_vox(shape, centre, radii * 0.65)
        for _ in range(int(rng.integers(4, 8))):
            off = rng.normal(0, 0.45, 3) * radii
            mask |= _ellipsoid_vox(shape, centre + off, radii * rng.uniform(0.3, 0.5))
        mask = _perturb(mask, rng, 0.45)
    elif shp == "lobulated":
        mask = np.zeros(shape, bool)
        for _ in range(int(rng.integers(3, 6))):
            off = rng.normal(0, 0.3, 3) * radii
            mask |= _ellipsoid_vox(shape, centre + off, radii * rng.uniform(0.5, 0.7))
    elif shp == "patchy":
        mask = _perturb(_ellipsoid_vox(shape, centre, radii), rng, 0.9)
    elif shp == "nodular":
        mask = _ellipsoid_vox(shape, centre, radii * 0.8)
        for _ in range(int(rng.integers(0, 3))):
            off = rng.normal(0, 0.6, 3) * radii
            mask |= _ellipsoid_vox(shape, centre + off, radii * 0.35)
    elif shp in ("irregular wall thickening", "luminal narrowing"):
        # thickened wall: organ voxels close to the organ boundary, within the lesion region;
        # narrowing covers the whole circumference of the segment
        depth_vox = max(1.5, 0.35 * float(np.min(radii)))
        inner = ndimage.distance_transform_edt(organ_mask)
        region = _ellipsoid_vox(shape, centre, radii * (1.4 if shp == "luminal narrowing" else 1.0))
        mask = organ_mask & (inner <= depth_vox) & region
        if shp == "irregular wall thickening":
            mask &= _perturb(region, rng, 0.5) | (inner <= 1)
        if mask.sum() < 0.25 * (region & organ_mask).sum():
            # the box sits deep in the lumen (location "within the lumen"): an intraluminal mass
            mask = region & organ_mask
    elif shp == "protrusion into the lumen":
        # polypoid mass growing from the wall into the lumen
        mask = _ellipsoid_vox(shape, centre, radii) & organ_mask
    else:  # round-like, oval, cystic: the box extent per axis already carries the elongation
        mask = _ellipsoid_vox(shape, centre, radii)
    if "spiculated" in rep.specific_features:
        for _ in range(int(rng.integers(5, 10))):
            direction = rng.normal(size=3)
            direction /= np.linalg.norm(direction) + 1e-9
            for t in np.linspace(0.8, 1.6, 6):
                p = np.round(centre + direction * radii * t).astype(int)
                if all(0 <= p[i] < shape[i] for i in range(3)):
                    mask[tuple(p)] = True
    if box.category in ("within_parenchyma", "lumen", "wall"):
        mask &= organ_mask
    mask &= body
    lo, hi = np.asarray(box.lo), np.asarray(box.hi)
    clip = np.zeros(shape, bool)
    pad = 2
    clip[tuple(slice(max(0, a - pad), min(n, b + pad)) for a, b, n in zip(lo, hi, shape))] = True
    mask &= clip
    if not mask.any():
        c = np.clip(np.round(centre).astype(int), 0, np.asarray(shape) - 1)
        mask[tuple(c)] = True
    return mask


def _paint_lesion(ct: np.ndarray, mask: np.ndarray, report: "LesionReport", catalog: "Catalog",
                  spacing, rng: np.random.Generator, texture_hu: float) -> None:
    """Write lesion intensities into the clean CT from the catalog's HU range for its density."""
    lo, hi = catalog.hu_range(report.density, report.enhancement)
    lo, hi = float(min(lo, hi)), float(max(lo, hi))
    mean = float(rng.uniform(lo + 0.25 * (hi - lo), hi - 0.25 * (hi - lo))) if hi > lo else lo
    vals = np.full(ct.shape, mean, np.float32)
    heterogeneous = "heterogeneous" in report.density_variations or "mixed" in report.density
    if heterogeneous:
        field_ = ndimage.gaussian_filter(rng.standard_normal(ct.shape).astype(np.float32), 1.2)
        field_ /= max(float(field_[mask].std()) if mask.any() else 1.0, 1e-6)
        vals += field_ * max((hi - lo) / 4.0, 10.0)
    else:
        vals += texture_hu * 0.3 * rng.standard_normal(ct.shape).astype(np.float32)
    if "ring" in report.density:
        rim = mask & ~ndimage.binary_erosion(mask)
        vals[rim] = hi
    feats = report.specific_features
    interior = ndimage.binary_erosion(mask) if mask.sum() > 20 else mask
    coords = np.argwhere(interior)
    if len(coords) and ("decreased" in feats or "increased" in feats or "calcif" in feats or "stone" in feats):
        c = coords[rng.integers(len(coords))]
        r = max(1.0, (len(coords) ** (1 / 3)) * 0.3)
        spot = _ellipsoid_vox(ct.shape, c, (r, r, max(1.0, r * spacing[0] / spacing[2]))) & interior
        if "decreased" in feats:
            vals[spot] = mean - max(25.0, 0.3 * (hi - lo))
        elif "increased" in feats:
            vals[spot] = mean + max(25.0, 0.3 * (hi - lo))
        else:
            vals[spot] = float(rng.uniform(400, 900))
    vals = np.clip(vals, -1024, 3071)
    if _ill_defined(report.surface):
        # an ill-defined margin fades into the organ across the label boundary (weights 0.75 and 0.25 on
        # the voxels either side of it); the label stays the hard mask, as a reader would draw it
        outside, nearest = ndimage.distance_transform_edt(~mask, return_indices=True)
        inside = ndimage.distance_transform_edt(mask)
        alpha = np.clip(0.5 + (inside - outside) / 4.0, 0.0, 1.0).astype(np.float32)
        zone = alpha > 0
        lesion_vals = vals[tuple(nearest)][zone]   # outside the mask: the nearest lesion voxel's value
        ct[zone] = alpha[zone] * lesion_vals + (1.0 - alpha[zone]) * ct[zone]
        return
    ct[mask] = vals[mask]


def _ill_defined(surface: str) -> bool:
    return any(w in surface for w in ("ill-defined", "unclear", "irregular serosal"))


def _add_lesions(ct, organs_arr, body, affine, lesion_types, rng, enhanced, cfg) -> tuple[np.ndarray, list, list]:
    """Sample a report per lesion type (matching the phantom's contrast phase), place and draw it."""

    spacing = tuple(float(v) for v in np.linalg.norm(affine[:3, :3], axis=0))
    organ_map = OrganMap(labels=organs_arr, affine=affine, names=dict(TOTALSEG_V2))
    lesion = np.zeros(organs_arr.shape, np.uint8)
    reports, boxes = [], []
    label_of = {}
    for t in lesion_types:
        label_of.setdefault(t, len(label_of) + 1)
    phase = normalize_value("enhancement", ENHANCED if enhanced else NON_CONTRAST)
    for t in lesion_types:
        catalog = load_catalog(t)
        box = None
        for attempt in range(20):
            try:
                report = catalog.sample(rng, fixed={"enhancement": phase})
            except LesionDiffusionError:
                report = catalog.sample(rng)  # catalog does not allow this phase: keep its own
            report = _fit_size(report, catalog, organ_map, rng, phase)
            placed = place_lesion(organ_map, report, catalog, rng, on_failure="skip")
            if isinstance(placed, LesionBox):
                box = placed
                break
        if box is None:
            reason = placed.reason if isinstance(placed, NoPlacement) else "unknown"
            raise LesionDiffusionError(
                f"Could not place a '{t}' lesion in the phantom after 20 reports ({reason}). "
                "Use a larger phantom shape or spacing."
            )
        organ_mask = organ_map.mask(box.organ_names)
        mask = _lesion_mask(box, organ_mask, body, spacing, rng) & (lesion == 0)
        if not mask.any():
            raise LesionDiffusionError(f"Lesion '{t}' overlaps earlier lesions completely; use fewer lesion types.")
        _paint_lesion(ct, mask, box.report, catalog, spacing, rng, cfg.texture_hu)
        lesion[mask] = label_of[t]
        reports.append(box.report)
        boxes.append(box)
    return lesion, reports, boxes


def _fit_size(report, catalog, organ_map, rng, phase):
    """Phantom organs are smaller than real ones (the field of view is a few hundred voxels), so a
    report whose lesion would outgrow its organ is re-drawn with a proportionally smaller size."""
    organ = organ_map.mask(catalog.organ_names(report.organ))
    if not organ.any():
        return report
    idx = np.argwhere(organ)
    extent_mm = (idx.max(0) - idx.min(0) + 1) * np.asarray(organ_map.spacing)
    limit = 0.7 * float(extent_mm.min())
    if max(report.size_mm) <= limit:
        return report
    factor = max(limit, float(catalog.size.min)) / max(report.size_mm)
    smaller = tuple(float(v * factor) for v in report.size_mm)
    for fixed in ({"enhancement": report.enhancement, "size_mm": smaller}, {"size_mm": smaller}):
        try:
            return catalog.sample(rng, fixed=fixed)
        except CatalogError:
            continue
    return report
