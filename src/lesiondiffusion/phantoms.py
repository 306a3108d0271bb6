"""Procedural abdominal CT phantoms in HU with TotalSegmentator v2 organ labels.

Owns the built-in dataset used by ``lesiondiffusion demo`` and by tests: anatomy is laid out in
body-relative coordinates so any shape/spacing keeps every organ; lesions follow sampled reports
(``phantom_lesions``); the head phantom of the zero-shot demonstration is at the end.
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

# TotalSegmentator v2 class ids of the structures a phantom contains. organs.py owns the full
# tables; tests check that these agree with it.
TS_V2_IDS: dict[str, int] = {
    "spleen": 1,
    "kidney_right": 2,
    "kidney_left": 3,
    "gallbladder": 4,
    "liver": 5,
    "stomach": 6,
    "pancreas": 7,
    "lung_lower_lobe_left": 11,
    "lung_lower_lobe_right": 14,
    "esophagus": 15,
    "colon": 20,
    "urinary_bladder": 21,
    "vertebrae_L5": 27,
    "vertebrae_L4": 28,
    "vertebrae_L3": 29,
    "vertebrae_L2": 30,
    "vertebrae_L1": 31,
    "vertebrae_T12": 32,
    "aorta": 52,
    "inferior_vena_cava": 63,
}

# (non-contrast HU, portal-venous enhanced HU) per tissue; figures are typical adult values.
TISSUE_HU: dict[str, tuple[float, float]] = {
    "air": (-1000.0, -1000.0),
    "gas": (-950.0, -950.0),
    "lung": (-850.0, -840.0),
    "fat": (-100.0, -100.0),
    "muscle": (50.0, 60.0),
    "liver": (60.0, 110.0),
    "spleen": (50.0, 120.0),
    "kidney": (30.0, 150.0),
    "renal_sinus": (-60.0, -60.0),
    "pancreas": (40.0, 100.0),
    "bowel_wall": (40.0, 90.0),
    "gastric_fluid": (10.0, 10.0),
    "stool": (-60.0, -60.0),
    "bile": (10.0, 10.0),
    "urine": (5.0, 5.0),
    "bladder_wall": (40.0, 80.0),
    "esophagus": (40.0, 80.0),
    "aorta": (40.0, 200.0),
    "ivc": (40.0, 150.0),
    "cortical_bone": (750.0, 750.0),
    "cancellous_bone": (250.0, 250.0),
    "disc": (80.0, 80.0),
}



@dataclass(frozen=True)
class Ellipsoid:
    """An organ as an ellipsoid in body coordinates (x to patient right, y anterior, z superior,
    in-plane in units of the in-plane field-of-view half width, z in units of its half height)."""

    name: str
    centre: tuple[float, float, float]
    semi: tuple[float, float, float]
    tissue: str


@dataclass
class PhantomConfig:
    """Layout and intensities of the phantom; the defaults describe a supine adult abdomen."""

    body_semi: tuple[float, float] = (0.92, 0.70)
    subcutaneous_fat: float = 0.08      # thickness, fraction of the body semi-axes
    wall_muscle: float = 0.05
    noise_hu: float = 12.0               # Gaussian quantum noise sigma
    texture_hu: float = 6.0              # smooth within-organ texture amplitude
    jitter: float = 0.06                 # random relative change of organ centres and sizes
    partial_volume_sigma_vox: float = 0.6
    p_enhanced: float = 0.5              # share of phantoms in portal-venous phase
    # Parenchymal organs; hollow organs, vessels and the spine are built by dedicated code below.
    parenchyma: tuple[Ellipsoid, ...] = (
        Ellipsoid("liver", (0.40, 0.05, 0.45), (0.42, 0.42, 0.45), "liver"),
        Ellipsoid("spleen", (-0.58, -0.18, 0.50), (0.16, 0.22, 0.26), "spleen"),
        Ellipsoid("kidney_right", (0.34, -0.36, -0.02), (0.13, 0.14, 0.28), "kidney"),
        Ellipsoid("kidney_left", (-0.34, -0.36, 0.06), (0.13, 0.14, 0.28), "kidney"),
    )
    lungs: tuple[Ellipsoid, ...] = (
        Ellipsoid("lung_lower_lobe_right", (0.40, -0.30, 1.05), (0.34, 0.30, 0.22), "lung"),
        Ellipsoid("lung_lower_lobe_left", (-0.40, -0.30, 1.05), (0.34, 0.30, 0.22), "lung"),
    )
    gallbladder: Ellipsoid = Ellipsoid("gallbladder", (0.30, 0.28, 0.12), (0.09, 0.11, 0.16), "bile")
    stomach: Ellipsoid = Ellipsoid("stomach", (-0.30, 0.25, 0.52), (0.26, 0.22, 0.26), "bowel_wall")
    bladder: Ellipsoid = Ellipsoid("urinary_bladder", (0.0, 0.18, -0.74), (0.24, 0.20, 0.22), "bladder_wall")
    # pancreas as a chain of spheres (head near the duodenum on the right, tail at the spleen)
    pancreas_path: tuple[tuple[float, float, float], ...] = (
        (0.18, 0.02, 0.08), (0.02, 0.02, 0.14), (-0.20, -0.04, 0.20), (-0.40, -0.10, 0.28),
    )
    pancreas_radius: float = 0.075
    # colon centre line: ascending (right), transverse (anterior), descending (left), sigmoid
    colon_path: tuple[tuple[float, float, float], ...] = (
        (0.60, -0.05, -0.55), (0.62, 0.0, 0.0), (0.55, 0.15, 0.22), (0.0, 0.42, 0.24),
        (-0.55, 0.15, 0.22), (-0.64, -0.02, -0.10), (-0.58, 0.0, -0.50), (-0.25, 0.05, -0.62),
    )
    colon_radius: float = 0.10
    spine_centre: tuple[float, float] = (0.0, -0.50)
    vertebral_body_radius: float = 0.13
    vertebrae: tuple[str, ...] = (      # inferior to superior
        "vertebrae_L5", "vertebrae_L4", "vertebrae_L3", "vertebrae_L2", "vertebrae_L1", "vertebrae_T12",
    )
    aorta: tuple[float, float, float] = (-0.07, -0.28, 0.065)   # x, y, radius
    ivc: tuple[float, float, float] = (0.13, -0.25, 0.07)
    esophagus: tuple[float, float, float] = (-0.06, -0.22, 0.06)


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


class _Grid:
    """Voxel coordinates of a volume in body coordinates (see ``Ellipsoid``)."""

    def __init__(self, shape: tuple[int, int, int], spacing: tuple[float, float, float]):
        self.shape = shape
        self.spacing = spacing
        # one in-plane unit for both axes keeps the body elliptical whatever the array aspect is
        self.r_plane = min(shape[0] * spacing[0], shape[1] * spacing[1]) / 2.0
        self.r_z = shape[2] * spacing[2] / 2.0
        self.unit_mm = np.array([self.r_plane, self.r_plane, self.r_z])
        ax = [(np.arange(n) - (n - 1) / 2.0) * s for n, s in zip(shape, spacing)]
        self.x = (ax[0] / self.r_plane)[:, None, None]
        self.y = (ax[1] / self.r_plane)[None, :, None]
        self.z = (ax[2] / self.r_z)[None, None, :]
        # a structure never thinner than about one voxel, so small phantoms keep every organ
        self.min_semi = np.array(spacing) * 0.9 / self.unit_mm

    def ellipsoid(self, centre: Sequence[float], semi: Sequence[float]) -> np.ndarray:
        semi = np.maximum(np.asarray(semi, float), self.min_semi)
        return (
            ((self.x - centre[0]) / semi[0]) ** 2
            + ((self.y - centre[1]) / semi[1]) ** 2
            + ((self.z - centre[2]) / semi[2]) ** 2
        ) <= 1.0

    def cylinder_z(self, cx: float, cy: float, radius: float, z_lo: float = -9.0, z_hi: float = 9.0) -> np.ndarray:
        r = max(radius, float(self.min_semi[:2].max()))
        disk = ((self.x - cx) ** 2 + (self.y - cy) ** 2) <= r**2
        return disk & (self.z >= z_lo) & (self.z <= z_hi)

    def tube(self, path: Sequence[Sequence[float]], radius: float, samples_per_segment: int = 12) -> np.ndarray:
        """Union of spheres along a polyline; distance is measured in in-plane units (z rescaled)."""
        pts = np.asarray(path, float)
        dense = [pts[0]]
        for a, b in zip(pts[:-1], pts[1:]):
            for t in np.linspace(0, 1, samples_per_segment + 1)[1:]:
                dense.append(a + (b - a) * t)
        dense = np.asarray(dense)
        r = max(radius, float(self.min_semi.max()))
        zscale = self.r_z / self.r_plane
        out = np.zeros(self.shape, bool)
        for p in dense:
            # restrict each sphere test to its bounding slab for speed
            out |= ((self.x - p[0]) ** 2 + (self.y - p[1]) ** 2 + ((self.z - p[2]) * zscale) ** 2) <= r**2
        return out


def _affine(shape: Sequence[int], spacing: Sequence[float]) -> np.ndarray:
    # RAS+ like TotalSegmentator's outputs: array axis 0 runs to patient right, 1 anterior, 2 superior
    aff = np.diag([float(spacing[0]), float(spacing[1]), float(spacing[2]), 1.0])
    aff[:3, 3] = [-(n - 1) / 2.0 * s for n, s in zip(shape, spacing)]
    return aff


def _jittered(e: Ellipsoid, rng: np.random.Generator, amount: float) -> tuple[np.ndarray, np.ndarray]:
    c = np.asarray(e.centre) + rng.uniform(-amount, amount, 3) * np.asarray(e.semi)
    s = np.asarray(e.semi) * (1.0 + rng.uniform(-amount, amount, 3))
    return c, s


def _shell(mask: np.ndarray) -> np.ndarray:
    """One-voxel outer layer of a mask (the organ wall of a hollow organ)."""
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def _hu(tissue: str, enhanced: bool) -> float:
    return TISSUE_HU[tissue][1 if enhanced else 0]


def _build_anatomy(
    grid: _Grid, cfg: PhantomConfig, rng: np.random.Generator, enhanced: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return clean CT (HU, no noise), organ labels and the body mask."""
    shape = grid.shape
    ct = np.full(shape, _hu("air", enhanced), np.float32)
    organs = np.zeros(shape, np.uint8)
    j = cfg.jitter

    bx, by = (np.asarray(cfg.body_semi) * (1.0 + rng.uniform(-j, j, 2))).tolist()
    body = np.broadcast_to(((grid.x / bx) ** 2 + (grid.y / by) ** 2) <= 1.0, shape)
    fat_in = cfg.subcutaneous_fat
    inner_wall = np.broadcast_to(
        ((grid.x / (bx * (1 - fat_in))) ** 2 + (grid.y / (by * (1 - fat_in))) ** 2) <= 1.0, shape
    )
    m = fat_in + cfg.wall_muscle
    cavity = np.broadcast_to(((grid.x / (bx * (1 - m))) ** 2 + (grid.y / (by * (1 - m))) ** 2) <= 1.0, shape)
    ct[body] = _hu("fat", enhanced)
    ct[inner_wall & ~cavity] = _hu("muscle", enhanced)
    ct[cavity] = _hu("fat", enhanced)  # visceral fat fills the space between organs

    def put(mask: np.ndarray, name: str | None, tissue: str | float) -> None:
        mask = mask & cavity
        ct[mask] = _hu(tissue, enhanced) if isinstance(tissue, str) else tissue
        if name is not None:
            organs[mask] = TS_V2_IDS[name]

    # paraspinal and psoas muscles beside the spine
    sx, sy = cfg.spine_centre
    r_vb = cfg.vertebral_body_radius
    for side in (-1, 1):
        put(grid.cylinder_z(side * 0.22, sy - 0.08, 0.11), None, "muscle")
        put(grid.ellipsoid((side * 0.17, sy + 0.05, -0.6), (0.08, 0.08, 0.7)), None, "muscle")

    for e in cfg.lungs:
        c, s = _jittered(e, rng, j)
        put(grid.ellipsoid(c, s), e.name, "lung")

    # spine: vertebral bodies split along z by discs, with a cortical rim and a spinous process
    n_lv = len(cfg.vertebrae)
    edges = np.linspace(-1.0, 1.0, n_lv + 1)
    vb = grid.cylinder_z(sx, sy, r_vb)
    posterior = grid.cylinder_z(sx, sy - r_vb * 1.7, r_vb * 0.45)
    bone = vb | posterior
    zz = np.broadcast_to(grid.z, shape)
    disc_half = max(0.03, 0.6 * grid.spacing[2] / grid.r_z)
    for k, name in enumerate(cfg.vertebrae):
        level = bone & (zz >= edges[k] + disc_half) & (zz < edges[k + 1] - disc_half)
        if not level.any():  # very few slices: drop the disc gap instead of the vertebra
            level = bone & (zz >= edges[k]) & (zz < edges[k + 1])
        put(level, name, "cancellous_bone")
        ct[_shell(level) & cavity] = _hu("cortical_bone", enhanced)
    put(vb & (organs == 0), None, "disc")

    # great vessels
    ax_, ay_, ar_ = cfg.aorta
    put(grid.cylinder_z(ax_, ay_, ar_, z_lo=-0.55), "aorta", "aorta")
    ix_, iy_, ir_ = cfg.ivc
    put(grid.cylinder_z(ix_, iy_, ir_, z_lo=-0.6, z_hi=0.45), "inferior_vena_cava", "ivc")

    # parenchymal organs; later ones win where ellipsoids touch
    for e in cfg.parenchyma:
        c, s = _jittered(e, rng, j)
        mask = grid.ellipsoid(c, s) & (organs == 0) | grid.ellipsoid(c, s) & (organs == TS_V2_IDS["inferior_vena_cava"])
        if e.tissue == "kidney":
            # renal sinus fat at the medial hilum (unlabelled, as TotalSegmentator leaves it)
            hilum_c = (c[0] - np.sign(c[0]) * s[0] * 0.8, c[1] + s[1] * 0.2, c[2])
            sinus = grid.ellipsoid(hilum_c, s * np.array([0.45, 0.35, 0.45]))
            put(mask & ~sinus, e.name, "kidney")
            put(mask & sinus, None, "renal_sinus")
        else:
            put(mask, e.name, e.tissue)

    pancreas = grid.tube(
        np.asarray(cfg.pancreas_path) + rng.uniform(-j, j, 3) * cfg.pancreas_radius, cfg.pancreas_radius
    )
    put(pancreas & ((organs == 0) | (organs == TS_V2_IDS["inferior_vena_cava"])), "pancreas", "pancreas")

    def hollow(mask: np.ndarray, name: str, wall: str, lumen_fill: str, gas_level: float | None) -> None:
        mask = mask & cavity
        put(mask, name, wall)
        lumen = mask & ~_shell(mask)
        ct[lumen] = _hu(lumen_fill, enhanced)
        if gas_level is not None:
            # supine patient: gas rises anteriorly (higher y) above the fluid level
            yy = np.broadcast_to(grid.y, shape)
            ct[lumen & (yy > gas_level)] = _hu("gas", enhanced)

    c, s = _jittered(cfg.gallbladder, rng, j)
    hollow(grid.ellipsoid(c, s) & np.isin(organs, [0, TS_V2_IDS["liver"]]), "gallbladder", "bowel_wall", "bile", None)

    c, s = _jittered(cfg.stomach, rng, j)
    stomach = grid.ellipsoid(c, s) & np.isin(organs, [0, TS_V2_IDS["liver"], TS_V2_IDS["spleen"]])
    hollow(stomach, "stomach", "bowel_wall", "gastric_fluid", c[1] + rng.uniform(-0.3, 0.3) * s[1])

    ex, ey, er = cfg.esophagus
    eso = grid.cylinder_z(ex, ey, er, z_lo=0.62) & (organs == 0)
    put(eso, "esophagus", "esophagus")

    colon = grid.tube(np.asarray(cfg.colon_path) + rng.uniform(-j, j, 3) * cfg.colon_radius, cfg.colon_radius)
    colon &= organs == 0
    hollow(colon, "colon", "bowel_wall", "stool", float(rng.uniform(-0.05, 0.1)))

    c, s = _jittered(cfg.bladder, rng, j)
    hollow(grid.ellipsoid(c, s) & (organs == 0), "urinary_bladder", "bladder_wall", "urine", None)

    # smooth low-frequency texture inside soft tissue so organs are not flat
    tex = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), 2.0)
    tex *= cfg.texture_hu / max(float(tex.std()), 1e-6)
    soft = body & (ct > -200) & (ct < 300)
    ct[soft] += tex[soft]
    return ct, organs, np.ascontiguousarray(body)


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
