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


@dataclass(frozen=True)
class Threshold:
    """One row of the derivation table: which attribute, what is measured, the rule on it."""

    attribute: str
    measure: str
    rule: str


# The one table of derivation thresholds (docs/catalogs.md prints it). Numbers are module constants so
# code and table cannot drift apart.
IRREGULAR_CONVEXITY = 0.80     # below: irregular
LOBULATED_CONVEXITY = 0.92     # below (and not irregular): lobulated
OVAL_ASPECT = 0.65             # smallest / largest extent below: oval, else round-like
INSIDE_WITHIN = 0.90           # share of lesion voxels in the host organ at or above: within the parenchyma
WALL_DEPTH_MM = 4.0            # hollow organ: wall shell thickness of placement's lumen rule
INVASION_OVERLAP = 0.05        # share of lesion voxels inside another organ above: invasion
CLOSE_MM = 2.0                 # distance from the lesion to another organ at most: close relationship
DENSITY_DELTA_HU = 15.0        # lesion mean - surrounding organ mean beyond +-: hyper/hypodense
HETEROGENEOUS_STD_HU = 15.0    # lesion HU standard deviation above: heterogeneous
ORGAN_SHELL_MM = (2.0, 10.0)   # the surrounding organ: host-organ voxels this far from the lesion

THRESHOLDS: tuple[Threshold, ...] = (
    Threshold("size_mm / size", "extent along world x, y, z through the affine (mm)", "size category of the largest extent"),
    Threshold("shape", "convexity, sphericity, smallest/largest extent",
              f"convexity < {IRREGULAR_CONVEXITY}: irregular; < {LOBULATED_CONVEXITY}: lobulated; "
              f"extent ratio < {OVAL_ASPECT}: oval; else round-like; in a hollow organ whose catalog lacks that shape: "
              "irregular wall thickening (wall) or protrusion into the lumen (lumen)"),
    Threshold("organ", "host organ: organ-map class holding most lesion voxels (touching, if none)",
              "the catalog organ whose classes include it (the lesion type's catalog first)"),
    Threshold("organ_type", "the host organ's catalog", "that catalog's organ_type"),
    Threshold("lesion_location", "share of lesion voxels in the host organ; deepest lesion voxel in it (mm)",
              f"parenchymal: share >= {INSIDE_WITHIN}: within, else protruding; hollow: depth >= placement's lumen "
              f"threshold max({WALL_DEPTH_MM:g} mm, half the organ's deepest point): within the lumen, else wall thickening"),
    Threshold("relationship", "share of lesion voxels in other organs; distance to the nearest other organ (mm)",
              f"share > {INVASION_OVERLAP}: invasion; distance <= {CLOSE_MM} mm: close relationship; else none"),
    Threshold("density", "lesion interior mean HU; minus the host organ's mean HU "
              f"{ORGAN_SHELL_MM[0]:g}-{ORGAN_SHELL_MM[1]:g} mm around it",
              "with a catalog: its density whose HU range (for the enhancement) is nearest the mean (inside: "
              f"nearest centre); otherwise difference < -{DENSITY_DELTA_HU:g}: hypodense, > +{DENSITY_DELTA_HU:g}: hyperdense, "
              "else isodense"),
    Threshold("density_variations", "HU standard deviation of the lesion interior",
              f"> {HETEROGENEOUS_STD_HU:g} HU: heterogeneous, else homogeneous"),
    Threshold("enhancement", "none (one setting per dataset)", "the --enhancement value"),
    Threshold("surface, specific_features", "not measured", "the catalog's most likely value (else well-defined margin, none)"),
)


def _components(mask: np.ndarray) -> list[np.ndarray]:
    lab, n = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    if n == 0:
        return []
    sizes = np.bincount(lab.ravel())[1:]
    order = sorted(range(n), key=lambda k: -sizes[k])  # largest first, as pretraining numbers components
    return [lab == (k + 1) for k in order]


def _organ_table(lesion_type: str | None) -> list[tuple[str, str, list[str], Any]]:
    """(organ, organ_type, class names, catalog) for every catalog organ; the lesion type's own first."""
    from .catalog import catalog_files, load_catalog
    from .errors import CatalogError

    files = catalog_files()
    paths = ([files[lesion_type]] if lesion_type in files else []) + [p for n, p in sorted(files.items()) if n != lesion_type]
    rows = []
    for path in paths:
        try:
            cat = load_catalog(path)
        except CatalogError:
            continue
        for organ, weight in sorted(cat.organ_weights.items(), key=lambda kv: -kv[1]):
            rows.append((organ, cat.organ_type, cat.organ_names(organ), cat))
    return rows


def _crop(mask: np.ndarray, margin: int) -> tuple[slice, ...]:
    nz = np.argwhere(mask)
    lo = np.maximum(nz.min(axis=0) - margin, 0)
    hi = np.minimum(nz.max(axis=0) + margin + 1, mask.shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def derive_report(ct: np.ndarray, lesion: np.ndarray, organs: Any, *, enhancement: str = "non-contrast CT",
                  lesion_type: str | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """One report (dict) for one lesion mask, and per attribute the measured value that chose it."""
    from .catalog import load_catalog
    from .evaluation import convexity, sphericity
    from .report import normalize_value, size_category

    enhancement = normalize_value("enhancement", enhancement)
    spacing = np.asarray(organs.spacing, dtype=np.float64)
    margin = int(math.ceil(ORGAN_SHELL_MM[1] / spacing.min())) + 2
    sl = _crop(lesion, margin)
    les = np.asarray(lesion[sl], bool)
    labels = organs.labels[sl]
    hu = np.asarray(ct[sl], dtype=np.float32)
    derived: dict[str, Any] = {}

    size_mm = measure_extent_mm(lesion, organs.affine)
    derived["size_mm"] = {"value": [round(v, 2) for v in size_mm], "measured": "extent through the affine"}

    sph, cvx = sphericity(les, spacing), convexity(les, spacing)
    aspect = min(size_mm) / max(size_mm)
    shape = ("irregular" if cvx < IRREGULAR_CONVEXITY else "lobulated" if cvx < LOBULATED_CONVEXITY
             else "oval" if aspect < OVAL_ASPECT else "round-like")
    derived["shape"] = {"value": shape, "convexity": round(cvx, 3), "sphericity": round(sph, 3),
                        "extent_ratio": round(aspect, 3)}

    # host organ: the class holding most lesion voxels, else the one touching it most
    inside = labels[les]
    counts = np.bincount(inside[inside > 0]) if (inside > 0).any() else None
    if counts is None:
        ring = ndimage.binary_dilation(les, iterations=2) & ~les
        touch = labels[ring]
        counts = np.bincount(touch[touch > 0]) if (touch > 0).any() else None
    if counts is None:
        raise LesionDiffusionError("the lesion neither overlaps nor touches any organ of the organ map; "
                                   "derivation needs the organ it lies in (run TotalSegmentator on this CT, or "
                                   "pass a label map holding that organ with --mapping).")
    host_id = int(np.argmax(counts))
    by_id = {v: k for k, v in organs.names.items()}
    host_class = by_id.get(host_id, f"label {host_id}")
    table = _organ_table(lesion_type)
    match = next((row for row in table if host_class in row[2]), None)
    if match is None:
        raise LesionDiffusionError(
            f"the lesion lies in {host_class!r} (label {host_id}), which no catalog maps to an organ; declare it "
            "under `organs:` of a catalog (docs/catalogs.md, 'Any organ') and derive again.")
    organ, organ_type, classes, catalog = match
    host = np.isin(labels, organs.ids(classes))
    frac = float((les & host).sum()) / float(les.sum())
    derived["organ"] = {"value": organ, "host_class": host_class, "catalog": catalog.name}
    derived["organ_type"] = {"value": organ_type, "catalog": catalog.name}

    depth = ndimage.distance_transform_edt(host, sampling=spacing)
    if organ_type == "hollow organ":
        from .placement import lumen_depth_threshold

        d = float(depth[les & host].max()) if (les & host).any() else 0.0
        # the whole organ's depth, not the crop's: the lumen rule of placement, read backwards
        full = organs.mask(classes)
        whole = float(ndimage.distance_transform_edt(full[_crop(full, 1)], sampling=spacing).max())
        threshold = lumen_depth_threshold(whole, max(WALL_DEPTH_MM, float(spacing.max())))
        location = "within the lumen of a hollow organ" if d >= threshold else "wall thickening"
        derived["lesion_location"] = {"value": location, "inside_fraction": round(frac, 3), "depth_mm": round(d, 2),
                                      "lumen_threshold_mm": round(threshold, 2)}
    else:
        location = "within the parenchymal organ" if frac >= INSIDE_WITHIN else "protruding from the parenchymal organ"
        derived["lesion_location"] = {"value": location, "inside_fraction": round(frac, 3)}

    others = (labels > 0) & ~host
    overlap = float((les & others).sum()) / float(les.sum())
    dist = float(ndimage.distance_transform_edt(~others, sampling=spacing)[les].min()) if others.any() else math.inf
    relationship = ("invasion of adjacent organs" if overlap > INVASION_OVERLAP
                    else "close relationship with adjacent organs" if dist <= CLOSE_MM
                    else "no close relationship with surrounding organs")
    derived["relationship"] = {"value": relationship, "other_organ_fraction": round(overlap, 3),
                               "distance_mm": None if math.isinf(dist) else round(dist, 2)}

    away = ndimage.distance_transform_edt(~les, sampling=spacing)
    shell = host & ~les & (away >= ORGAN_SHELL_MM[0]) & (away <= ORGAN_SHELL_MM[1])
    interior = ndimage.binary_erosion(les) if les.sum() > 27 else les
    if not interior.any():
        interior = les
    mean = float(hu[interior].mean())  # the interior: partial volume at the edge pulls towards the organ
    organ_mean = float(hu[shell].mean()) if shell.any() else math.nan
    density, how = None, "contrast to the surrounding organ"
    own = None
    if lesion_type is not None:
        from .catalog import catalog_files

        path = catalog_files().get(lesion_type)
        own = load_catalog(path if path is not None else lesion_type) if (path is not None or
                                                                          str(lesion_type).endswith((".yaml", ".yml"))) else None
    if own is not None:
        cat = own
        fits = []
        for dens in cat.domain("density"):
            try:
                lo, hi = cat.hu_range(dens, enhancement)
            except LesionDiffusionError:
                continue
            outside = max(lo - mean, mean - hi, 0.0)
            fits.append((outside, abs(mean - (lo + hi) / 2), dens))
        if fits:
            best = min(fits)
            density, how = best[2], f"HU range of catalog {cat.name}" + (f" ({best[0]:.0f} HU outside it)" if best[0] else "")
    if density is None:
        delta = mean - organ_mean if not math.isnan(organ_mean) else 0.0
        density = "hypodense" if delta < -DENSITY_DELTA_HU else "hyperdense" if delta > DENSITY_DELTA_HU else "isodense"
    derived["density"] = {"value": density, "lesion_mean_hu": round(mean, 1),
                          "organ_mean_hu": None if math.isnan(organ_mean) else round(organ_mean, 1), "rule": how}
    std = float(hu[interior].std())
    variations = "heterogeneous" if std > HETEROGENEOUS_STD_HU else "homogeneous"
    derived["density_variations"] = {"value": variations, "lesion_std_hu": round(std, 1)}
    derived["enhancement"] = {"value": enhancement, "rule": "dataset setting"}

    if own is not None and shape not in own.domain("shape") and organ_type == "hollow organ":
        # hollow-organ catalogs speak of wall shapes; the mask measures say where, the catalog what
        wall_shape = {"wall thickening": "irregular wall thickening",
                      "within the lumen of a hollow organ": "protrusion into the lumen"}[location]
        if wall_shape in own.domain("shape"):
            derived["shape"]["measured_shape"] = shape
            shape = derived["shape"]["value"] = wall_shape
    fallback = {"surface": "well-defined margin", "specific_features": "none"}
    cat = own if own is not None else catalog
    for attribute in fallback:
        dom = cat.domain(attribute)
        value = max(dom, key=lambda v: dom[v]) if dom else fallback[attribute]
        derived[attribute] = {"value": value, "rule": f"not measured: most likely value of catalog {cat.name}"}

    report = {
        "lesion_type": (own.name if own is not None else lesion_type) or catalog.name,
        "shape": shape, "organ_type": organ_type, "lesion_location": location, "organ": organ,
        "size": size_category(size_mm), "relationship": relationship,
        "surface": derived["surface"]["value"], "specific_features": derived["specific_features"]["value"],
        "enhancement": enhancement, "density": density, "density_variations": variations,
        "size_mm": [round(v, 2) for v in size_mm],
    }
    return report, derived


def derive_reports(ct: np.ndarray, lesion_labels: np.ndarray, organs: Any, *, label: int | None = None,
                   enhancement: str = "non-contrast CT", lesion_type: str | None = None,
                   label_types: dict[int, str] | None = None) -> list[dict[str, Any]]:
    """A ``reportsTr`` entry ``{label, component, report, derived}`` per connected component of each
    lesion label (or of ``label`` only); components numbered largest first, as pretraining reads them."""
    from .report import LesionReport

    ct = np.asarray(ct)
    lesion_labels = np.rint(np.asarray(lesion_labels)).astype(np.int32)
    if ct.shape != lesion_labels.shape or ct.shape != organs.labels.shape:
        raise LesionDiffusionError(
            f"CT {ct.shape}, lesion mask {lesion_labels.shape} and organ map {organs.labels.shape} must share one "
            "voxel grid; resample the masks onto the CT (nearest neighbour).")
    present = sorted(int(v) for v in np.unique(lesion_labels) if v != 0)
    ids = [label] if label is not None else present
    if label is not None and label not in present:
        raise LesionDiffusionError(f"--label {label} has no voxel in the lesion mask (labels present: {present}).")
    entries = []
    for lab in ids:
        for k, comp in enumerate(_components(lesion_labels == lab)):
            ltype = (label_types or {}).get(lab, lesion_type)
            report, derived = derive_report(ct, comp, organs, enhancement=enhancement, lesion_type=ltype)
            LesionReport.from_dict(report, source=f"derived report of label {lab} component {k}")  # schema check
            entries.append({"label": lab, "component": k, "report": report, "derived": derived})
    return entries


def thresholds_markdown() -> str:
    """The derivation table as Markdown (docs/catalogs.md holds its output)."""
    rows = ["| attribute | measured | rule |", "| --- | --- | --- |"]
    rows += [f"| {t.attribute} | {t.measure} | {t.rule} |" for t in THRESHOLDS]
    return "\n".join(rows)
