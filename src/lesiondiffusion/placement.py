"""Rule-based lesion placement: from an organ map and a report to a lesion bounding box.

Owns the four placement rules (within the parenchyma, protruding from it, on a hollow organ's wall
shell, deep in its lumen), the size-to-voxel conversion under any affine, and the per-organ distance
maps (computed once per organ map and organ set, then cached on the ``OrganMap``).

Rules, with the tolerances they are checked against (``PlacementSpec`` in the catalog can change them):

* ``within_parenchyma``: at least ``inside_fraction`` (default 0.9) of the voxels of the ellipsoid
  inscribed in the box lie inside the organ (a box corner is never inside a rounded organ, so the
  ellipsoid, i.e. the lesion's own extent, is what is tested; voxels beyond the image count as outside).
* ``protruding``: the centre lies on the organ surface, i.e. half a voxel from an organ voxel towards
  a face neighbour outside the organ, and between ``min_organ_fraction`` (25 %) and
  ``max_organ_fraction`` (90 %) of the ellipsoid lies inside the organ.
* ``wall``: the centre voxel is inside the organ at most ``wall_mm`` (or one voxel, if larger) from
  its outside, i.e. on the wall shell, and at least ``min_organ_fraction`` of the ellipsoid is inside.
* ``lumen``: the centre voxel is inside the organ at least ``max(wall_mm, half the organ's largest
  inner distance)`` from its outside, and ``inside_fraction`` of the ellipsoid lies inside the organ.

The organ-fraction part of these rules is ``organ_fraction_rule``: the synthesis pipeline accepts a
generated mask by the same function, so a box that placement accepts is never one whose mask must fail
for lying outside the organ.

Organ voxels on the image border are never boundary or shell centres (the organ's true surface is
beyond the scan there).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import ndimage

from .catalog import PlacementSpec, load_catalog
from .errors import PlacementError
from .report import LOCATION_CATEGORY, LesionReport

if TYPE_CHECKING:
    from .catalog import Catalog
    from .organs import OrganMap

log = logging.getLogger(__name__)

CATEGORIES: tuple[str, ...] = ("within_parenchyma", "protruding", "wall", "lumen")


@dataclass
class LesionBox:
    """A lesion bounding box in voxel indices (``hi`` exclusive, inside the image) plus its centre."""

    lo: tuple[int, int, int]
    hi: tuple[int, int, int]
    center_vox: tuple[float, float, float]
    size_mm: tuple[float, float, float]
    category: str
    organ_names: list[str]
    report: LesionReport
    affine: np.ndarray | None = field(default=None, repr=False)
    semi_axes_vox: tuple[float, float, float] = (0.0, 0.0, 0.0)
    measures: dict[str, float] = field(default_factory=dict)

    def slices(self) -> tuple[slice, slice, slice]:
        return tuple(slice(int(a), int(b)) for a, b in zip(self.lo, self.hi))  # type: ignore[return-value]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(b - a) for a, b in zip(self.lo, self.hi))  # type: ignore[return-value]

    def ellipsoid(self) -> np.ndarray:
        """Boolean ellipsoid of the lesion extent, shaped like ``slices()`` of the image."""
        return _ellipsoid_in_box(self.lo, self.hi, self.center_vox, self.semi_axes_vox)

    def to_dict(self) -> dict[str, Any]:
        """Voxel and world (mm) coordinates of the box, its rule, measures and the (possibly shrunk) report."""
        d: dict[str, Any] = {
            "category": self.category,
            "organ_names": list(self.organ_names),
            "voxel": {
                "lo": [int(v) for v in self.lo],
                "hi_exclusive": [int(v) for v in self.hi],
                "shape": list(self.shape),
                "center": [float(v) for v in self.center_vox],
                "semi_axes": [round(float(v), 3) for v in self.semi_axes_vox],
            },
            "size_mm": [round(float(v), 3) for v in self.size_mm],
        }
        if self.affine is not None:
            a = np.asarray(self.affine, dtype=np.float64)
            # box faces lie half a voxel outside the first and last voxel centres
            corners = np.array([[x, y, z] for x in (self.lo[0] - 0.5, self.hi[0] - 0.5)
                                for y in (self.lo[1] - 0.5, self.hi[1] - 0.5)
                                for z in (self.lo[2] - 0.5, self.hi[2] - 0.5)])
            world = corners @ a[:3, :3].T + a[:3, 3]
            d["world_mm"] = {
                "center": [round(float(v), 3) for v in a[:3, :3] @ np.asarray(self.center_vox) + a[:3, 3]],
                "min": [round(float(v), 3) for v in world.min(axis=0)],
                "max": [round(float(v), 3) for v in world.max(axis=0)],
            }
            d["affine"] = a.tolist()
            d["spacing_mm"] = [round(float(v), 6) for v in np.linalg.norm(a[:3, :3], axis=0)]
        d["measures"] = {k: round(float(v), 4) for k, v in self.measures.items()}
        d["report"] = self.report.to_dict()
        return d


@dataclass
class NoPlacement:
    """Typed "no box" result for callers that skip instead of failing (``on_failure="skip"``)."""

    reason: str

    def __bool__(self) -> bool:  # so `if box:` reads naturally
        return False


@dataclass
class OrganGeometry:
    """Distance maps of one organ set, cropped to its bounding box (plus one voxel of margin)."""

    offset: np.ndarray            # crop origin in image voxels
    mask: np.ndarray              # bool, cropped (padded with outside)
    depth_mm: np.ndarray          # inside voxels: distance in mm to the nearest outside voxel
    boundary: np.ndarray          # flat crop indices of boundary voxels not on the image border
    max_depth_mm: float
    n_voxels: int
    crop_shape: tuple[int, int, int]
    depth_sorted: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))   # flat idx by depth
    depth_values: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))   # ascending depths
    on_border: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0, bool))  # crop voxels on the image border
    wall_shells: dict = field(repr=False, default_factory=dict)  # wall_mm -> flat indices of shell voxels

    def wall_shell(self, wall_mm: float) -> np.ndarray:
        """Flat crop indices of organ voxels at most ``wall_mm`` deep, off the image border (cached)."""
        if wall_mm not in self.wall_shells:
            shell = self.mask & (self.depth_mm <= wall_mm) & ~self.on_border
            self.wall_shells[wall_mm] = np.flatnonzero(shell)
        return self.wall_shells[wall_mm]


def organ_geometry(organs: "OrganMap", ids: list[int]) -> OrganGeometry:
    """Distance maps of the union of ``ids``, cached on ``organs`` (they are the expensive part)."""
    key = ("placement_geometry", tuple(sorted(ids)))
    cached = organs._cache.get(key)
    if cached is not None:
        return cached
    full = np.isin(organs.labels, ids)
    nz = np.argwhere(full)
    shape = np.array(organs.labels.shape)
    lo = nz.min(axis=0)
    hi = nz.max(axis=0) + 1
    mask = np.pad(full[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]], 1)
    offset = lo - 1
    spacing = organs.spacing
    depth = ndimage.distance_transform_edt(mask, sampling=spacing).astype(np.float32)
    interior = ndimage.binary_erosion(mask)
    boundary = mask & ~interior
    # organ voxels on the image border: the organ continues beyond the scan, so they are no surface
    coords = [np.arange(n) + o for n, o in zip(mask.shape, offset)]
    on_border = np.zeros(mask.shape, dtype=bool)
    for axis, c in enumerate(coords):
        edge = (c == 0) | (c == shape[axis] - 1)
        index = [None, None, None]
        index[axis] = slice(None)
        on_border |= edge[tuple(index)]
    boundary &= ~on_border
    inside_idx = np.flatnonzero(mask)
    order = np.argsort(depth.ravel()[inside_idx], kind="stable")
    geom = OrganGeometry(
        offset=offset,
        mask=mask,
        depth_mm=depth,
        boundary=np.flatnonzero(boundary),
        max_depth_mm=float(depth.max()),
        n_voxels=int(mask.sum()),
        crop_shape=tuple(int(s) for s in mask.shape),  # type: ignore[arg-type]
        depth_sorted=inside_idx[order],
        depth_values=depth.ravel()[inside_idx][order],
        on_border=on_border,
    )
    organs._cache[key] = geom
    return geom


def extent_vox(affine: np.ndarray, size_mm: tuple[float, float, float]) -> np.ndarray:
    """Lesion extent along each voxel axis (in voxels) for a world-axis-aligned extent in mm.

    The world-aligned ellipsoid's extent along a voxel axis with unit direction ``d`` is
    ``sqrt(sum_j (d_j * size_j)^2)``; this handles anisotropic spacing, flips and axis permutations.
    """
    m = np.asarray(affine, dtype=np.float64)[:3, :3]
    spacing = np.linalg.norm(m, axis=0)
    directions = m / spacing
    s = np.asarray(size_mm, dtype=np.float64)
    extent_mm = np.sqrt(((directions * s[:, None]) ** 2).sum(axis=0))
    return extent_mm / spacing


_EXACT_COUNT_VOXELS = 2**21  # boxes up to this size are counted voxel by voxel (8 MiB of bool)


def _ellipsoid_in_box(lo, hi, center, semi) -> np.ndarray:
    grids = np.ogrid[tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))]
    r = np.maximum(np.asarray(semi, dtype=np.float64), 0.5)
    dist = sum(((g - c) / ri) ** 2 for g, c, ri in zip(grids, center, r))
    return dist <= 1.0


def inside_fraction(mask_crop: np.ndarray, offset: np.ndarray, center: np.ndarray, semi: np.ndarray) -> float:
    """Share of the ellipsoid's voxels (centre ``center``, semi-axes ``semi`` in voxels, image
    coordinates) that lie inside ``mask_crop``; voxels beyond the crop count as outside."""
    c = np.asarray(center, dtype=np.float64) - offset
    r = np.maximum(np.asarray(semi, dtype=np.float64), 0.5)
    lo = np.floor(c - r).astype(int)
    hi = np.floor(c + r).astype(int) + 1
    clo = np.maximum(lo, 0)
    chi = np.minimum(hi, mask_crop.shape)
    # memory stays bounded by the organ crop: the ellipsoid is only rasterised where it meets the crop,
    # and a box much larger than the crop is counted by its volume (4/3 pi abc), which for such sizes
    # differs from the voxel count by far less than any acceptance threshold
    box_voxels = float(np.prod((hi - lo).astype(np.float64)))
    if box_voxels <= max(float(mask_crop.size), float(_EXACT_COUNT_VOXELS)):
        total = int(_ellipsoid_in_box(lo, hi, c, r).sum())
    else:
        total = int(round(4.0 / 3.0 * np.pi * float(np.prod(r))))
    if total == 0 or np.any(chi <= clo):
        return 0.0
    sub_ell = _ellipsoid_in_box(clo, chi, c, r)
    sub_mask = mask_crop[tuple(slice(a, b) for a, b in zip(clo, chi))]
    return float((sub_ell & sub_mask).sum()) / total


def _box_for(center: np.ndarray, extent: np.ndarray, shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    n = np.maximum(1, np.round(extent)).astype(int)
    lo = np.round(center - (n - 1) / 2.0).astype(int)
    hi = lo + n
    lo_c = np.clip(lo, 0, np.asarray(shape))
    hi_c = np.clip(hi, 0, np.asarray(shape))
    return tuple(int(v) for v in lo_c), tuple(int(v) for v in hi_c)


def _organ_absent_message(organs: "OrganMap", report: LesionReport, names: list[str]) -> str:
    present = organs.present_names()
    shown = ", ".join(present[:25]) + (f", ... ({len(present)} labels)" if len(present) > 25 else "")
    where = str(organs.path) if organs.path is not None else "the organ map"
    return (
        f"Organ {report.organ!r} of the {report.lesion_type} report is absent from {where}: looked for "
        f"TotalSegmentator classes {', '.join(names)} (name table: {organs.source}); labels present: "
        f"{shown or 'none'}. Fix: use a scan that contains the {report.organ}, sample a lesion type whose "
        "organ is present, or pass the right --mapping (v1, v2 or a JSON name->id file)."
    )


def _spec(catalog: "Catalog | None"):
    return catalog.placement if catalog is not None else PlacementSpec()


def place_lesion(
    organs: "OrganMap",
    report: LesionReport,
    catalog: "Catalog | None",
    seed: int | np.random.Generator,
    *,
    on_failure: str = "raise",
) -> LesionBox | NoPlacement:
    """Place ``report``'s lesion in ``organs`` by its ``lesion_location`` rule; seeded, bounded.

    Up to ``max_tries`` random centres are tried per size; when none fits, the extent shrinks by
    ``shrink_factor`` down to the catalog's minimum diameter. ``on_failure="raise"`` raises
    ``PlacementError``; ``"skip"`` returns ``NoPlacement`` with the reason.
    """
    if on_failure not in ("raise", "skip", "return"):
        raise ValueError(f"on_failure must be 'raise' or 'skip', got {on_failure!r}")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)

    def fail(reason: str) -> NoPlacement:
        if on_failure == "raise":
            raise PlacementError(reason)
        return NoPlacement(reason)

    if catalog is None:
        catalog = load_catalog(report.lesion_type)
    spec = _spec(catalog)
    category = LOCATION_CATEGORY[report.lesion_location]
    names = catalog.organ_names(report.organ)
    ids = [organs.names[n] for n in names if organs.has(n)]
    if not ids:
        return fail(_organ_absent_message(organs, report, names))
    geom = organ_geometry(organs, ids)
    spacing = np.asarray(organs.spacing)
    shape = organs.shape
    min_diameter = min(catalog.size.min, max(report.size_mm))
    wall_mm = max(spec.wall_mm, float(spacing.max()))

    size_mm = np.asarray(report.size_mm, dtype=np.float64)
    scale = 1.0
    best: tuple[float, np.ndarray, np.ndarray, float] | None = None  # (score, centre, semi, frac)
    while True:
        cur = size_mm * scale
        extent = extent_vox(organs.affine, tuple(cur))
        semi = extent / 2.0
        candidates = _candidates(category, geom, float(np.min(semi * spacing)), wall_mm)
        if len(candidates):
            picks = rng.choice(candidates, size=min(spec.max_tries, len(candidates)), replace=False)
            for flat in picks:
                local = np.array(np.unravel_index(int(flat), geom.crop_shape))
                centre = (local + geom.offset).astype(float)
                if category == "protruding":
                    # the surface lies half a voxel beyond a boundary voxel, towards an outside neighbour
                    centre = centre + 0.5 * _outward_step(geom.mask, local, rng)
                frac = inside_fraction(geom.mask, geom.offset, centre, semi)
                ok, score = _accept(category, frac, spec)
                if ok:
                    return _make_box(organs, report, catalog, category, names, ids, geom, centre, local, cur,
                                     extent, semi, frac, shape, scale, wall_mm)
                if best is None or score > best[0]:
                    best = (score, centre, semi, frac)
        next_scale = scale * spec.shrink_factor
        if max(size_mm) * next_scale < min_diameter - 1e-9:
            break
        scale = next_scale
    reason = (
        f"No {category} position fits a {report.lesion_type} of {max(size_mm * scale):.1f}-{max(size_mm):.1f} mm "
        f"in {report.organ} ({', '.join(n for n in names if organs.has(n))}; {geom.n_voxels} voxels, "
        f"deepest point {geom.max_depth_mm:.1f} mm from the surface) after {spec.max_tries} tries per size "
        f"down to the catalog minimum {catalog.size.min:g} mm"
        + (f"; best inside fraction {best[3]:.2f}" if best else "")
        + ". Fix: lower size_mm.min in the catalog, choose another lesion_location, or use a scan with a larger organ."
    )
    return fail(reason)


def _candidates(category: str, geom: OrganGeometry, min_semi_mm: float, wall_mm: float) -> np.ndarray:
    if category == "protruding":
        return geom.boundary
    if category == "wall":
        return geom.wall_shell(wall_mm)
    if category == "lumen":
        threshold = lumen_depth_threshold(geom.max_depth_mm, wall_mm)
    else:  # within_parenchyma: the centre must be roughly one semi-axis deep to keep the lesion in
        threshold = min(0.7 * min_semi_mm, geom.max_depth_mm)
    start = int(np.searchsorted(geom.depth_values, threshold - 1e-6, side="left"))
    return geom.depth_sorted[start:]


def lumen_depth_threshold(max_depth_mm: float, wall_mm: float) -> float:
    """Minimum depth (mm) of a lumen centre: below the wall shell and in the inner half of the organ."""
    return min(max(wall_mm, 0.5 * max_depth_mm), max_depth_mm)


def organ_fraction_bounds(category: str, spec: Any) -> tuple[float, float]:
    """The [low, high] share of a lesion that must lie inside its organ, by placement rule.

    The one acceptance rule of the package: placement tests the box's ellipsoid with it and the
    synthesis pipeline tests the generated mask with it (``spec`` is the catalog's ``PlacementSpec``).
    """
    if category in ("within_parenchyma", "lumen"):
        return float(spec.inside_fraction), 1.0
    if category == "protruding":
        return float(spec.min_organ_fraction), float(spec.max_organ_fraction)
    return float(spec.min_organ_fraction), 1.0  # wall


def organ_fraction_rule(category: str, fraction: float, spec: Any) -> str | None:
    """``None`` when ``fraction`` (share inside the organ) is acceptable for ``category``, else why not."""
    lo, hi = organ_fraction_bounds(category, spec)
    if fraction < lo - 1e-9:
        return f"only {fraction:.0%} lies in the organ (a {category} lesion needs >= {lo:.0%})"
    if fraction > hi + 1e-9:
        return f"{fraction:.0%} lies in the organ (a {category} lesion needs <= {hi:.0%})"
    return None


def _accept(category: str, frac: float, spec: Any) -> tuple[bool, float]:
    ok = organ_fraction_rule(category, frac, spec) is None
    lo, hi = organ_fraction_bounds(category, spec)
    # score of a near miss (reported when nothing fits): distance into the accepted interval
    return ok, min(frac - lo, hi - frac)


_FACE_STEPS = np.array([[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]])


def _outward_step(mask: np.ndarray, local: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random face step from an organ voxel to an outside neighbour (zero if there is none)."""
    steps = [st for st in _FACE_STEPS if not mask[tuple(local + st)]]
    if not steps:
        return np.zeros(3)
    return np.asarray(steps[int(rng.integers(len(steps)))], dtype=float)


def _make_box(organs, report, catalog, category, names, ids, geom, centre, local, cur, extent, semi, frac, shape, scale, wall_mm) -> LesionBox:
    lo, hi = _box_for(centre, extent, shape)
    new_report = report if scale == 1.0 else report.with_size_mm(tuple(float(round(v, 2)) for v in cur))
    if scale != 1.0:
        log.debug("%s shrunk by %.2f to fit %s", report.lesion_type, scale, report.organ)
        cur = np.asarray(new_report.size_mm)
    local = tuple(int(v) for v in local)
    measures = {
        "inside_fraction": frac,
        "center_depth_mm": float(geom.depth_mm[local]),
        "organ_max_depth_mm": geom.max_depth_mm,
        "shrink": scale,
    }
    if category == "wall":
        measures["wall_mm"] = wall_mm
    if category == "lumen":
        measures["lumen_depth_threshold_mm"] = lumen_depth_threshold(geom.max_depth_mm, wall_mm)
    return LesionBox(
        lo=lo,  # type: ignore[arg-type]
        hi=hi,  # type: ignore[arg-type]
        center_vox=tuple(float(v) for v in centre),  # type: ignore[arg-type]
        size_mm=tuple(float(v) for v in cur),  # type: ignore[arg-type]
        category=category,
        organ_names=[n for n in names if organs.has(n)],
        report=new_report,
        affine=np.asarray(organs.affine),
        semi_axes_vox=tuple(float(v) for v in semi),  # type: ignore[arg-type]
        measures=measures,
    )


def box_mask(shape: tuple[int, int, int], box: LesionBox, ellipsoid: bool = False) -> np.ndarray:
    """uint8 volume with 1 inside the box (or inside its inscribed ellipsoid)."""
    out = np.zeros(shape, dtype=np.uint8)
    out[box.slices()] = box.ellipsoid().astype(np.uint8) if ellipsoid else 1
    return out
