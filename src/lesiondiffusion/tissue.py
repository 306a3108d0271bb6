"""Tissue maps from HU: muscle / fat / bone / air labels for lesions outside TotalSegmentator's organs.

Soft-tissue sarcomas, muscle haematomas and subcutaneous lesions sit in tissue, not in an organ, and a
user's mask-only dataset has no organ map. Placement, report derivation and the pretraining crops all
need one, so this module builds one from the CT alone, with rules a reader can check by eye:

1. the CT is smoothed with a Gaussian of ``sigma_mm`` (noise and partial volume would otherwise
   speckle the labels);
2. **air**: smoothed HU < ``air_below`` (-400: half-way between air and fat);
3. **bone**: smoothed HU >= ``bone_above`` (180: above enhanced vessels and muscle, below cortex),
   holes filled slice by slice (the fatty marrow inside cortical bone is bone), components smaller
   than ``min_bone_ml`` dropped (calcifications, contrast in vessels: they stay soft tissue);
4. **fat**: air_below <= smoothed HU < ``fat_below`` (-30, the usual upper fat bound);
5. **muscle**: everything else (-30 .. 180 HU: muscle, vessels, skin, tendons and soft-tissue tumours).

Label ids and names are fixed (``TISSUE_LABELS``) and written beside the map as a JSON organ mapping,
so every command reads them with ``--mapping tissue_labels.json`` (or ``dataset.json``'s
``organ_mapping``). No library offers this (TotalSegmentator's tissue tasks need a licence and a GPU
model), hence the few lines here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from .errors import LesionDiffusionError
from .io import load_nifti, save_nifti, voxel_spacing, write_json

# label id -> class name; the names are the organ-map classes a catalog lists under ``names:``
TISSUE_LABELS: dict[str, int] = {"muscle": 1, "fat": 2, "bone": 3, "air": 4}


@dataclass(frozen=True)
class TissueRules:
    """HU thresholds of the tissue map (see the module docstring for the reasoning behind each)."""

    sigma_mm: float = 1.0
    air_below: float = -400.0
    fat_below: float = -30.0
    bone_above: float = 180.0
    min_bone_ml: float = 0.5

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def tissue_map(ct: np.ndarray, spacing: tuple[float, float, float] | np.ndarray,
               rules: TissueRules | None = None, slice_axis: int | None = None) -> np.ndarray:
    """uint8 label volume (``TISSUE_LABELS``) of a CT in HU on its own grid.

    ``slice_axis``: the axis along which bone holes are filled slice by slice (default: the axis with
    the largest spacing, the acquisition's slice axis for anisotropic CT)."""
    r = rules or TissueRules()
    ct = np.asarray(ct, dtype=np.float32)
    if ct.ndim != 3:
        raise LesionDiffusionError(f"tissue map: expected a 3-D CT, got shape {ct.shape}.")
    if not np.isfinite(ct).all():
        raise LesionDiffusionError("tissue map: the CT has NaN or infinite voxels; replace them (e.g. with -1024 HU) "
                                   "before building a tissue map.")
    sp = np.asarray(spacing, dtype=np.float64)
    smooth = ndimage.gaussian_filter(ct, sigma=r.sigma_mm / sp) if r.sigma_mm > 0 else ct
    axis = int(np.argmax(sp)) if slice_axis is None else int(slice_axis)

    bone = smooth >= r.bone_above
    # fill the marrow slice by slice: a 3-D fill fails where the bone leaves the volume open at the ends
    bone = np.moveaxis(bone, axis, 0)
    bone = np.stack([ndimage.binary_fill_holes(s) for s in bone])
    bone = np.moveaxis(bone, 0, axis)
    comp, n = ndimage.label(bone)
    if n:
        voxel_ml = float(np.prod(sp)) / 1000.0
        sizes = ndimage.sum_labels(bone, comp, index=np.arange(1, n + 1)) * voxel_ml
        keep = np.zeros(n + 1, dtype=bool)
        keep[1:] = sizes >= r.min_bone_ml
        bone = keep[comp]

    out = np.full(ct.shape, TISSUE_LABELS["muscle"], dtype=np.uint8)
    out[smooth < r.fat_below] = TISSUE_LABELS["fat"]
    out[smooth < r.air_below] = TISSUE_LABELS["air"]
    out[bone] = TISSUE_LABELS["bone"]
    return out


def write_tissue_map(ct_path: str | Path, out_path: str | Path, rules: TissueRules | None = None,
                     mapping_path: str | Path | None = None) -> dict[str, Any]:
    """Read a CT NIfTI, write its tissue map (same grid and affine) and the JSON organ mapping.

    Returns a summary (volume share per class). The mapping is written beside the map as
    ``tissue_labels.json`` unless ``mapping_path`` says otherwise."""
    ct_path, out_path = Path(ct_path), Path(out_path)
    if out_path.resolve() == ct_path.resolve():
        raise LesionDiffusionError(f"tissue map: output {out_path} is the input CT; choose another file name.")
    ct, affine, _ = load_nifti(ct_path, np.float32)
    labels = tissue_map(ct, voxel_spacing(affine), rules)
    save_nifti(out_path, labels, affine)
    mpath = Path(mapping_path) if mapping_path else out_path.parent / "tissue_labels.json"
    write_json(mpath, TISSUE_LABELS)
    share = {name: round(float((labels == i).mean()), 4) for name, i in TISSUE_LABELS.items()}
    return {"map": str(out_path), "mapping": str(mpath), "share": share}


__all__ = ["TISSUE_LABELS", "TissueRules", "tissue_map", "write_tissue_map"]
