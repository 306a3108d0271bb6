"""Procedural abdominal CT phantoms in HU with TotalSegmentator v2 organ labels.

Owns the built-in dataset used by ``lesiondiffusion demo`` and by tests: the anatomy is drawn by
``phantom_anatomy`` (body-relative coordinates, so any shape/spacing keeps every organ); lesions follow
sampled reports (``phantom_lesions``); the head phantom of the zero-shot demonstration is at the end.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

import numpy as np
from scipy import ndimage

from .errors import LesionDiffusionError
from .io import save_nifti, write_json, write_yaml
# the anatomy (tables, layout, drawing) lives in its own module; its public names are re-exported here
from .phantom_anatomy import TISSUE_HU, TS_V2_IDS, Ellipsoid, PhantomConfig, _build_anatomy, _Grid  # noqa: F401
# the lesions live in their own module; these names are re-exported where tests and callers found them
from .phantom_lesions import (  # noqa: F401
    ENHANCED,
    NON_CONTRAST,
    _add_lesions,
    _ellipsoid_vox,
    _lesion_mask,
    _paint_lesion,
)

if TYPE_CHECKING:
    from .catalog import Catalog
    from .placement import LesionBox
    from .report import LesionReport

log = logging.getLogger(__name__)


@dataclass
class Phantom:
    """One phantom volume: CT in HU, organ labels, lesion labels, affine and the lesion reports."""

    ct: np.ndarray
    organs: np.ndarray
    lesion: np.ndarray
    affine: np.ndarray
    reports: list["LesionReport"] = field(default_factory=list)
    enhancement: str = NON_CONTRAST
    boxes: list["LesionBox"] = field(default_factory=list)

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))


def _affine(shape: Sequence[int], spacing: Sequence[float]) -> np.ndarray:
    # RAS+ like TotalSegmentator's outputs: array axis 0 runs to patient right, 1 anterior, 2 superior
    aff = np.diag([float(spacing[0]), float(spacing[1]), float(spacing[2]), 1.0])
    aff[:3, 3] = [-(n - 1) / 2.0 * s for n, s in zip(shape, spacing)]
    return aff


def make_phantom(
    shape: Sequence[int] = (64, 64, 40),
    spacing: Sequence[float] = (2.0, 2.0, 3.0),
    seed: int | np.random.Generator = 0,
    lesion_types: Iterable[str] = (),
    *,
    enhanced: bool | None = None,
    config: PhantomConfig | None = None,
) -> Phantom:
    """Build one abdominal CT phantom; one lesion per entry of ``lesion_types`` (catalog names),
    labelled 1, 2, ... in order of first appearance. ``enhanced=None`` draws the contrast phase."""
    shape = tuple(int(v) for v in shape)
    spacing = tuple(float(v) for v in spacing)
    if len(shape) != 3 or min(shape) < 8:
        raise LesionDiffusionError(f"Phantom shape {shape} is invalid; give three sizes of at least 8 voxels.")
    if len(spacing) != 3 or min(spacing) <= 0:
        raise LesionDiffusionError(f"Phantom spacing {spacing} is invalid; give three positive sizes in mm.")
    cfg = config or PhantomConfig()
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    if enhanced is None:
        enhanced = bool(rng.random() < cfg.p_enhanced)
    grid = _Grid(shape, spacing)
    affine = _affine(shape, spacing)
    ct, organs_arr, body = _build_anatomy(grid, cfg, rng, enhanced)
    lesion_types = list(lesion_types)
    reports: list = []
    boxes: list = []
    if lesion_types:
        lesion, reports, boxes = _add_lesions(ct, organs_arr, body, affine, lesion_types, rng, enhanced, cfg)
    else:
        lesion = np.zeros(shape, np.uint8)
    if cfg.partial_volume_sigma_vox > 0:
        # partial-volume blur: edges of a real scan are never one-voxel steps
        ct = ndimage.gaussian_filter(ct, cfg.partial_volume_sigma_vox)
    ct += rng.normal(0.0, cfg.noise_hu, shape).astype(np.float32)
    np.clip(ct, -1024, 3071, out=ct)
    return Phantom(
        ct=ct.astype(np.float32),
        organs=organs_arr,
        lesion=lesion,
        affine=affine,
        reports=list(reports),
        enhancement=ENHANCED if enhanced else NON_CONTRAST,
        boxes=list(boxes),
    )


def write_phantom_dataset(
    out_dir: str | Path,
    *,
    n_healthy: int,
    lesion_types: Sequence[str],
    shape: Sequence[int] = (64, 64, 40),
    spacing: Sequence[float] = (2.0, 2.0, 3.0),
    seed: int = 0,
    dataset_id: int = 900,
    name: str = "LDPhantom",
    cases_per_type: int = 1,
    progress: bool = True,
) -> Path:
    """Write a pretraining/nnU-Net dataset of phantoms and return its folder.

    ``out_dir/Dataset{id:03d}_{name}/`` gets ``dataset.json``, ``imagesTr``, ``labelsTr``,
    ``organsTr`` and ``reportsTr``: ``n_healthy`` lesion-free templates, then ``cases_per_type``
    cases with one lesion for each entry of ``lesion_types`` (dataset label = position of its type).
    Existing complete case files are kept, so an interrupted run can be repeated.
    """
    if n_healthy < 0 or cases_per_type < 0:
        raise LesionDiffusionError("n_healthy and cases_per_type must be >= 0.")
    types = list(dict.fromkeys(lesion_types))
    ds = Path(out_dir) / f"Dataset{int(dataset_id):03d}_{name}"
    for sub in ("imagesTr", "labelsTr", "organsTr", "reportsTr"):
        (ds / sub).mkdir(parents=True, exist_ok=True)
    plan: list[tuple[str, list[str]]] = [(f"{name.lower()}_{i:03d}", []) for i in range(n_healthy)]
    k = n_healthy
    for _ in range(cases_per_type):
        for t in types:
            plan.append((f"{name.lower()}_{k:03d}", [t]))
            k += 1
    root = np.random.SeedSequence(seed)
    child_seeds = root.spawn(len(plan))
    from tqdm.auto import tqdm

    for (case, ltypes), ss in zip(tqdm(plan, desc="phantoms", unit="case", leave=False, disable=not progress), child_seeds):
        files = [ds / "imagesTr" / f"{case}_0000.nii.gz", ds / "labelsTr" / f"{case}.nii.gz",
                 ds / "organsTr" / f"{case}.nii.gz", ds / "reportsTr" / f"{case}.yaml"]
        if all(f.exists() for f in files):
            continue
        ph = make_phantom(shape, spacing, np.random.default_rng(ss), ltypes)
        # dataset labels refer to the position of the type in the whole dataset, not in this case
        lab = np.zeros_like(ph.lesion)
        for local_id, t in enumerate(dict.fromkeys(ltypes), start=1):
            lab[ph.lesion == local_id] = types.index(t) + 1
        lesions = []
        for t, rep in zip(ltypes, ph.reports):
            lesions.append({"label": types.index(t) + 1, "report": rep.to_dict()})
        save_nifti(files[0], ph.ct.astype(np.float32), ph.affine)
        save_nifti(files[1], lab.astype(np.uint8), ph.affine)
        save_nifti(files[2], ph.organs.astype(np.uint8), ph.affine)
        write_yaml(files[3], {"lesions": lesions})
    labels = {"background": 0}
    for i, t in enumerate(types, start=1):
        labels[t] = i
    write_json(
        ds / "dataset.json",
        {
            "channel_names": {"0": "CT"},
            "labels": labels,
            "numTraining": len(plan),
            "file_ending": ".nii.gz",
            "name": name,
            "description": "Procedural abdominal CT phantoms (lesiondiffusion.phantoms); not patient data.",
            "organ_labels": "TotalSegmentator v2",
        },
    )
    return ds


__all__ = [
    "Phantom",
    "PhantomConfig",
    "TS_V2_IDS",
    "TISSUE_HU",
    "make_phantom",
    "write_phantom_dataset",
]


# --------------------------------------------------------------------------------------------------
# Head phantom: the target of the zero-shot hematencephalon demonstration (README, "A new lesion
# type: hematencephalon"). Nothing in the abdominal dataset looks like it, which is the point.
# --------------------------------------------------------------------------------------------------

HEAD_TS_V2_IDS: dict[str, int] = {"brain": 90, "skull": 91}

# Non-contrast HU of the head's tissues (typical adult values).
HEAD_TISSUE_HU: dict[str, float] = {
    "scalp": 40.0,
    "skull": 1000.0,
    "diploe": 450.0,        # cancellous bone between the skull's two tables
    "csf": 8.0,
    "gray_matter": 38.0,
    "white_matter": 28.0,
}


@dataclass
class HeadPhantom(Phantom):
    """A head phantom: ``organs`` holds TotalSegmentator v2 ``brain`` (90, ventricles included, as
    TotalSegmentator labels it) and ``skull`` (91); ``ventricles`` marks the CSF spaces inside it."""

    ventricles: np.ndarray | None = None

    @property
    def parenchyma(self) -> np.ndarray:
        """Brain tissue proper: the brain label without the ventricles."""
        brain = self.organs == HEAD_TS_V2_IDS["brain"]
        return brain & ~self.ventricles if self.ventricles is not None else brain


def make_head_phantom(
    shape: Sequence[int] = (64, 80, 64),
    spacing: Sequence[float] = (2.5, 2.5, 2.5),
    seed: int | np.random.Generator = 0,
    *,
    noise_hu: float = 8.0,
) -> HeadPhantom:
    """A non-contrast head CT phantom in HU: scalp, skull (two tables and diploe), a CSF rim, cortex
    (grey matter), white matter and the lateral and third ventricles, with TotalSegmentator v2 labels.

    Sizes are in mm (head semi-axes about 70 x 88 x 68 mm, jittered by the seed), so the field of view
    (``shape * spacing``) must be at least 160 x 196 x 152 mm.
    """
    shape = tuple(int(v) for v in shape)
    spacing = tuple(float(v) for v in spacing)
    if len(shape) != 3 or len(spacing) != 3 or min(spacing) <= 0:
        raise LesionDiffusionError(f"Head phantom shape {shape} / spacing {spacing} invalid; give three sizes "
                                   "and three positive spacings in mm.")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    semi = np.array([70.0, 88.0, 68.0]) * (1.0 + rng.uniform(-0.04, 0.04, 3))
    fov = np.array(shape) * np.array(spacing)
    if np.any(fov < 2 * semi + 10.0):
        need = np.ceil((2 * semi + 10.0) / np.array(spacing)).astype(int)
        raise LesionDiffusionError(f"Head phantom field of view {fov.tolist()} mm is too small for a head of "
                                   f"{(2 * semi).round().tolist()} mm; use shape >= {need.tolist()} at spacing {list(spacing)}.")
    axes = [(np.arange(n) - (n - 1) / 2.0) * s for n, s in zip(shape, spacing)]
    x, y, z = axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :]

    def inside(centre, semi_axes) -> np.ndarray:
        c, s = np.asarray(centre, float), np.asarray(semi_axes, float)
        return ((x - c[0]) / s[0]) ** 2 + ((y - c[1]) / s[1]) ** 2 + ((z - c[2]) / s[2]) ** 2 <= 1.0

    head = inside((0, 0, 0), semi)
    skull_outer = inside((0, 0, 0), semi - 5.0)            # 5 mm scalp
    diploe = inside((0, 0, 0), semi - 7.0) & ~inside((0, 0, 0), semi - 10.0)
    intracranial = inside((0, 0, 0), semi - 12.0)          # 7 mm skull: outer table, diploe, inner table
    brain = inside((0, 0, 0), semi - 14.0)                 # 2 mm CSF between skull and brain
    white = inside((0, 0, 0), semi - 18.0)                 # ~4 mm cortex
    shift = rng.uniform(-3.0, 3.0, 3)
    ventricles = (
        inside(np.array([9.0, 8.0, 10.0]) + shift, (6.0, 28.0, 9.0))       # lateral ventricles
        | inside(np.array([-9.0, 8.0, 10.0]) + shift, (6.0, 28.0, 9.0))
        | inside(np.array([0.0, 0.0, -2.0]) + shift, (2.0, 12.0, 8.0))     # third ventricle
    ) & white

    ct = np.full(shape, -1000.0, np.float32)
    ct[head] = HEAD_TISSUE_HU["scalp"]
    ct[skull_outer] = HEAD_TISSUE_HU["skull"]
    ct[diploe] = HEAD_TISSUE_HU["diploe"]
    ct[intracranial] = HEAD_TISSUE_HU["csf"]
    ct[brain] = HEAD_TISSUE_HU["gray_matter"]
    ct[white] = HEAD_TISSUE_HU["white_matter"]
    ct[ventricles] = HEAD_TISSUE_HU["csf"]
    # smooth parenchymal texture (a few HU), partial-volume blur, quantum noise, as in make_phantom
    texture = ndimage.gaussian_filter(rng.normal(0.0, 1.0, shape), 2.0)
    ct[brain] += (3.0 * texture / max(float(texture.std()), 1e-6))[brain]
    ct = ndimage.gaussian_filter(ct, 0.6) + rng.normal(0.0, noise_hu, shape)
    organs_arr = np.zeros(shape, np.uint8)
    organs_arr[skull_outer & ~intracranial] = HEAD_TS_V2_IDS["skull"]
    organs_arr[brain] = HEAD_TS_V2_IDS["brain"]
    return HeadPhantom(
        ct=np.clip(ct, -1024, 3071).astype(np.float32),
        organs=organs_arr,
        lesion=np.zeros(shape, np.uint8),
        affine=_affine(shape, spacing),
        enhancement=NON_CONTRAST,
        ventricles=ventricles,
    )


__all__ += ["HEAD_TISSUE_HU", "HEAD_TS_V2_IDS", "HeadPhantom", "make_head_phantom"]
