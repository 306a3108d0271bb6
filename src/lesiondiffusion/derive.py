"""Reports derived from images: measure a lesion mask against its CT and organ map, and choose each
report attribute by one documented threshold table (``THRESHOLDS``), recording the measured value.

Owns ``measure_extent_mm`` (the lesion extent through the affine, shared with ``pretrain check``),
``derive_reports`` (one report per connected lesion component) and the threshold table.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from scipy import ndimage

from .catalog import SAMPLED_ATTRIBUTES, catalog_files, load_catalog
from .errors import CatalogError, LesionDiffusionError
from .evaluation.metrics import shape_metrics
from .organs import NON_ORGAN_CLASSES
from .placement import lumen_depth_threshold
from .report import ATTRIBUTES, LesionReport, normalize_value, size_category

log = logging.getLogger(__name__)


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
    Threshold("relationship", "share of lesion voxels in other organs; distance to the nearest other organ (mm); "
              "tissue classes (muscle, fat, bone, air, ...: organs.NON_ORGAN_CLASSES) are not organs",
              f"share > {INVASION_OVERLAP}: invasion; distance <= {CLOSE_MM} mm: close relationship; else none"),
    Threshold("density", "lesion interior mean HU; minus the host organ's mean HU "
              f"{ORGAN_SHELL_MM[0]:g}-{ORGAN_SHELL_MM[1]:g} mm around it",
              "with a catalog: its density whose HU range (for the enhancement) is nearest the mean (inside: "
              f"nearest centre; mixed-density only when heterogeneous); otherwise difference < -{DENSITY_DELTA_HU:g}: hypodense, > +{DENSITY_DELTA_HU:g}: hyperdense, "
              "else isodense"),
    Threshold("density_variations", "HU standard deviation of the lesion interior",
              f"> {HETEROGENEOUS_STD_HU:g} HU: heterogeneous, else homogeneous"),
    Threshold("enhancement", "none (one setting per dataset)", "the --enhancement value"),
    Threshold("surface, specific_features", "not measured", "the catalog's most likely value (else well-defined margin, none)"),
    Threshold("catalog fit", "the report against its catalog (`report check`)",
              "a value the catalog forbids becomes the nearest allowed one (order of ORDINAL, else the most likely); "
              "a size beyond its range is scaled to the range; each change is a note of the lesion"),
)

# Orders along which a forbidden measured value moves to the nearest value the catalog allows.
ORDINAL: dict[str, tuple[str, ...]] = {
    "shape": ("round-like", "oval", "lobulated", "irregular"),
    "relationship": ("no close relationship with surrounding organs", "close relationship with adjacent organs",
                     "invasion of adjacent organs"),
    "lesion_location": ("within the parenchymal organ", "protruding from the parenchymal organ"),
    "density": ("hypodense", "isodense", "hyperdense"),
    "density_variations": ("homogeneous", "heterogeneous"),
}
_HOLLOW_LOCATIONS = ("within the lumen of a hollow organ", "wall thickening")


def _components(mask: np.ndarray) -> list[np.ndarray]:
    lab, n = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    if n == 0:
        return []
    sizes = np.bincount(lab.ravel())[1:]
    order = sorted(range(n), key=lambda k: -sizes[k])  # largest first, as pretraining numbers components
    return [lab == (k + 1) for k in order]


def _organ_table(lesion_type: str | None) -> list[tuple[str, str, list[str], Any]]:
    """(organ, organ_type, class names, catalog) for every catalog organ; the lesion type's own first."""
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
    shape = _derive_shape(les, spacing, size_mm, derived)
    (organ, organ_type, classes, catalog), host = _derive_host_organ(les, labels, organs, lesion_type, derived)
    location = _derive_location(les, host, organs, classes, organ_type, spacing, derived)
    relationship = _derive_relationship(les, labels, host, organs, classes, spacing, derived)
    own = _own_catalog(lesion_type)
    density, variations = _derive_density(les, hu, host, spacing, own, enhancement, derived)
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
    # the catalog the report names is the one `report check` and `synthesize --report` hold it to
    check = own if own is not None else (catalog if lesion_type is None else None)
    notes = fit_to_catalog(report, derived, check) if check is not None else []
    if notes:
        derived["catalog_fit"] = notes
    return report, derived


def _derive_shape(les: np.ndarray, spacing: np.ndarray, size_mm: Sequence[float], derived: dict[str, Any]) -> str:
    sph, cvx = shape_metrics(les, spacing)
    aspect = min(size_mm) / max(size_mm)
    shape = ("irregular" if cvx < IRREGULAR_CONVEXITY else "lobulated" if cvx < LOBULATED_CONVEXITY
             else "oval" if aspect < OVAL_ASPECT else "round-like")
    derived["shape"] = {"value": shape, "convexity": round(cvx, 3), "sphericity": round(sph, 3),
                        "extent_ratio": round(aspect, 3)}
    return shape


def _derive_host_organ(les: np.ndarray, labels: np.ndarray, organs: Any, lesion_type: str | None,
                       derived: dict[str, Any]) -> tuple[tuple[str, str, list[str], Any], np.ndarray]:
    """The host organ's catalog row (organ, organ_type, class names, catalog) and its mask on the crop."""
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
    by_id = {v: k for k, v in organs.names.items()}
    table = _organ_table(lesion_type)
    # the class holding most lesion voxels among those a catalog maps: a sarcoma of a tissue map lies in
    # muscle and partly in fat, and only muscle is a catalog organ
    ranked = [int(i) for i in np.argsort(-counts, kind="stable") if counts[i] > 0]
    host_id = next((i for i in ranked if any(by_id.get(i) in row[2] for row in table)), ranked[0])
    host_class = by_id.get(host_id, f"label {host_id}")
    match = next((row for row in table if host_class in row[2]), None)
    if match is None:
        raise LesionDiffusionError(
            f"the lesion lies in {host_class!r} (label {host_id}), which no catalog maps to an organ; declare it "
            "under `organs:` of a catalog (docs/catalogs.md, 'Any organ') and derive again.")
    organ, organ_type, classes, catalog = match
    host = np.isin(labels, organs.ids(classes))
    derived["organ"] = {"value": organ, "host_class": host_class, "catalog": catalog.name}
    derived["organ_type"] = {"value": organ_type, "catalog": catalog.name}
    return match, host


def _derive_location(les: np.ndarray, host: np.ndarray, organs: Any, classes: list[str], organ_type: str,
                     spacing: np.ndarray, derived: dict[str, Any]) -> str:
    frac = float((les & host).sum()) / float(les.sum())
    depth = ndimage.distance_transform_edt(host, sampling=spacing)
    if organ_type == "hollow organ":
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
    return location


def _derive_relationship(les: np.ndarray, labels: np.ndarray, host: np.ndarray, organs: Any, classes: list[str],
                         spacing: np.ndarray, derived: dict[str, Any]) -> str:
    tissue = organs.ids(NON_ORGAN_CLASSES)
    others = (labels > 0) & ~host & ~np.isin(labels, tissue)
    overlap = float((les & others).sum()) / float(les.sum())
    dist = float(ndimage.distance_transform_edt(~others, sampling=spacing)[les].min()) if others.any() else math.inf
    relationship = ("invasion of adjacent organs" if overlap > INVASION_OVERLAP
                    else "close relationship with adjacent organs" if dist <= CLOSE_MM
                    else "no close relationship with surrounding organs")
    derived["relationship"] = {"value": relationship, "other_organ_fraction": round(overlap, 3),
                               "distance_mm": None if math.isinf(dist) else round(dist, 2)}
    ignored = sorted(n for n in NON_ORGAN_CLASSES if organs.has(n) and n not in classes)
    if ignored:
        derived["relationship"]["not_organs"] = ignored
    return relationship


def _own_catalog(lesion_type: str | None) -> Any:
    """The catalog of ``lesion_type`` (a name on the catalog path or a catalog file), or None."""
    if lesion_type is None:
        return None
    path = catalog_files().get(lesion_type)
    return load_catalog(path if path is not None else lesion_type) if (path is not None or
                                                                       str(lesion_type).endswith((".yaml", ".yml"))) else None


def _derive_density(les: np.ndarray, hu: np.ndarray, host: np.ndarray, spacing: np.ndarray, own: Any,
                    enhancement: str, derived: dict[str, Any]) -> tuple[str, str]:
    """(density, density_variations) from the lesion interior's HU: against the lesion type's catalog HU
    ranges when there is one, else against the surrounding organ."""
    away = ndimage.distance_transform_edt(~les, sampling=spacing)
    shell = host & ~les & (away >= ORGAN_SHELL_MM[0]) & (away <= ORGAN_SHELL_MM[1])
    interior = ndimage.binary_erosion(les) if les.sum() > 27 else les
    if not interior.any():
        interior = les
    mean = float(hu[interior].mean())  # the interior: partial volume at the edge pulls towards the organ
    organ_mean = float(hu[shell].mean()) if shell.any() else math.nan
    density, how = None, "contrast to the surrounding organ"
    if own is not None:
        cat = own
        fits = []
        heterogeneous = float(hu[interior].std()) > HETEROGENEOUS_STD_HU
        for dens in cat.domain("density"):
            if dens == "mixed-density" and not heterogeneous and len(cat.domain("density")) > 1:
                # mixed density is a spread of values, not a mean: its wide HU range held the mean of most
                # uniform sarcomas (28 HU in [5, 50] beat hypodense [5, 35] on the nearest centre)
                continue
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
    return density, variations


def _nearest_allowed(attribute: str, value: str, allowed: dict[str, float]) -> str:
    """The allowed value nearest ``value`` along ``ORDINAL`` (ties: the more likely), else the most likely."""
    order = _HOLLOW_LOCATIONS if value in _HOLLOW_LOCATIONS else ORDINAL.get(attribute, ())
    ranked = [v for v in order if v in allowed]
    if value in order and ranked:
        pos = order.index(value)
        return min(ranked, key=lambda v: (abs(order.index(v) - pos), -allowed[v]))
    return max(allowed, key=lambda v: (allowed[v] > 0, allowed[v]))


def fit_to_catalog(report: dict[str, Any], derived: dict[str, Any], catalog: Any) -> list[str]:
    """Make ``report`` pass ``catalog.check_report`` (what `report check`, `synthesize --report` and
    `pretrain check` apply): a forbidden value becomes the nearest allowed one, a size outside the catalog's
    range is scaled into it (shape kept), a broken rule's consequences are set. Changes ``report`` and
    ``derived`` in place; returns one note per change saying what and why. The organ is never changed: a
    lesion whose organ the catalog lacks is an error naming the fix."""
    notes: list[str] = []

    def change(attribute: str, new: str, why: str) -> None:
        old = report[attribute]
        report[attribute] = new
        entry = derived.setdefault(attribute, {})
        entry.setdefault("measured_value", old)
        entry["value"] = new
        notes.append(f"{attribute}: {old!r} -> {new!r} ({why})")

    if report["organ"] not in catalog.domain("organ"):
        raise LesionDiffusionError(
            f"the lesion lies in organ {report['organ']!r}, which catalog {catalog.name} ({catalog.path}) does not "
            f"target (its organs: {', '.join(catalog.domain('organ'))}); derive with the --lesion-type of that "
            "organ, or add the organ under `organs:` of the catalog.")
    for attribute in ("organ_type",) + tuple(a for a in SAMPLED_ATTRIBUTES if a not in catalog.free_text):
        allowed = catalog.domain(attribute)
        if report[attribute] not in allowed:
            new = _nearest_allowed(attribute, report[attribute], allowed)
            change(attribute, new, f"catalog {catalog.name} allows only {', '.join(allowed)}")
    size_mm = [float(v) for v in report["size_mm"]]
    largest = max(size_mm)
    bound = min(max(largest, catalog.size.min), catalog.size.max)
    if bound != largest:
        scaled = [round(v * bound / largest, 2) for v in size_mm]
        notes.append(f"size_mm: {size_mm} -> {scaled} (largest extent {largest:g} mm outside catalog "
                     f"{catalog.name}'s range {catalog.size.min:g}-{catalog.size.max:g} mm; shape kept, scaled)")
        derived.setdefault("size_mm", {})["measured_value"] = size_mm
        derived["size_mm"]["value"] = scaled
        report["size_mm"] = scaled
    if size_category(report["size_mm"]) != report["size"]:
        change("size", size_category(report["size_mm"]), "the scaled size_mm")
    for _ in range(4 * len(catalog.constraints) + 1):  # each pass settles at least one broken rule
        values = {a: report[a] for a in ATTRIBUTES}
        broken = [r for r in catalog.constraints if not r.satisfied(values)]
        if not broken:
            break
        rule = broken[0]
        attribute, allowed_values = next((a, vs) for a, vs in rule.then.items() if values.get(a) not in vs)
        allowed = {v: w for v, w in catalog.domain(attribute).items() if v in allowed_values} or \
            {v: 1.0 for v in allowed_values}
        change(attribute, _nearest_allowed(attribute, report[attribute], allowed),
               f"catalog {catalog.name} {rule.describe()}")
    problems = catalog.check_report(LesionReport.from_dict(report, source="derived report"))
    if problems:  # rules that contradict each other: the catalog cannot describe this lesion at all
        raise LesionDiffusionError(f"the derived report cannot be made to fit catalog {catalog.name} "
                                   f"({catalog.path}): " + "; ".join(problems))
    return notes


def derive_reports(ct: np.ndarray, lesion_labels: np.ndarray, organs: Any, *, label: int | None = None,
                   enhancement: str = "non-contrast CT", lesion_type: str | None = None,
                   label_types: dict[int, str] | None = None) -> list[dict[str, Any]]:
    """A ``reportsTr`` entry ``{label, component, report, derived}`` per connected component of each
    lesion label (or of ``label`` only); components numbered largest first, as pretraining reads them."""
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
            entry = {"label": lab, "component": k, "report": report, "derived": derived}
            if derived.get("catalog_fit"):
                entry["notes"] = list(derived["catalog_fit"])
                log.warning("label %d component %d: changed to fit catalog %s: %s", lab, k, report["lesion_type"],
                            "; ".join(entry["notes"]))
            entries.append(entry)
    return entries


def thresholds_markdown() -> str:
    """The derivation table as Markdown (docs/catalogs.md holds its output)."""
    rows = ["| attribute | measured | rule |", "| --- | --- | --- |"]
    rows += [f"| {t.attribute} | {t.measure} | {t.rule} |" for t in THRESHOLDS]
    return "\n".join(rows)
