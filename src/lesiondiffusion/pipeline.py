"""``LesionSynthesizer``: the LesionDiffusion pipeline behind the ``LesionGenerator`` interface.

report -> placement box -> crop around the box resampled to the bundle spacing -> LMNet DDIM mask ->
binary mask checks (box, organ, volume; bounded retries) -> VQ encode -> LINet masked latent DDIM with
classifier-free guidance -> decode -> resample back -> blend inside the slightly dilated mask only.

Interpolation: into the crop the CT is trilinear (order 1, edge values past the image border) and organ
labels are nearest (order 0, background past the border); back to the input grid the generated image
is trilinear, and LMNet's sample is trilinear as a continuous field thresholded on the input grid
(``sample_to_grid``: smooth surfaces when the crop is much coarser than the CT). Axes are the array axes of the
input; spacing per axis comes from the affine's column norms (oblique affines are treated per axis).

This module runs the stages; the mask checks live in ``mask_acceptance``, the HU correction and the blend
in ``blending`` (their names are importable from here as before).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from scipy import ndimage

from .blending import (  # noqa: F401  (the HU-correction helpers are importable from here as before)
    HU_CORRECTIONS,
    HU_INFO_KEYS,
    blend,
    correct_hu,
    hu_correction_note,
    hu_correction_record,
    hu_correction_summary,
)
from .bundle import Bundle
from .errors import LesionDiffusionError, SynthesisError
from .generator import SynthesisResult
from .geometry import CropGeometry, generate_canonical
from .mask_acceptance import INSIDE_ORGAN, accept_mask, mask_in_organ_fraction, sample_to_grid  # noqa: F401
from .models import lmnet as lmnet_mod
from .models.vqgan import hu_to_unit, unit_to_hu
from .organs import TOTALSEG_V2
from .placement import NoPlacement, place_lesion
from .sampling import (SAMPLERS, codebook_range, inpaint_latent, latent_mask, make_sampler, null_context, organ_semantics,
                       sample_mask)

log = logging.getLogger(__name__)


@dataclass
class SynthesisConfig:
    """Run-time settings of the pipeline (the networks' settings live in the bundle)."""

    ddim_steps: int | None = None  # None: the bundle's schedule.ddim_steps (sampling steps, whichever sampler)
    sampler: str = "ddim"  # "ddim" (the method's) or "pndm" (MONAI's PLMS); benchmarks/bench_steps.py compares them
    guidance_scale: float | None = None  # None: the bundle's schedule.guidance_scale (1.0 = no CFG)
    mask_threshold: float = 0.0  # LMNet samples masks in [-1, 1]; > threshold is lesion
    max_retries: int = 2  # new LMNet noise after a rejected mask, per lesion
    min_volume_fraction: float = 0.1  # of the report's ellipsoid volume (pi/6 * x * y * z)
    min_organ_fraction: float | None = None  # None: the catalog's placement.min_organ_fraction (benchmarks: 0)
    # "in the organ", one rule for every placement kind: LMNet's own mask (before the box and organ clips)
    # is redrawn when less than ``min_mask_in_organ`` of it lies in its organ or within ``organ_margin_vox``
    # voxels outside the organ's surface. The margin lets a protruding lesion and a lesion of a 2-3 voxel
    # thin organ (adrenal) pass when they hug the organ, while one sitting mostly in the fat beside it
    # is redrawn (measured: adrenal masks with 17-21 % in the gland passed the clipped 25 % rule). 0 disables.
    min_mask_in_organ: float = 0.5
    organ_margin_vox: int = 1
    blend_dilation: int = 1  # voxels: the region that may change is the mask dilated this much
    feather_sigma: float = 0.7  # voxels: soft weight in the dilation ring (1 inside the mask)
    hu_clip: tuple[float, float] = (-1024.0, 3071.0)  # valid CT range applied to changed voxels
    # what to do when the lesion's mean HU leaves the catalog's range for its density: "off" keeps what the
    # model made (evaluation), "shift" moves the whole generated patch so the mean reaches the nearest bound
    # (texture kept), "clip" clips lesion voxels into the range (the surroundings move by the mean change)
    hu_correction: str = "off"  # the method's output by default; shift/clip are recorded in the result's info
    batch_size: int = 8  # lesions per network batch
    use_crop: bool = True  # False: run on the whole volume (benchmark of the crop's benefit)
    fit_trained_crop: bool = True  # False: grow the crop around a large box (benchmark of the coarse spacing)
    crop_fill: float = 1.0  # share of the trained LMNet crop a box (+ margins) may span before the spacing coarsens
    amp: bool = True  # bf16 (or fp16) autocast for the diffusion networks on CUDA
    on_failure: str = "result"  # "result": failed lesions come back with .failure; "raise": SynthesisError
    text_conditioning: bool = True  # False: null prompts for LMNet and LINet (the text ablation, Table 2)

    def __post_init__(self) -> None:
        if self.hu_correction not in HU_CORRECTIONS:
            raise LesionDiffusionError(
                f"hu_correction={self.hu_correction!r}: use one of {', '.join(HU_CORRECTIONS)} (off keeps the model's "
                "intensities, shift moves the lesion mean into the catalog's range, clip clips lesion voxels)."
            )
        if self.sampler not in SAMPLERS:
            raise LesionDiffusionError(f"sampler={self.sampler!r}: use one of {', '.join(SAMPLERS)}.")
        if self.on_failure not in ("result", "raise"):
            raise LesionDiffusionError(f"on_failure={self.on_failure!r}: use 'result' or 'raise'.")
        if not 0.0 <= self.min_mask_in_organ <= 1.0 or self.organ_margin_vox < 0:
            raise LesionDiffusionError(
                f"min_mask_in_organ={self.min_mask_in_organ}, organ_margin_vox={self.organ_margin_vox}: the share "
                "must lie in [0, 1] (0 disables the in-organ rule) and the margin must be >= 0 voxels."
            )
        if self.max_retries < 0 or self.batch_size < 1 or self.blend_dilation < 0:
            raise LesionDiffusionError(
                f"max_retries={self.max_retries}, batch_size={self.batch_size}, blend_dilation={self.blend_dilation}: "
                "they must be >= 0, >= 1 and >= 0."
            )


def _check_device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise LesionDiffusionError(f"device {device!r} is not a torch device ({exc}); use cpu, cuda or cuda:N.") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LesionDiffusionError(f"device {device!r} requested but CUDA is not available here; use --device cpu.")
    return dev


def _round_up(value: float, multiple: int) -> int:
    return int(math.ceil(value / multiple - 1e-9) * multiple)


def _organ_lut(organs: Any) -> np.ndarray:
    """Input label id -> canonical TotalSegmentator v2 id (LMNet's organ-semantics channel)."""
    v1_to_v2 = {"heart_myocardium": "heart", "heart_atrium_left": "heart", "heart_ventricle_left": "heart",
                "heart_atrium_right": "heart", "heart_ventricle_right": "heart", "face": "skull"}
    # sized by the name table, not the volume's max label: labels beyond it are unnamed (-> 0), and the
    # full volume is never scanned (cost scales with the lesion, not the image)
    lut = np.zeros(max(organs.names.values(), default=0) + 2, dtype=np.float32)
    for name, label in organs.names.items():
        lut[int(label)] = TOTALSEG_V2.get(name, TOTALSEG_V2.get(v1_to_v2.get(name, ""), 0))
    return lut


@dataclass
class _Item:
    index: int
    report: Any
    catalog: Any
    box: Any = None
    geometry: CropGeometry | None = None
    seed: int = 0
    attempts: int = 0
    failure: str | None = None
    ct_crop: np.ndarray | None = None
    labels_crop: np.ndarray | None = None
    organ_crop: np.ndarray | None = None
    box_crop: np.ndarray | None = None
    region: tuple[slice, slice, slice] | None = None
    mask: np.ndarray | None = None  # final binary mask on ``region`` of the input grid
    info: dict[str, Any] = field(default_factory=dict)


class LesionSynthesizer:
    """Diffusion lesion generator (implements ``LesionGenerator``). Thread-compatible, not thread-safe."""

    def __init__(self, bundle: Bundle, device: str | torch.device = "cpu", config: SynthesisConfig | None = None) -> None:
        self.bundle = bundle
        self.device = _check_device(device)
        self.config = config or SynthesisConfig()
        # called with the step index after every denoising step of either network; the sample store's
        # producer uses it so that a pause asked for by the training loop takes effect within one step
        self.step_callback: Callable[[int], None] | None = None
        self.bundle.to(self.device).eval()
        bcfg = bundle.config
        self.lm_div = lmnet_mod.size_divisor(bcfg.lmnet)
        self.img_div = bcfg.vq_factor * lmnet_mod.size_divisor(bcfg.linet)

    @classmethod
    def from_bundle(cls, path: str | Path, device: str | torch.device = "cpu", **overrides: Any) -> "LesionSynthesizer":
        known = {f.name for f in fields(SynthesisConfig)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise LesionDiffusionError(f"unknown LesionSynthesizer option(s) {unknown}; allowed: {sorted(known)}.")
        bundle = Bundle.load(path, device=_check_device(device))
        return cls(bundle, device, SynthesisConfig(**overrides))

    # ---- geometry -----------------------------------------------------------------------------
    def geometry(self, box: Any, shape: Sequence[int], spacing: Sequence[float]) -> CropGeometry:
        bcfg = self.bundle.config
        sb = np.asarray(bcfg.spacing_mm, dtype=np.float64)
        so = np.asarray(spacing, dtype=np.float64)
        scale = sb / so
        if not self.config.use_crop:
            n = tuple(_round_up(s * o / b, self.img_div) for s, o, b in zip(shape, so, sb))
            return CropGeometry(np.asarray(shape, dtype=np.float64) / 2 - 0.5, scale, n, n)  # type: ignore[arg-type]
        lo, hi = np.asarray(box.lo, dtype=np.float64), np.asarray(box.hi, dtype=np.float64)
        box_mm = (hi - lo) * so
        crop = bcfg.crop
        # A box (plus margin) larger than the trained LMNet crop is synthesised at a coarser spacing chosen
        # so it fits, then resampled back: the networks only ever see crops of the size they were trained
        # on, instead of a grown crop they never saw (which gave noisy box-shaped lesions).
        need = (box_mm + 2 * crop.mask_margin_mm) / (np.asarray(crop.lmnet_size, dtype=np.float64) * sb * self.config.crop_fill)
        coarsen = max(1.0, float(need.max())) if self.config.fit_trained_crop else 1.0
        if coarsen > 1.0:
            sb = sb * coarsen
            scale = sb / so
        mask_size, image_size = [], []
        for a in range(3):
            m = max(crop.lmnet_size[a], math.ceil((box_mm[a] + 2 * crop.mask_margin_mm) / sb[a] - 1e-6))
            m = _round_up(m, max(self.lm_div, 2))
            i = max(crop.linet_size[a], m + 2 * math.ceil(crop.context_margin_mm / sb[a]))
            i = _round_up(i, self.img_div)
            if (i - m) % 2:
                i += self.img_div
            mask_size.append(m)
            image_size.append(i)
        center = (lo + hi - 1) / 2
        return CropGeometry(center, scale, tuple(image_size), tuple(mask_size), coarsen)  # type: ignore[arg-type]

    # ---- public API ---------------------------------------------------------------------------
    def __call__(
        self,
        ct: np.ndarray,
        organs: Any,
        reports: Sequence[Any],
        catalogs: Any,
        *,
        seed: int,
    ) -> list[SynthesisResult]:
        ct = np.asarray(ct)
        if ct.shape != organs.labels.shape:
            raise LesionDiffusionError(
                f"CT shape {ct.shape} differs from the organ label map shape {organs.labels.shape}; "
                "the organ map must be the segmentation of this CT (same grid)."
            )
        if not np.issubdtype(ct.dtype, np.number):
            raise LesionDiffusionError(f"CT array dtype {ct.dtype} is not numeric; pass HU values.")
        # placement, crops and networks work in the canonical (RAS) order the networks were trained in
        return generate_canonical(self._generate, ct, organs, reports, catalogs, seed=seed)

    def _generate(self, ct: np.ndarray, organs: Any, reports: Sequence[Any], catalogs: Any, *,
                  seed: int) -> list[SynthesisResult]:
        cats = list(catalogs) if isinstance(catalogs, (list, tuple)) else [catalogs] * len(reports)
        if len(cats) != len(reports):
            raise LesionDiffusionError(f"{len(reports)} reports but {len(cats)} catalogs; pass one catalog or one per report.")
        t0 = time.perf_counter()
        children = np.random.SeedSequence(int(seed)).spawn(len(reports))
        items: list[_Item] = []
        for i, (report, catalog) in enumerate(zip(reports, cats)):
            item = _Item(i, report, catalog, seed=int(children[i].generate_state(1)[0]))
            placed = place_lesion(organs, report, catalog, np.random.default_rng(children[i]), on_failure="skip")
            if isinstance(placed, NoPlacement):
                item.failure = f"no placement: {placed.reason}"
            else:
                item.box = placed
                item.report = placed.report
            items.append(item)

        live = [it for it in items if it.failure is None]
        self._ensure_phrases([it.report for it in live])
        if live:
            lut = _organ_lut(organs)
            for it in live:
                self._prepare(it, ct, organs, lut)
            live = [it for it in live if it.failure is None]
            with torch.inference_mode():
                self._run_masks(live, organs)
                done = [it for it in live if it.failure is None]
                self._run_images(done, ct)
        results = [self._result(it, ct) for it in items]
        total = time.perf_counter() - t0
        for r in results:
            r.info.setdefault("seconds_per_call", total)
        if self.config.on_failure == "raise":
            bad = [r for r in results if r.failure]
            if bad:
                raise SynthesisError("; ".join(f"lesion {i}: {r.failure}" for i, r in enumerate(results) if r.failure))
        return results

    def _ensure_phrases(self, reports: Sequence[Any]) -> None:
        """Embed phrases the bundle has not cached (e.g. a catalog-declared organ) with the bundle's own
        encoder; when that encoder cannot be loaded here, say how to add them (`bundle embed`)."""
        cache = self.bundle.cache
        missing = sorted({p for r in reports for p in (*r.mask_phrases(), *r.image_phrases()) if p not in cache})
        if not missing:
            return
        if cache.encoder is None:
            spec = str(self.bundle.config.encoder.get("spec") or cache.encoder_id)
            try:
                self.bundle.attach_encoder(spec)
            except LesionDiffusionError as exc:
                where = self.bundle.path or "BUNDLE"
                types = sorted({r.lesion_type for r in reports})
                raise SynthesisError(
                    f"the bundle has no embedding for {', '.join(map(repr, missing[:4]))}"
                    + (f" (and {len(missing) - 4} more)" if len(missing) > 4 else "")
                    + f" and its text encoder {spec!r} cannot be loaded here ({exc}). Fix: embed them once where "
                    f"the encoder is available: `lesiondiffusion bundle embed {where} "
                    + " ".join(f"--catalog {t}" for t in types) + "` (or --phrase 'organ: ...')."
                ) from None
        added = cache.add(missing)
        log.info("embedded %d new phrase(s) with the bundle's encoder %s: %s", added, cache.encoder_id, missing)

    # ---- stages -------------------------------------------------------------------------------
    def _prepare(self, it: _Item, ct: np.ndarray, organs: Any, lut: np.ndarray) -> None:
        geo = self.geometry(it.box, ct.shape, organs.spacing)
        it.geometry = geo
        it.ct_crop = geo.sample(ct, order=1, mode="nearest")
        if not np.isfinite(it.ct_crop).all():
            it.failure = "the CT has NaN/inf values around the lesion box; fix the input CT"
            return
        labels = geo.sample(organs.labels, order=0, mode="constant", cval=0).astype(np.int64)
        labels = np.where((labels >= 0) & (labels < len(lut)), labels, len(lut) - 1)  # last entry is 0
        it.labels_crop = lut[labels]
        ids = organs.ids(it.box.organ_names)
        it.organ_crop = np.isin(labels, ids).astype(np.float32)
        it.box_crop = geo.box_mask(it.box.lo, it.box.hi)
        pad = self.config.blend_dilation + 1
        it.region = tuple(
            slice(max(0, int(l) - pad), min(int(s), int(h) + pad)) for l, h, s in zip(it.box.lo, it.box.hi, ct.shape)
        )  # type: ignore[assignment]
        it.info.update(image_crop=list(geo.image_size), mask_crop=list(geo.mask_size), scale=[float(v) for v in geo.scale],
                       synthesis_spacing_mm=[round(float(v), 4) for v in np.asarray(self.bundle.config.spacing_mm) * geo.coarsen],
                       coarsen=round(float(geo.coarsen), 4))

    def _context(self, phrase_lists: list[list[str]]) -> torch.Tensor:
        """Text context of a batch; with ``text_conditioning`` off, the null context the networks were
        trained with for dropped prompts (so guidance has nothing to amplify and the report's words are
        unused; the report still places the box and, with ``hu_correction``, bounds the HU)."""
        context = self.bundle.context(phrase_lists).to(self.device)
        return context if self.config.text_conditioning else null_context(context)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.device.type == "cuda" and self.config.amp:
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            return torch.autocast("cuda", dtype=dtype)
        return contextlib.nullcontext()

    def _noise(self, shape: tuple[int, ...], seed: int) -> torch.Tensor:
        # drawn on the CPU from a per-lesion generator: results do not depend on the device or on
        # which other lesions share the batch
        gen = torch.Generator().manual_seed(int(seed) % (2**63))
        return torch.randn(shape, generator=gen)

    def _steps_and_scale(self) -> tuple[int, float]:
        sched = self.bundle.config.schedule
        steps = int(self.config.ddim_steps or sched.ddim_steps)
        scale = float(sched.guidance_scale if self.config.guidance_scale is None else self.config.guidance_scale)
        return steps, scale

    def _batches(self, items: list[_Item]) -> list[list[_Item]]:
        groups: dict[tuple, list[_Item]] = {}
        for it in items:
            assert it.geometry is not None
            groups.setdefault((it.geometry.image_size, it.geometry.mask_size), []).append(it)
        out = []
        for group in groups.values():
            for k in range(0, len(group), self.config.batch_size):
                out.append(group[k : k + self.config.batch_size])
        return out

    def _run_masks(self, items: list[_Item], organs: Any) -> None:
        steps, scale = self._steps_and_scale()
        pending = list(items)
        while pending:
            retry: list[_Item] = []
            for batch in self._batches(pending):
                t = time.perf_counter()
                sl = batch[0].geometry.mask_slices()  # type: ignore[union-attr]
                cond = np.stack(
                    [np.stack([it.labels_crop[sl], it.organ_crop[sl], it.box_crop[sl]]) for it in batch]  # type: ignore[index]
                )
                cond_t = torch.from_numpy(cond).to(self.device)
                cond_t = torch.cat([organ_semantics(cond_t[:, 0:1]), cond_t[:, 1:3]], dim=1)
                context = self._context([it.report.phrases(self.bundle.config.attributes("lmnet")) for it in batch])
                shape = (1, 1) + tuple(batch[0].geometry.mask_size)  # type: ignore[union-attr]
                noise = torch.cat([self._noise(shape, it.seed + 1000003 * it.attempts) for it in batch]).to(self.device)
                with self._autocast():
                    x0 = sample_mask(self.bundle.lmnet, cond_t, context, make_sampler(self.bundle.config.schedule, "lmnet", steps, self.config.sampler), noise, scale,
                                    progress=self.step_callback)
                x0 = x0.float().cpu().numpy()[:, 0]
                dt = (time.perf_counter() - t) / len(batch)
                for it, sample in zip(batch, x0):
                    it.attempts += 1
                    it.info["lmnet_seconds"] = it.info.get("lmnet_seconds", 0.0) + dt
                    reason = self._accept_mask(it, sample, organs)
                    # the tries are part of the result, accepted or not (a redrawn mask is not free)
                    it.info["mask_attempts"] = it.attempts
                    if reason is None:
                        continue
                    it.info.setdefault("mask_rejections", []).append(reason)
                    log.info("lesion %d attempt %d: mask rejected (%s)", it.index, it.attempts, reason)
                    if it.attempts <= self.config.max_retries:
                        retry.append(it)
                    else:
                        it.failure = f"mask rejected after {it.attempts} attempt(s): {reason}"
            pending = retry

    def _accept_mask(self, it: _Item, sample: np.ndarray, organs: Any) -> str | None:
        """Binary mask on the input grid from LMNet's sample, or the reason it is unusable
        (``mask_acceptance.accept_mask``)."""
        return accept_mask(it, sample, organs, self.config)

    def _run_images(self, items: list[_Item], ct: np.ndarray) -> None:
        steps, scale = self._steps_and_scale()
        bcfg = self.bundle.config
        window = bcfg.hu_window
        for batch in self._batches(items):
            t = time.perf_counter()
            geo = batch[0].geometry
            assert geo is not None
            masks = []
            for it in batch:
                # the final input-grid mask back onto the crop grid (the region LINet regenerates)
                masks.append(_forward_region(it.geometry, it.mask.astype(np.float32), it.region))
            mask_t = torch.from_numpy(np.stack(masks)[:, None]).to(self.device)
            x = hu_to_unit(torch.from_numpy(np.stack([it.ct_crop for it in batch])[:, None]).to(self.device), window)
            norm = bcfg.latents  # LINet works on standardised latents (models.vqgan.LatentNorm)
            z0 = norm.normalize(self.bundle.vqgan.encode_stage_2_inputs(x))
            lmask = latent_mask(mask_t, tuple(z0.shape[2:]))
            context = self._context([it.report.phrases(self.bundle.config.attributes("linet")) for it in batch])
            noise = torch.cat([self._noise((1,) + tuple(z0.shape[1:]), it.seed + 7) for it in batch]).to(self.device)
            with self._autocast():
                z = inpaint_latent(
                    self.bundle.linet, z0, lmask, context, make_sampler(bcfg.schedule, "linet", steps, self.config.sampler, clip_range=codebook_range(self.bundle.vqgan, norm)), noise, scale,
                    progress=self.step_callback,
                )
            recon = self.bundle.vqgan.decode_stage_2_outputs(norm.denormalize(z.float()))
            finite = torch.isfinite(recon.float()).flatten(1).all(dim=1).cpu().tolist()
            hu = unit_to_hu(recon, window).float().cpu().numpy()[:, 0]
            dt = (time.perf_counter() - t) / len(batch)
            for it, gen, ok in zip(batch, hu, finite):
                it.info["linet_seconds"] = dt
                if not ok:
                    it.failure = "LINet/VQ-GAN decoder produced NaN/inf values (check the bundle weights)"
                    continue
                it.info["generated"] = it.geometry.back(gen, it.region, order=1)  # type: ignore[union-attr]

    def _result(self, it: _Item, ct: np.ndarray) -> SynthesisResult:
        if it.failure is not None:
            return SynthesisResult(image=None, lesion_mask=None, report=it.report, box=it.box, failure=it.failure, info=it.info)
        cfg = self.config
        region, mask = it.region, it.mask
        assert region is not None and mask is not None
        gen = it.info.pop("generated")
        # the catalog's HU interval defines the density label; off (the default, the method's output) keeps
        # what the model made and only records where its mean lies against that interval
        it.info.update(hu_correction=cfg.hu_correction, generated_mean_hu=float(gen[mask].mean()), hu_corrected=False)
        try:
            lo, hi = it.catalog.hu_range(it.report.density, it.report.enhancement)
        except LesionDiffusionError as exc:  # free-text density or a catalog without that range
            it.info["hu_range_skipped"] = str(exc)
        else:
            it.info["hu_range"] = [float(lo), float(hi)]
            if cfg.hu_correction != "off":
                gen, correction = correct_hu(gen, mask, (lo, hi), cfg.hu_correction)
                it.info.update(correction)
                note = hu_correction_note(correction)
                if note is not None:  # the density shown is now the catalog's, not the model's: say so
                    log.info("lesion %d: %s", it.index, note)
        orig = ct[region].astype(np.float32)
        blended, changed = blend(orig, gen, mask, cfg.blend_dilation, cfg.feather_sigma, cfg.hu_clip)
        if not np.isfinite(blended[changed]).all():
            return SynthesisResult(None, None, it.report, it.box, failure="blended image has NaN/inf values", info=it.info)
        image = ct.copy()
        patch = image[region]
        if np.issubdtype(ct.dtype, np.integer):
            info = np.iinfo(ct.dtype)
            values = np.clip(np.rint(blended[changed]), info.min, info.max).astype(ct.dtype)
        else:
            values = blended[changed].astype(ct.dtype)
        patch[changed] = values
        lesion_mask = np.zeros(ct.shape, dtype=np.uint8)
        lesion_mask[region] = mask.astype(np.uint8)
        it.info.update(changed_voxels=int(changed.sum()), lesion_voxels=int(mask.sum()))
        return SynthesisResult(image=image, lesion_mask=lesion_mask, report=it.report, box=it.box, info=it.info)


def _forward_region(geo: CropGeometry | None, values: np.ndarray, region: tuple[slice, ...] | None) -> np.ndarray:
    """Resample an input-grid mask defined on ``region`` (zero elsewhere) onto the crop grid;
    trilinear + 0.5 threshold (see module docstring). A lesion thinner than one crop voxel keeps every
    crop voxel it touches, so a mask is never lost by coarser bundle spacing."""
    assert geo is not None and region is not None
    n = np.asarray(geo.image_size, dtype=np.float64)
    start = np.asarray([s.start for s in region], dtype=np.float64)
    offset = geo.center - (n - 1) / 2 * geo.scale - start
    out = ndimage.affine_transform(
        values.astype(np.float32), geo.scale, offset=offset, output_shape=geo.image_size, order=1,
        mode="constant", cval=0.0, output=np.float32, prefilter=False,
    )
    if out.max(initial=0.0) < 0.5:
        return (out > 0).astype(np.float32)
    return (out >= 0.5).astype(np.float32)


__all__ = ["LesionSynthesizer", "SynthesisConfig", "CropGeometry", "correct_hu", "blend", "sample_to_grid",
           "HU_CORRECTIONS", "HU_INFO_KEYS", "hu_correction_note", "hu_correction_record", "hu_correction_summary", "mask_in_organ_fraction"]
