"""The abdominal phantom's anatomy: the organ tables (TotalSegmentator v2 ids, tissue HU), the layout
(``PhantomConfig``, organs as ``Ellipsoid`` in body-relative coordinates, so any shape/spacing keeps every
organ) and ``_build_anatomy``, which draws it part by part. ``phantoms`` builds phantoms from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import ndimage

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


def _jittered(e: Ellipsoid, rng: np.random.Generator, amount: float) -> tuple[np.ndarray, np.ndarray]:
    c = np.asarray(e.centre) + rng.uniform(-amount, amount, 3) * np.asarray(e.semi)
    s = np.asarray(e.semi) * (1.0 + rng.uniform(-amount, amount, 3))
    return c, s


def _shell(mask: np.ndarray) -> np.ndarray:
    """One-voxel outer layer of a mask (the organ wall of a hollow organ)."""
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def _hu(tissue: str, enhanced: bool) -> float:
    return TISSUE_HU[tissue][1 if enhanced else 0]


class _Anatomy:
    """The volumes being drawn (CT in HU, organ labels) and the two ways an organ is drawn into them,
    both confined to the body cavity: ``put`` (one tissue) and ``hollow`` (a wall around a filled lumen)."""

    def __init__(self, grid: _Grid, enhanced: bool) -> None:
        self.grid, self.enhanced = grid, enhanced
        self.ct = np.full(grid.shape, _hu("air", enhanced), np.float32)
        self.organs = np.zeros(grid.shape, np.uint8)
        self.cavity = np.zeros(grid.shape, bool)  # set by _draw_body_wall

    def put(self, mask: np.ndarray, name: str | None, tissue: str | float) -> None:
        mask = mask & self.cavity
        self.ct[mask] = _hu(tissue, self.enhanced) if isinstance(tissue, str) else tissue
        if name is not None:
            self.organs[mask] = TS_V2_IDS[name]

    def hollow(self, mask: np.ndarray, name: str, wall: str, lumen_fill: str, gas_level: float | None) -> None:
        mask = mask & self.cavity
        self.put(mask, name, wall)
        lumen = mask & ~_shell(mask)
        self.ct[lumen] = _hu(lumen_fill, self.enhanced)
        if gas_level is not None:
            # supine patient: gas rises anteriorly (higher y) above the fluid level
            yy = np.broadcast_to(self.grid.y, self.grid.shape)
            self.ct[lumen & (yy > gas_level)] = _hu("gas", self.enhanced)


def _build_anatomy(
    grid: _Grid, cfg: PhantomConfig, rng: np.random.Generator, enhanced: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return clean CT (HU, no noise), organ labels and the body mask. The parts are drawn in this order
    (later ones win where they overlap, and the random draws follow it)."""
    a = _Anatomy(grid, enhanced)
    body = _draw_body_wall(a, cfg, rng)
    _draw_muscles_and_lungs(a, cfg, rng)
    _draw_spine(a, cfg)
    _draw_vessels_and_parenchyma(a, cfg, rng)
    _draw_hollow_organs(a, cfg, rng)

    # smooth low-frequency texture inside soft tissue so organs are not flat
    tex = ndimage.gaussian_filter(rng.standard_normal(grid.shape).astype(np.float32), 2.0)
    tex *= cfg.texture_hu / max(float(tex.std()), 1e-6)
    soft = body & (a.ct > -200) & (a.ct < 300)
    a.ct[soft] += tex[soft]
    return a.ct, a.organs, np.ascontiguousarray(body)


def _draw_body_wall(a: _Anatomy, cfg: PhantomConfig, rng: np.random.Generator) -> np.ndarray:
    """Subcutaneous fat, the muscular wall and the visceral fat of the cavity; returns the body mask."""
    grid, shape, j = a.grid, a.grid.shape, cfg.jitter
    bx, by = (np.asarray(cfg.body_semi) * (1.0 + rng.uniform(-j, j, 2))).tolist()
    body = np.broadcast_to(((grid.x / bx) ** 2 + (grid.y / by) ** 2) <= 1.0, shape)
    fat_in = cfg.subcutaneous_fat
    inner_wall = np.broadcast_to(
        ((grid.x / (bx * (1 - fat_in))) ** 2 + (grid.y / (by * (1 - fat_in))) ** 2) <= 1.0, shape
    )
    m = fat_in + cfg.wall_muscle
    cavity = np.broadcast_to(((grid.x / (bx * (1 - m))) ** 2 + (grid.y / (by * (1 - m))) ** 2) <= 1.0, shape)
    a.ct[body] = _hu("fat", a.enhanced)
    a.ct[inner_wall & ~cavity] = _hu("muscle", a.enhanced)
    a.ct[cavity] = _hu("fat", a.enhanced)  # visceral fat fills the space between organs
    a.cavity = cavity
    return body


def _draw_muscles_and_lungs(a: _Anatomy, cfg: PhantomConfig, rng: np.random.Generator) -> None:
    # paraspinal and psoas muscles beside the spine
    sy = cfg.spine_centre[1]
    for side in (-1, 1):
        a.put(a.grid.cylinder_z(side * 0.22, sy - 0.08, 0.11), None, "muscle")
        a.put(a.grid.ellipsoid((side * 0.17, sy + 0.05, -0.6), (0.08, 0.08, 0.7)), None, "muscle")
    for e in cfg.lungs:
        c, s = _jittered(e, rng, cfg.jitter)
        a.put(a.grid.ellipsoid(c, s), e.name, "lung")


def _draw_spine(a: _Anatomy, cfg: PhantomConfig) -> None:
    """Vertebral bodies split along z by discs, with a cortical rim and a spinous process."""
    grid = a.grid
    sx, sy = cfg.spine_centre
    r_vb = cfg.vertebral_body_radius
    n_lv = len(cfg.vertebrae)
    edges = np.linspace(-1.0, 1.0, n_lv + 1)
    vb = grid.cylinder_z(sx, sy, r_vb)
    posterior = grid.cylinder_z(sx, sy - r_vb * 1.7, r_vb * 0.45)
    bone = vb | posterior
    zz = np.broadcast_to(grid.z, grid.shape)
    disc_half = max(0.03, 0.6 * grid.spacing[2] / grid.r_z)
    for k, name in enumerate(cfg.vertebrae):
        level = bone & (zz >= edges[k] + disc_half) & (zz < edges[k + 1] - disc_half)
        if not level.any():  # very few slices: drop the disc gap instead of the vertebra
            level = bone & (zz >= edges[k]) & (zz < edges[k + 1])
        a.put(level, name, "cancellous_bone")
        a.ct[_shell(level) & a.cavity] = _hu("cortical_bone", a.enhanced)
    a.put(vb & (a.organs == 0), None, "disc")


def _draw_vessels_and_parenchyma(a: _Anatomy, cfg: PhantomConfig, rng: np.random.Generator) -> None:
    grid, j, organs = a.grid, cfg.jitter, a.organs
    # great vessels
    ax_, ay_, ar_ = cfg.aorta
    a.put(grid.cylinder_z(ax_, ay_, ar_, z_lo=-0.55), "aorta", "aorta")
    ix_, iy_, ir_ = cfg.ivc
    a.put(grid.cylinder_z(ix_, iy_, ir_, z_lo=-0.6, z_hi=0.45), "inferior_vena_cava", "ivc")

    # parenchymal organs; later ones win where ellipsoids touch
    for e in cfg.parenchyma:
        c, s = _jittered(e, rng, j)
        mask = grid.ellipsoid(c, s) & (organs == 0) | grid.ellipsoid(c, s) & (organs == TS_V2_IDS["inferior_vena_cava"])
        if e.tissue == "kidney":
            # renal sinus fat at the medial hilum (unlabelled, as TotalSegmentator leaves it)
            hilum_c = (c[0] - np.sign(c[0]) * s[0] * 0.8, c[1] + s[1] * 0.2, c[2])
            sinus = grid.ellipsoid(hilum_c, s * np.array([0.45, 0.35, 0.45]))
            a.put(mask & ~sinus, e.name, "kidney")
            a.put(mask & sinus, None, "renal_sinus")
        else:
            a.put(mask, e.name, e.tissue)

    pancreas = grid.tube(
        np.asarray(cfg.pancreas_path) + rng.uniform(-j, j, 3) * cfg.pancreas_radius, cfg.pancreas_radius
    )
    a.put(pancreas & ((organs == 0) | (organs == TS_V2_IDS["inferior_vena_cava"])), "pancreas", "pancreas")


def _draw_hollow_organs(a: _Anatomy, cfg: PhantomConfig, rng: np.random.Generator) -> None:
    """Gallbladder, stomach (with a gas level), esophagus, colon (with gas) and bladder."""
    grid, j, organs = a.grid, cfg.jitter, a.organs
    c, s = _jittered(cfg.gallbladder, rng, j)
    a.hollow(grid.ellipsoid(c, s) & np.isin(organs, [0, TS_V2_IDS["liver"]]), "gallbladder", "bowel_wall", "bile", None)

    c, s = _jittered(cfg.stomach, rng, j)
    stomach = grid.ellipsoid(c, s) & np.isin(organs, [0, TS_V2_IDS["liver"], TS_V2_IDS["spleen"]])
    a.hollow(stomach, "stomach", "bowel_wall", "gastric_fluid", c[1] + rng.uniform(-0.3, 0.3) * s[1])

    ex, ey, er = cfg.esophagus
    eso = grid.cylinder_z(ex, ey, er, z_lo=0.62) & (organs == 0)
    a.put(eso, "esophagus", "esophagus")

    colon = grid.tube(np.asarray(cfg.colon_path) + rng.uniform(-j, j, 3) * cfg.colon_radius, cfg.colon_radius)
    colon &= organs == 0
    a.hollow(colon, "colon", "bowel_wall", "stool", float(rng.uniform(-0.05, 0.1)))

    c, s = _jittered(cfg.bladder, rng, j)
    a.hollow(grid.ellipsoid(c, s) & (organs == 0), "urinary_bladder", "bladder_wall", "urine", None)
