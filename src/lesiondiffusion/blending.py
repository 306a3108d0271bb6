"""The last stage of synthesis: the generated patch into the input CT. An optional HU correction first
brings the lesion's mean into its catalog's range (``correct_hu``; the method's output is kept by
default), then ``blend`` feathers the patch in around the mask. The ``hu_correction_*`` helpers say what
the correction did, for reports, previews and summaries.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from scipy import ndimage

from .errors import LesionDiffusionError

HU_CORRECTIONS = ("off", "shift", "clip")


def blend(orig: np.ndarray, gen: np.ndarray, mask: np.ndarray, dilation: int, sigma: float,
          hu_clip: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Blend ``gen`` into ``orig``: weight 1 inside ``mask``, a Gaussian-feathered weight in the ring of
    ``dilation`` voxels around it, 0 beyond; returns the blended patch and the voxels that may change."""
    changed = ndimage.binary_dilation(mask, iterations=dilation) if dilation else mask.copy()
    weight = ndimage.gaussian_filter(mask.astype(np.float32), sigma) if sigma > 0 else mask.astype(np.float32)
    weight = np.where(mask, 1.0, np.clip(weight, 0.0, 1.0)) * changed
    return np.clip(weight * gen + (1.0 - weight) * orig, *hu_clip), changed


def correct_hu(gen: np.ndarray, mask: np.ndarray, hu_range: tuple[float, float], mode: str) -> tuple[np.ndarray, dict[str, Any]]:
    """Bring the generated lesion's mean HU into ``hu_range``; returns the corrected patch and what was done.

    ``shift`` adds one offset to the whole patch (lesion, blend ring and all), so the ring that is blended
    with the original CT moves with the lesion and no halo of uncorrected model output remains. ``clip``
    clips lesion voxels into the range and moves the rest of the patch by the resulting change of the
    lesion mean. The info records the mode, the range, the pre-correction mean and the applied shift.
    """
    lo, hi = float(hu_range[0]), float(hu_range[1])
    mean = float(gen[mask].mean())
    info: dict[str, Any] = {"hu_correction": mode, "hu_range": [lo, hi], "generated_mean_hu": mean}
    if mode == "shift":
        shift = (lo - mean) if mean < lo else (hi - mean) if mean > hi else 0.0
        out = gen + np.float32(shift)
    elif mode == "clip":
        out = gen.copy()
        out[mask] = np.clip(gen[mask], lo, hi)
        clipped = (gen[mask] < lo) | (gen[mask] > hi)
        info["clipped_voxels"] = int(clipped.sum())
        info["clipped_fraction"] = float(np.mean(clipped))
        shift = float(out[mask].mean()) - mean
        out[~mask] = gen[~mask] + np.float32(shift)
    else:
        raise LesionDiffusionError(f"hu correction {mode!r}: use one of {', '.join(HU_CORRECTIONS)}.")
    info["hu_shift"] = float(shift)
    info["corrected_mean_hu"] = float(out[mask].mean())
    info["hu_corrected"] = bool(shift != 0.0 or info.get("clipped_fraction", 0.0) > 0)
    return out.astype(np.float32, copy=False), info


def hu_correction_note(info: dict[str, Any]) -> str | None:
    """One line saying how far the HU correction moved a lesion (``None`` when it did not act), so every
    output that shows a corrected lesion (report, preview, demo summary) says the density is the catalog's."""
    if not info.get("hu_corrected"):
        return None
    lo, hi = info["hu_range"]
    clipped = f", {info['clipped_voxels']} lesion voxels clipped" if info.get("clipped_voxels") else ""
    return (f"HU correction {info['hu_correction']}: lesion mean {info['generated_mean_hu']:.1f} -> "
            f"{info['corrected_mean_hu']:.1f} HU (shift {info['hu_shift']:+.1f} HU{clipped}; catalog range "
            f"[{lo:g}, {hi:g}] HU)")


HU_INFO_KEYS = ("hu_correction", "hu_corrected", "generated_mean_hu", "corrected_mean_hu", "hu_shift", "hu_range",
                "clipped_voxels")


def hu_correction_record(info: dict[str, Any]) -> dict[str, Any]:
    """The HU-correction part of a result's ``info`` (what a sample's sidecar keeps)."""
    return {k: info[k] for k in HU_INFO_KEYS if k in info}


def hu_correction_summary(infos: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """What the HU correction did over several results: lesions moved, mean |shift|, voxels clipped."""
    moved = [i for i in infos if i.get("hu_corrected")]
    modes = sorted({str(i.get("hu_correction", "off")) for i in infos})
    return {
        "hu_correction": modes[0] if len(modes) == 1 else modes,
        "lesions": len(infos),
        "lesions_moved": len(moved),
        "mean_abs_hu_shift": float(np.mean([abs(i["hu_shift"]) for i in moved])) if moved else 0.0,
        "max_abs_hu_shift": float(max((abs(i["hu_shift"]) for i in moved), default=0.0)),
        "voxels_clipped": int(sum(int(i.get("clipped_voxels", 0)) for i in moved)),
    }
