"""Small controlled pretraining datasets (the documented layout) for tests and the "it learns" benchmark.

Unlike the anatomical phantoms of ``lesiondiffusion.phantoms``, each lesion here follows exactly two
report attributes that the benchmark measures: shape (round-like sphere vs irregular blob) and
density (hypodense vs hyperdense interior), inside a kidney-like organ in a soft-tissue body.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from lesiondiffusion.io import save_nifti, write_yaml

ORGAN_ID = 2            # TotalSegmentator v2 "kidney_right"
HU = {"air": -1000.0, "body": -80.0, "organ": 30.0, "hypodense": -40.0, "hyperdense": 110.0}


def toy_report(shape: str, density: str, size_mm: Sequence[float]) -> dict:
    """A schema-valid kidney tumour report with the given shape and density."""
    return {
        "lesion_type": "kidney_tumor", "shape": shape, "organ_type": "parenchymal organ",
        "lesion_location": "within the parenchymal organ", "organ": "kidney",
        "relationship": "no close relationship with surrounding organs",
        "surface": "well-defined margin" if shape == "round-like" else "ill-defined margin",
        "specific_features": "none", "enhancement": "non-contrast CT", "density": density,
        "density_variations": "homogeneous", "size_mm": [float(s) for s in size_mm],
    }


def _grid(shape: Sequence[int], spacing: Sequence[float]) -> list[np.ndarray]:
    return np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)], indexing="ij")


def lesion_mask(kind: str, shape: Sequence[int], spacing: Sequence[float], center_mm: np.ndarray,
                radius_mm: float, rng: np.random.Generator) -> np.ndarray:
    """round-like: a sphere; irregular: a union of off-centre spheres with a jagged (noisy) surface."""
    g = _grid(shape, spacing)
    if kind == "round-like":
        d2 = sum((gi - c) ** 2 for gi, c in zip(g, center_mm))
        return d2 <= radius_mm ** 2
    mask = np.zeros(tuple(shape), dtype=bool)
    for k in range(5):
        # lobes pushed out along random directions: a branching, clearly non-convex lesion
        direction = rng.normal(size=3)
        off = direction / np.linalg.norm(direction) * radius_mm * (0.0 if k == 0 else rng.uniform(0.7, 1.0))
        r = radius_mm * (0.65 if k == 0 else rng.uniform(0.4, 0.55))
        d2 = sum((gi - c - o) ** 2 for gi, c, o in zip(g, center_mm, off))
        mask |= d2 <= r ** 2
    from scipy import ndimage

    noise = ndimage.gaussian_filter(rng.normal(size=tuple(shape)), 0.8)
    ring = ndimage.binary_dilation(mask, iterations=1) & ~ndimage.binary_erosion(mask, iterations=1)
    mask = (mask & ~(ring & (noise < -0.05))) | (ring & (noise > 0.15))
    lab, n = ndimage.label(mask)
    if n > 1:  # keep one connected lesion
        sizes = np.bincount(lab.ravel())[1:]
        mask = lab == (1 + int(np.argmax(sizes)))
    return mask


def make_case(shape: Sequence[int], spacing: Sequence[float], rng: np.random.Generator,
              lesion: tuple[str, str] | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[dict]]:
    """(ct HU, organ labels, lesion labels, report entries) of one case; ``lesion`` = (shape, density)."""
    shape = tuple(int(s) for s in shape)
    g = _grid(shape, spacing)
    ext = np.array([n * s for n, s in zip(shape, spacing)])
    c = ext / 2
    body = sum(((gi - ci) / (0.46 * e)) ** 2 for gi, ci, e in zip(g, c, ext)) <= 1
    oc = c + rng.uniform(-0.05, 0.05, size=3) * ext
    organ = sum(((gi - ci) / (0.3 * e)) ** 2 for gi, ci, e in zip(g, oc, ext)) <= 1
    ct = np.full(shape, HU["air"], np.float32)
    ct[body] = HU["body"]
    ct[organ] = HU["organ"]
    organs = np.zeros(shape, np.uint8)
    organs[organ] = ORGAN_ID
    les = np.zeros(shape, np.uint8)
    entries: list[dict] = []
    if lesion is not None:
        kind, density = lesion
        radius = float(rng.uniform(0.13, 0.17) * ext.min())
        center = oc + rng.uniform(-0.05, 0.05, size=3) * ext
        m = lesion_mask(kind, shape, spacing, center, radius, rng) & organ
        ct[m] = HU[density]
        les[m] = 1
        nz = np.nonzero(m)
        size = [float((a.max() - a.min() + 1) * s) for a, s in zip(nz, spacing)]
        entries.append({"label": 1, "report": toy_report(kind, density, size)})
    ct += rng.normal(0, 5, size=shape).astype(np.float32)  # scanner noise keeps the VQ-GAN honest
    return ct, organs, les, entries


def write_toy_dataset(out_dir: str | Path, n_lesion: int = 4, n_healthy: int = 1,
                      shape: Sequence[int] = (32, 32, 20), spacing: Sequence[float] = (2.0, 2.0, 3.0),
                      seed: int = 0, kinds: Sequence[tuple[str, str]] | None = None) -> Path:
    """Write the pretraining layout; lesion cases cycle through ``kinds`` (shape, density) pairs."""
    out = Path(out_dir)
    for sub in ("imagesTr", "labelsTr", "organsTr", "reportsTr"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    kinds = list(kinds or [("round-like", "hypodense"), ("irregular", "hyperdense"),
                           ("round-like", "hyperdense"), ("irregular", "hypodense")])
    rng = np.random.default_rng(seed)
    affine = np.diag([*spacing, 1.0]).astype(np.float64)
    n = n_lesion + n_healthy
    for i in range(n):
        case = f"toy_{i:03d}"
        lesion = kinds[i % len(kinds)] if i < n_lesion else None
        ct, organs, les, entries = make_case(shape, spacing, rng, lesion)
        save_nifti(out / "imagesTr" / f"{case}_0000.nii.gz", ct, affine)
        save_nifti(out / "labelsTr" / f"{case}.nii.gz", les, affine)
        save_nifti(out / "organsTr" / f"{case}.nii.gz", organs, affine)
        write_yaml(out / "reportsTr" / f"{case}.yaml", {"lesions": entries})
    (out / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": {"background": 0, "kidney_tumor": 1},
        "numTraining": n, "file_ending": ".nii.gz", "name": "LDToy"}, indent=2))
    return out
