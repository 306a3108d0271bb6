"""Organ label maps: TotalSegmentator v1/v2 class tables and ``OrganMap`` (labels + affine + name->id).

``load_organ_map`` reads a NIfTI label map and attaches names from the v1 or v2 table, a user mapping
(dict or JSON file) or an automatic guess between v1 and v2.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from .errors import LesionDiffusionError, OrganMapError
from .io import load_nifti, voxel_spacing

log = logging.getLogger(__name__)

_VERTEBRAE_V2 = ["S1", "L5", "L4", "L3", "L2", "L1"] + [f"T{i}" for i in range(12, 0, -1)] + [f"C{i}" for i in range(7, 0, -1)]
_VERTEBRAE_V1 = _VERTEBRAE_V2[1:]
_RIBS = [f"rib_left_{i}" for i in range(1, 13)] + [f"rib_right_{i}" for i in range(1, 13)]

# TotalSegmentator v2, task "total" (117 classes); class names and ids as the tool writes them.
TOTALSEG_V2: dict[str, int] = {
    name: i + 1
    for i, name in enumerate(
        [
            "spleen", "kidney_right", "kidney_left", "gallbladder", "liver", "stomach", "pancreas",
            "adrenal_gland_right", "adrenal_gland_left", "lung_upper_lobe_left", "lung_lower_lobe_left",
            "lung_upper_lobe_right", "lung_middle_lobe_right", "lung_lower_lobe_right", "esophagus", "trachea",
            "thyroid_gland", "small_bowel", "duodenum", "colon", "urinary_bladder", "prostate",
            "kidney_cyst_left", "kidney_cyst_right", "sacrum",
            *[f"vertebrae_{v}" for v in _VERTEBRAE_V2],
            "heart", "aorta", "pulmonary_vein", "brachiocephalic_trunk", "subclavian_artery_right",
            "subclavian_artery_left", "common_carotid_artery_right", "common_carotid_artery_left",
            "brachiocephalic_vein_left", "brachiocephalic_vein_right", "atrial_appendage_left",
            "superior_vena_cava", "inferior_vena_cava", "portal_vein_and_splenic_vein", "iliac_artery_left",
            "iliac_artery_right", "iliac_vena_left", "iliac_vena_right", "humerus_left", "humerus_right",
            "scapula_left", "scapula_right", "clavicula_left", "clavicula_right", "femur_left", "femur_right",
            "hip_left", "hip_right", "spinal_cord", "gluteus_maximus_left", "gluteus_maximus_right",
            "gluteus_medius_left", "gluteus_medius_right", "gluteus_minimus_left", "gluteus_minimus_right",
            "autochthon_left", "autochthon_right", "iliopsoas_left", "iliopsoas_right", "brain", "skull",
            *_RIBS, "sternum", "costal_cartilages",
        ]
    )
}

# TotalSegmentator v1 (104 classes).
TOTALSEG_V1: dict[str, int] = {
    name: i + 1
    for i, name in enumerate(
        [
            "spleen", "kidney_right", "kidney_left", "gallbladder", "liver", "stomach", "aorta",
            "inferior_vena_cava", "portal_vein_and_splenic_vein", "pancreas", "adrenal_gland_right",
            "adrenal_gland_left", "lung_upper_lobe_left", "lung_lower_lobe_left", "lung_upper_lobe_right",
            "lung_middle_lobe_right", "lung_lower_lobe_right",
            *[f"vertebrae_{v}" for v in _VERTEBRAE_V1],
            "esophagus", "trachea", "heart_myocardium", "heart_atrium_left", "heart_ventricle_left",
            "heart_atrium_right", "heart_ventricle_right", "pulmonary_artery", "brain", "iliac_artery_left",
            "iliac_artery_right", "iliac_vena_left", "iliac_vena_right", "small_bowel", "duodenum", "colon",
            *_RIBS, "humerus_left", "humerus_right", "scapula_left", "scapula_right", "clavicula_left",
            "clavicula_right", "femur_left", "femur_right", "hip_left", "hip_right", "sacrum", "face",
            "gluteus_maximus_left", "gluteus_maximus_right", "gluteus_medius_left", "gluteus_medius_right",
            "gluteus_minimus_left", "gluteus_minimus_right", "autochthon_left", "autochthon_right",
            "iliopsoas_left", "iliopsoas_right", "urinary_bladder",
        ]
    )
}
assert len(TOTALSEG_V2) == 117 and len(TOTALSEG_V1) == 104

TABLES: dict[str, dict[str, int]] = {"v1": TOTALSEG_V1, "v2": TOTALSEG_V2}
ALL_CLASS_NAMES: frozenset[str] = frozenset(TOTALSEG_V1) | frozenset(TOTALSEG_V2)

# Label names of tissues, not organs: a tissue map (`lesiondiffusion tissue-map`: muscle, fat, bone, air)
# or a body/soft-tissue mask. Report derivation never counts them as the "adjacent organs" of the
# relationship attribute: every extremity sarcoma touches fat and most touch bone, and calling that
# "invasion" described the map, not the tumour. A catalog may still declare one as a lesion's host organ
# (soft_tissue_sarcoma lives in `muscle`); then it is the host, never a neighbour.
NON_ORGAN_CLASSES: frozenset[str] = frozenset({
    "muscle", "fat", "subcutaneous_fat", "bone", "air", "soft_tissue", "body",
})


@dataclass
class OrganMap:
    """An integer organ label volume with its affine and the name -> label id table.

    ``names`` uses TotalSegmentator class names (v2 spelling; v1-only classes keep their v1 name).
    ``source`` says where the table came from ("v1", "v2", "auto->v2", a file path or "dict").
    """

    labels: np.ndarray
    affine: np.ndarray
    names: dict[str, int]
    source: str = "v2"
    path: Path | None = None
    header: Any = field(default=None, repr=False, compare=False)
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels)
        self.affine = np.asarray(self.affine, dtype=np.float64)
        if self.labels.ndim != 3:
            raise OrganMapError(f"Organ label map {self._where()} must be 3D, got shape {self.labels.shape}.")
        if not np.issubdtype(self.labels.dtype, np.integer):
            if not np.all(np.isfinite(self.labels)) or not np.all(np.mod(self.labels, 1) == 0):
                raise OrganMapError(
                    f"Organ label map {self._where()} holds non-integer or NaN values; it must be an integer "
                    "label volume (TotalSegmentator output). Pass the segmentation, not the CT."
                )
            self.labels = self.labels.astype(np.int32)
        if self.affine.shape != (4, 4) or not np.all(np.isfinite(self.affine)):
            raise OrganMapError(f"Organ label map {self._where()} has an invalid affine; a finite 4x4 matrix is required.")

    def _where(self) -> str:
        return str(self.path) if self.path is not None else "<array>"

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along each array axis."""
        return voxel_spacing(self.affine)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.labels.shape)  # type: ignore[return-value]

    def present_ids(self) -> set[int]:
        if "present_ids" not in self._cache:
            self._cache["present_ids"] = {int(v) for v in np.unique(self.labels) if v != 0}
        return self._cache["present_ids"]

    def present_names(self) -> list[str]:
        """Names of the labels that have at least one voxel (ids without a name as 'label N')."""
        by_id = {v: k for k, v in self.names.items()}
        return [by_id.get(i, f"label {i}") for i in sorted(self.present_ids())]

    def ids(self, names: Iterable[str]) -> list[int]:
        """Label ids of the known names; names the table does not know are ignored."""
        return sorted({self.names[n] for n in names if n in self.names})

    def mask(self, names: Iterable[str]) -> np.ndarray:
        """Boolean mask of the union of the named organs (unknown or absent names add nothing)."""
        ids = self.ids(names if not isinstance(names, str) else [names])
        if not ids:
            return np.zeros(self.labels.shape, dtype=bool)
        return np.isin(self.labels, ids)

    def has(self, name: str) -> bool:
        """True when the table knows ``name`` and the volume has at least one voxel of it."""
        return name in self.names and self.names[name] in self.present_ids()


def _mapping_from_obj(obj: Any, where: str) -> dict[str, int]:
    if not isinstance(obj, Mapping) or not obj:
        raise OrganMapError(
            f"Organ mapping {where} must be a non-empty mapping of class name -> label id "
            '(e.g. {"liver": 5, "kidney_left": 3}) or label id -> class name.'
        )
    out: dict[str, int] = {}
    for key, value in obj.items():
        # accept both name -> id and id -> name (TotalSegmentator's own files use id -> name)
        if isinstance(value, str) and str(key).strip().lstrip("-").isdigit():
            name, raw = value, key
        else:
            name, raw = key, value
        try:
            label = int(raw)
            if label != float(raw):
                raise ValueError
        except (TypeError, ValueError):
            raise OrganMapError(
                f"Organ mapping {where}: key {key!r} has value {value!r}; label ids must be integers >= 1. "
                'Write entries as "liver": 5.'
            ) from None
        if label < 1:
            raise OrganMapError(f"Organ mapping {where}: {name!r} -> {label}; label ids must be >= 1 (0 is background).")
        if name in out:
            raise OrganMapError(f"Organ mapping {where}: class {name!r} appears twice. Give each class one id.")
        out[str(name)] = label
    dup = {v for v in out.values() if list(out.values()).count(v) > 1}
    if dup:
        raise OrganMapError(
            f"Organ mapping {where}: label id(s) {sorted(dup)} are assigned to several classes. Give each id one name."
        )
    unknown = sorted(set(out) - ALL_CLASS_NAMES - NON_ORGAN_CLASSES - _catalog_class_names())
    if unknown and (where, tuple(unknown)) not in _WARNED_MAPPINGS:
        # one command reads the same mapping once per case and per check: say it once
        _WARNED_MAPPINGS.add((where, tuple(unknown)))
        log.warning(
            "Organ mapping %s: %s are neither TotalSegmentator class names nor class names any catalog on the "
            "catalog path lists under `names:`; no catalog finds them. Declare them under `names:` of an organ "
            "in a catalog (docs/catalogs.md, 'Any organ').", where, ", ".join(unknown)
        )
    return out


_WARNED_MAPPINGS: set[tuple[str, tuple[str, ...]]] = set()


# Callables giving the class names the catalogs list; ``catalog`` registers its own on import (it imports
# this module, so this module never imports the catalogs)
_CLASS_NAME_SOURCES: list[Callable[[], set[str]]] = []


def add_class_name_source(source: Callable[[], set[str]]) -> None:
    """Register a callable returning class names that organ maps may use besides TotalSegmentator's."""
    if source not in _CLASS_NAME_SOURCES:
        _CLASS_NAME_SOURCES.append(source)


def _catalog_class_names() -> set[str]:
    """Every class name the loadable catalogs on the catalog path list (v2, v1 or `names:`)."""
    names: set[str] = set()
    for source in _CLASS_NAME_SOURCES:
        names |= source()
    return names


def _centroid_z(labels: np.ndarray, affine: np.ndarray, label: int) -> float | None:
    idx = np.argwhere(labels == label)
    if len(idx) == 0:
        return None
    world = affine[:3, :3] @ idx.mean(axis=0) + affine[:3, 3]
    return float(world[2])  # NIfTI world is RAS+: z points superior


def guess_version(labels: np.ndarray, affine: np.ndarray) -> tuple[str, str]:
    """Guess whether a label map uses TotalSegmentator v1 or v2 ids; returns ``(version, reason)``.

    The two tables share ids 1-6; evidence comes from ids only v2 has (> 104), the volumes of the
    bowel labels (v2 18-20 vs v1 55-57) and anatomy (v2 id 10 is a lung lobe, far above v2 id 7,
    the pancreas; in v1 they are the aorta and the pancreas at the same level).
    """
    ids, counts = np.unique(labels, return_counts=True)
    count = dict(zip(ids.tolist(), counts.tolist()))
    if max(count) > 104:
        return "v2", f"label ids up to {max(count)} exist only in v2"
    votes: list[tuple[str, str]] = []
    gut_v2 = sum(count.get(i, 0) for i in (18, 19, 20))
    gut_v1 = sum(count.get(i, 0) for i in (55, 56, 57))
    if gut_v2 or gut_v1:
        votes.append(("v2" if gut_v2 > gut_v1 else "v1", "bowel label volumes"))
    z7, z10 = _centroid_z(labels, affine, 7), _centroid_z(labels, affine, 10)
    if z7 is not None and z10 is not None:
        votes.append(("v2" if z10 - z7 > 60.0 else "v1", "position of ids 7 and 10"))
    if not votes:
        return "v2", "no distinguishing labels; assuming v2 (pass --mapping v1 for TotalSegmentator v1 output)"
    n_v2 = sum(v == "v2" for v, _ in votes)
    version = "v2" if n_v2 * 2 >= len(votes) else "v1"
    return version, "; ".join(f"{why} -> {v}" for v, why in votes)


MAX_LABELS = 512  # TotalSegmentator's largest table has 117 classes; thousands of values mean an image


def label_map_problem(labels: np.ndarray) -> str | None:
    """Why an integer volume cannot be an organ label map (negative ids, too many distinct values), or None."""
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0:
        return f"holds negative values (from {lo} to {hi})"
    if hi >= MAX_LABELS and len(np.unique(labels)) > MAX_LABELS:
        return f"holds more than {MAX_LABELS} distinct values (from {lo} to {hi})"
    return None


def looks_like_label_map(array: np.ndarray) -> bool:
    """True for an integer-valued, non-negative volume with few distinct values (an organ map, not a CT)."""
    a = np.asarray(array)
    if not np.issubdtype(a.dtype, np.integer):
        if not np.all(np.isfinite(a)) or not np.all(np.mod(a, 1) == 0):
            return False
    if a.min() < 0 or a.max() >= MAX_LABELS:
        return False
    return len(np.unique(a)) <= 128  # TotalSegmentator v2 has 117 classes + background


def load_organ_map(path: str | Path, mapping: str | Mapping[str, Any] | Path = "auto") -> OrganMap:
    """Read an organ label map (NIfTI) and attach class names.

    ``mapping``: "v1" or "v2" (TotalSegmentator tables), "auto" (guess, see ``guess_version``), a dict
    name -> id (or id -> name), or the path of a JSON file holding such a dict.
    """
    path = Path(path)
    try:
        labels, affine, header = load_nifti(path)
    except LesionDiffusionError as exc:
        raise OrganMapError(str(exc)) from None
    return organ_map_from_array(labels, affine, mapping, path=path, header=header)


def organ_map_from_array(
    labels: np.ndarray,
    affine: np.ndarray,
    mapping: str | Mapping[str, Any] | Path = "v2",
    *,
    path: Path | None = None,
    header: Any = None,
) -> OrganMap:
    """Build an ``OrganMap`` from an in-memory label volume (same ``mapping`` options as ``load_organ_map``)."""
    labels = np.asarray(labels)
    where = str(path) if path is not None else "<array>"
    if labels.ndim == 3 and not np.issubdtype(labels.dtype, np.integer):
        if not np.all(np.isfinite(labels)) or not np.all(np.mod(labels, 1) == 0):
            raise OrganMapError(
                f"Organ label map {where} holds non-integer or NaN values; it must be an integer label volume "
                "(TotalSegmentator output). Pass the segmentation, not the CT."
            )
        labels = labels.astype(np.int32)
    if labels.ndim == 3:
        problem = label_map_problem(labels)
        if problem:
            raise OrganMapError(
                f"Organ label map {where} {problem}: it looks like a CT image, not a label map. Pass the "
                "TotalSegmentator segmentation of the CT (if --ct and --organs are swapped, swap them)."
            )
    if isinstance(mapping, Mapping):
        names, source = _mapping_from_obj(mapping, "<dict>"), "dict"
    else:
        key = str(mapping)
        if key in TABLES:
            names, source = dict(TABLES[key]), key
        elif key == "auto":
            version, reason = guess_version(labels, np.asarray(affine, dtype=np.float64))
            log.info("organ map %s: TotalSegmentator %s ids (%s)", where, version, reason)
            names, source = dict(TABLES[version]), f"auto->{version}"
        else:
            mpath = Path(key)
            if not mpath.exists():
                raise OrganMapError(
                    f"Organ mapping {key!r} is neither 'v1', 'v2', 'auto' nor an existing JSON file. "
                    "Pass --mapping v1|v2|auto or the path of a JSON file {\"liver\": 5, ...}."
                )
            try:
                obj = json.loads(mpath.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise OrganMapError(f"Organ mapping file {mpath}: invalid JSON ({exc}). Fix the syntax at the position shown.") from None
            names, source = _mapping_from_obj(obj, str(mpath)), str(mpath)
    return OrganMap(labels=labels, affine=np.asarray(affine, dtype=np.float64), names=names, source=source, path=path, header=header)
