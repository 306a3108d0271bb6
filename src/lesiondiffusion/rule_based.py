"""Rule-based lesion generator: the weight-free baseline backend of ``LesionGenerator``.

It places the lesion with ``placement.place_lesion``, draws an ellipsoid (``shape`` round/oval) or a
lobulated/irregular blob, fills it with a texture whose mean HU comes from the catalog's
``hu_range(density, enhancement)`` and whose variation follows ``density_variations``, and blends it
into the CT with a soft edge. Voxels outside the dilated lesion mask stay bit-identical to the input.
It never replaces LesionDiffusion as the default backend; it is chosen explicitly (``rule_based``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np
from scipy import ndimage

from .errors import CatalogError, SynthesisError
from .generator import SynthesisResult
from .geometry import generate_canonical
from .placement import NoPlacement, place_lesion

if TYPE_CHECKING:
    from .catalog import Catalog
    from .organs import OrganMap
    from .report import LesionReport

log = logging.getLogger(__name__)


@dataclass
class RuleBasedGenerator:
    """Procedural lesions (no trained weights) with the same call signature as ``LesionSynthesizer``.

    ``edge_sigma_mm`` softens the boundary (partial-volume look); ``blend_margin_vox`` is how far
    the blend may reach beyond the hard mask. ``lobulation`` scales the radial perturbation of
    lobulated/irregular shapes.
    """

    edge_sigma_mm: float = 1.0
    blend_margin_vox: int = 2
    lobulation: float = 0.25
    homogeneous_std_hu: float = 6.0
    heterogeneous_std_frac: float = 0.25

    def __call__(
        self,
        ct: np.ndarray,
        organs: "OrganMap",
        reports: Sequence["LesionReport"],
        catalogs: "Sequence[Catalog] | Catalog",
        *,
        seed: int,
    ) -> list[SynthesisResult]:
        if ct.shape != organs.labels.shape:
            raise SynthesisError(
                f"CT shape {ct.shape} differs from organ map shape {organs.labels.shape}; resample the organ map "
                "onto the CT grid first."
            )
        # the same canonical (RAS) order as the diffusion pipeline: a seed places the same lesion in
        # world coordinates whatever the array order
        return generate_canonical(self._generate, ct, organs, reports, catalogs, seed=seed)

    def _generate(self, ct: np.ndarray, organs: "OrganMap", reports: Sequence["LesionReport"],
                  catalogs: "Sequence[Catalog] | Catalog", *, seed: int) -> list[SynthesisResult]:
        rng = np.random.default_rng(seed)
        results = []
        for report in reports:
            catalog = _catalog_for(report, catalogs)
            sub_seed = int(rng.integers(0, 2**31 - 1))
            try:
                results.append(self._one(ct, organs, report, catalog, np.random.default_rng(sub_seed)))
            except Exception as exc:  # one bad report must not sink the others; callers count failures
                log.debug("rule-based synthesis failed", exc_info=True)
                results.append(SynthesisResult(None, None, report, None, failure=f"{type(exc).__name__}: {exc}"))
        return results

    def _one(self, ct: np.ndarray, organs: "OrganMap", report: "LesionReport", catalog: "Catalog",
             rng: np.random.Generator) -> SynthesisResult:
        box = place_lesion(organs, report, catalog, rng, on_failure="return")
        if isinstance(box, NoPlacement):
            return SynthesisResult(None, None, report, None, failure=f"no placement: {box.reason}")
        report = box.report
        spacing = np.asarray(organs.spacing, dtype=np.float64)
        # work on the box grown by the blend margin and a few voxels for the lobulation noise only
        pad = self.blend_margin_vox + 2
        lo = np.maximum(np.asarray(box.lo) - pad, 0)
        hi = np.minimum(np.asarray(box.hi) + pad, ct.shape)
        region = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
        grid = np.meshgrid(*[np.arange(a, b, dtype=np.float64) for a, b in zip(lo, hi)], indexing="ij")
        # the voxel box is already in array order (size_mm is in patient axes), so take the extent from it
        extent_mm = (np.asarray(box.hi) - np.asarray(box.lo)) * spacing
        semi = np.maximum(extent_mm / 2.0, spacing * 0.75)
        r2 = sum(((g - c) * s / a) ** 2 for g, c, s, a in zip(grid, box.center_vox, spacing, semi))
        radius = np.sqrt(r2)
        shape = (report.shape or "").lower()
        if any(k in shape for k in ("lobul", "irregular", "patchy")):
            noise = ndimage.gaussian_filter(rng.standard_normal(radius.shape), sigma=max(1.0, min(radius.shape) / 6))
            noise /= max(np.abs(noise).max(), 1e-6)
            radius = radius * (1.0 + self.lobulation * noise)
        hard = radius <= 1.0
        if box.category in ("within_parenchyma", "wall", "lumen") and box.organ_names:
            hard &= organs.mask(box.organ_names)[region]
        if not hard.any():
            return SynthesisResult(None, None, report, box, failure="empty lesion mask after organ constraint")

        lo_hu, hi_hu = catalog.hu_range(report.density, report.enhancement)
        mean_hu = float(rng.uniform(min(lo_hu, hi_hu), max(lo_hu, hi_hu)))
        span = abs(hi_hu - lo_hu) + 10.0
        density = (report.density or "").lower()
        features = (report.specific_features or "").lower()
        if (report.density_variations or "").lower().startswith("hetero") or "mixed" in density:
            texture = ndimage.gaussian_filter(rng.standard_normal(hard.shape), sigma=1.5)
            texture = texture / max(texture.std(), 1e-6) * self.heterogeneous_std_frac * span
        else:
            texture = rng.standard_normal(hard.shape) * self.homogeneous_std_hu
        lesion_hu = mean_hu + texture
        if "decreased density" in features or "cavitation" in features:
            # a darker core towards fluid density (necrosis, cavity)
            core = np.clip(1.0 - radius / 0.6, 0.0, 1.0)
            lesion_hu = lesion_hu * (1 - core) + (-500.0 if "cavitation" in features else 10.0) * core
        elif "ring" in density:
            rim = np.clip((radius - 0.6) / 0.4, 0.0, 1.0)
            lesion_hu = lesion_hu + rim * 0.5 * span
        if any(k in features for k in ("increased density", "calcification", "stone")):
            # a few bright foci inside the lesion
            spots = (rng.random(hard.shape) < 0.02) & hard
            spots = ndimage.binary_dilation(spots)
            lesion_hu = np.where(spots, 300.0 if "increased" not in features else mean_hu + 40.0, lesion_hu)

        sigma_vox = self.edge_sigma_mm / spacing
        weight = ndimage.gaussian_filter(hard.astype(np.float32), sigma=sigma_vox)
        weight[hard] = np.maximum(weight[hard], 0.5)
        blend_zone = ndimage.binary_dilation(hard, iterations=self.blend_margin_vox)
        weight = np.where(blend_zone, np.clip(weight, 0.0, 1.0), 0.0).astype(np.float32)

        image = ct.copy()
        sub = image[region]
        blended = sub * (1.0 - weight) + lesion_hu.astype(sub.dtype, copy=False) * weight
        # voxels outside the blend zone are written back untouched, so they stay bit-identical
        sub[blend_zone] = blended[blend_zone].astype(sub.dtype, copy=False)
        if not np.isfinite(sub[blend_zone]).all():
            return SynthesisResult(None, None, report, box, failure="non-finite intensities in the lesion")
        mask = np.zeros(ct.shape, dtype=np.uint8)
        mask[region][hard] = 1
        info = {"backend": "rule_based", "mean_hu": mean_hu, "voxels": int(hard.sum())}
        return SynthesisResult(image, mask, report, box, info=info)


@dataclass
class NoLesionGenerator(RuleBasedGenerator):
    """The no-new-lesion control (backend ``no_lesion``): every draw is placed and shaped exactly as
    ``RuleBasedGenerator`` places it for the same seed, then nothing is written. The CT comes back
    unchanged, ``lesion_mask`` marks where the lesion would have gone (so a consumer crops the same
    region) and ``info["inpainted"]`` is False, so the trainer leaves that region unlabelled.

    Why it exists: a synthetic-then-real schedule is also extra training on the templates under new
    crops. Training with this backend on the same schedule measures that part alone; the difference to
    ``rule_based`` or ``lesiondiffusion`` is what the synthetic lesions themselves add.
    """

    def _one(self, ct: np.ndarray, organs: "OrganMap", report: "LesionReport", catalog: "Catalog",
             rng: np.random.Generator) -> SynthesisResult:
        placed = super()._one(ct, organs, report, catalog, rng)  # same rng draws -> same box as rule_based
        if not placed.ok:
            return placed
        info = {"backend": "no_lesion", "inpainted": False, "voxels": int(placed.lesion_mask.sum())}
        return SynthesisResult(ct.copy(), placed.lesion_mask, placed.report, placed.box, info=info)


def _catalog_for(report: "LesionReport", catalogs: "Sequence[Catalog] | Catalog") -> "Catalog":
    if hasattr(catalogs, "hu_range"):
        return catalogs  # a single catalog serves every report
    for cat in catalogs:
        if cat.name == report.lesion_type:
            return cat
    names = ", ".join(c.name for c in catalogs)
    raise CatalogError(
        f"Report lesion_type {report.lesion_type!r} matches none of the catalogs given ({names}); pass its catalog."
    )
