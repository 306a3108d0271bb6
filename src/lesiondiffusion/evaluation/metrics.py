"""Measurements of lesions and segmentations: shape (sphericity, convexity), HU lesion vs organ,
and Dice through nnU-Net's own metric code."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from scipy import ndimage

from ..errors import LesionDiffusionError



def _crop_to_mask(mask: np.ndarray) -> np.ndarray:
    nz = np.argwhere(mask)
    lo, hi = nz.min(axis=0), nz.max(axis=0) + 1
    return mask[tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))]


def _mesh_volume(verts: np.ndarray, faces: np.ndarray) -> float:
    # divergence theorem over the closed triangle mesh (no library returns a mesh's enclosed volume)
    a, b, c = verts[faces[:, 0]], verts[faces[:, 1]], verts[faces[:, 2]]
    return float(abs(np.einsum("ij,ij->i", a, np.cross(b, c)).sum()) / 6.0)


def normal_sigma_mm(spacing: Sequence[float]) -> float:
    """Width (mm, the same along every axis) of the Gaussian whose gradient gives the surface normals.

    The voxel staircase has the period of the coarsest axis: with 1 x 1 x 3.3 mm voxels a surface
    facing z steps in 3.3 mm terraces that may be many in-plane voxels wide, so a kernel sized in
    voxels (0.7 voxel = 0.7 mm in-plane) leaves them in and biases sphericity low by 0.03-0.05 whatever
    the lesion's size. Half the coarsest spacing, but at least one finest voxel, is the width that kept
    spheres, ellipsoids, unions of balls and cubes within 0.03 of their true sphericity at 1 mm and at
    0.98 x 0.98 x 3.27 mm (tests/test_derive.py); wider kernels round cube edges and fill the creases
    between balls."""
    sp = np.asarray(spacing, dtype=np.float64)
    return float(max(sp.min(), 0.5 * sp.max()))


def shape_metrics(mask: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> tuple[float, float]:
    """(sphericity, convexity) of a binary mask measured in mm; (NaN, NaN) for an empty mask.

    The one implementation the project measures shapes with (report derivation, evaluation, benchmarks).
    Surface: marching cubes (scikit-image) on the binary mask, level 0.5; its volume by the divergence
    theorem. On that raw surface a digital ball scores sphericity ~0.92 (0.85 at 3.3 mm slices), because
    the staircase has more area than the shape it samples; and smoothing the mask first instead (the
    former method) shrinks both volume and area and rounds edges, errors of up to 0.05-0.07 at
    anisotropic spacing. So the area is the staircase projected onto the smooth surface: each triangle's
    area times |cos| of the angle between its normal and the gradient of the Gaussian-smoothed mask
    (``normal_sigma_mm``). A staircase over a plane projects onto exactly that plane's area, whatever its
    orientation, so this removes the grid's share of the area and keeps what the shape has.

    sphericity = pi^(1/3) (6 V)^(2/3) / A: 1 for a ball, 0.806 for a cube, lower for elongated or
    lobulated shapes. convexity = V / volume of the convex hull of the anti-aliased surface (Gaussian 0.7
    voxel, 0.9 along much coarser axes): 1 for a convex shape; the raw surface's hull would reach out to
    the staircase's corners (0.90 for a digital ball at 3.3 mm slices). Agreement with the analytic values is tested in
    tests/test_derive.py (sphere, ellipsoid, unions of balls, cube; 1 mm and 0.98 x 0.98 x 3.27 mm).
    """
    from scipy.spatial import ConvexHull, QhullError
    from skimage.measure import marching_cubes

    mask = np.asarray(mask, bool)
    if not mask.any():
        return float("nan"), float("nan")
    sp = np.asarray([float(s) for s in spacing], dtype=np.float64)
    binary = np.pad(_crop_to_mask(mask).astype(np.float32), 3)
    verts, faces, _, _ = marching_cubes(binary, level=0.5, spacing=tuple(sp))
    volume = _mesh_volume(verts, faces)
    a, b, c = verts[faces[:, 0]], verts[faces[:, 1]], verts[faces[:, 2]]
    cross = np.cross(b - a, c - a)
    double_area = np.linalg.norm(cross, axis=1)
    normals = cross / np.maximum(double_area, 1e-12)[:, None]
    smooth_n = ndimage.gaussian_filter(binary, normal_sigma_mm(sp) / sp)
    centres = ((a + b + c) / 3.0 / sp).T  # voxel coordinates of the triangle centres
    grad = np.stack([ndimage.map_coordinates(np.gradient(smooth_n, axis=k), centres, order=1) / sp[k]
                     for k in range(3)], axis=1)
    norm = np.linalg.norm(grad, axis=1)
    ok = norm > 1e-9  # no gradient (a one-voxel speck): keep the triangle's own area
    cos = np.ones(len(faces))
    cos[ok] = np.abs((normals[ok] * grad[ok]).sum(axis=1)) / norm[ok]
    area = float((0.5 * double_area * cos).sum())
    sph = float(math.pi ** (1 / 3) * (6 * volume) ** (2 / 3) / area) if area > 0 else float("nan")

    # 0.7 voxel removes the in-plane staircase's corners from the hull; along an axis much coarser than
    # the finest, 0.7 voxel left the slice corners in (convexity -0.034 for an oblique ellipsoid at
    # 3.27 mm slices) and 1.0 voxel over-shrank small shapes (+0.041): 0.9 keeps both within 0.03
    coarse = sp > 1.5 * sp.min()
    smooth = ndimage.gaussian_filter(binary, np.where(coarse, 0.9, 0.7))
    hull_verts = verts
    if smooth.max() > 0.5:  # a mask of one or two voxels would vanish when smoothed
        hull_verts = marching_cubes(smooth, level=0.5, spacing=tuple(sp))[0]
    try:
        hull = ConvexHull(hull_verts).volume
    except QhullError:
        return sph, float("nan")
    cvx = float(min(1.0, volume / hull)) if hull > 0 else float("nan")
    return sph, cvx


def sphericity(mask: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> float:
    """pi^(1/3) (6V)^(2/3) / A (see ``shape_metrics``): 1 for a ball, lower for lobulated or elongated
    shapes. NaN for an empty mask."""
    return shape_metrics(mask, spacing)[0]


def convexity(mask: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> float:
    """Volume / convex-hull volume (see ``shape_metrics``). 1 for a convex shape; NaN when the mask is
    empty or flat (hull undefined)."""
    return shape_metrics(mask, spacing)[1]


@dataclass
class HUStats:
    lesion_mean: float
    lesion_std: float
    organ_mean: float
    organ_std: float
    n_lesion: int
    n_organ: int

    @property
    def contrast(self) -> float:
        return self.lesion_mean - self.organ_mean


def hu_stats(image: np.ndarray, lesion: np.ndarray, organ: np.ndarray, *, margin_vox: int = 1) -> HUStats:
    """Mean and spread of HU inside the lesion and in the surrounding organ (organ voxels outside
    the lesion dilated by ``margin_vox``, so the blended edge counts for neither)."""
    lesion = np.asarray(lesion, bool)
    organ = np.asarray(organ, bool)
    ring = ndimage.binary_dilation(lesion, iterations=margin_vox) if margin_vox > 0 else lesion
    around = organ & ~ring
    li, oi = image[lesion], image[around]

    def ms(v: np.ndarray) -> tuple[float, float]:
        return (float(v.mean()), float(v.std())) if v.size else (float("nan"), float("nan"))

    (lm, ls), (om, os_) = ms(li), ms(oi)
    return HUStats(lm, ls, om, os_, int(li.size), int(oi.size))


def dice(reference: np.ndarray, prediction: np.ndarray, label: int = 1) -> float:
    """Dice of one label with nnU-Net's own confusion counts; NaN when both are empty."""
    from nnunetv2.evaluation.evaluate_predictions import compute_tp_fp_fn_tn

    tp, fp, fn, _ = compute_tp_fp_fn_tn(np.asarray(reference) == label, np.asarray(prediction) == label)
    if tp + fp + fn == 0:
        return float("nan")
    return float(2 * tp / (2 * tp + fp + fn))


def dice_on_folders(ref_dir: str | Path, pred_dir: str | Path, labels: Sequence[int],
                    file_ending: str = ".nii.gz") -> dict[str, Any]:
    """Per-case and mean Dice per label with nnU-Net's ``compute_metrics`` (in this process: its
    folder helper spawns a pool, which costs more than the work on small test sets)."""
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    ref_dir, pred_dir = Path(ref_dir), Path(pred_dir)
    preds = sorted(p for p in pred_dir.glob(f"*{file_ending}"))
    if not preds:
        raise LesionDiffusionError(f"No predictions (*{file_ending}) in {pred_dir}; run prediction first.")
    per_case = []
    for p in preds:
        ref = ref_dir / p.name
        if not ref.exists():
            raise LesionDiffusionError(f"Reference label {ref} for prediction {p} is missing.")
        r = compute_metrics(str(ref), str(p), SimpleITKIO(), list(labels))
        per_case.append({"case": p.name[: -len(file_ending)],
                         "dice": {int(k): float(v["Dice"]) for k, v in r["metrics"].items()},
                         "n_ref": {int(k): int(v["n_ref"]) for k, v in r["metrics"].items()}})
    mean = {}
    for lab in labels:
        vals = [c["dice"][lab] for c in per_case if not math.isnan(c["dice"][lab])]
        mean[int(lab)] = float(np.mean(vals)) if vals else float("nan")
    return {"per_case": per_case, "mean": mean}
