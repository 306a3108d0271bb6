"""Pretraining preparation: every case of a checked dataset reoriented, resampled to the bundle spacing,
windowed and cut into lesion crops, once, into a cache (``Manifest``) the trainers stream from."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import nibabel as nib
import numpy as np
import torch
from scipy import ndimage
from tqdm import tqdm

from lesiondiffusion.errors import DataCheckError, LesionDiffusionError
from lesiondiffusion.geometry import CropGeometry, to_canonical
from lesiondiffusion.io import atomic_path, voxel_spacing, write_json

from .check import LesionEntry, case_paths, entry_mask, label_ids, parse_report_entries, validate_dataset

log = logging.getLogger(__name__)

CACHE_VERSION = 2  # 2: lesions larger than the crop are stored coarser, not truncated


@dataclass
class PrepConfig:
    """What the cache depends on; a different config means a different cache."""

    spacing_mm: tuple[float, float, float]
    hu_window: tuple[float, float]
    lmnet_crop: tuple[int, int, int]
    linet_crop: tuple[int, int, int]
    jitter: int = 4                      # voxels of random crop shift at training time

    def crop_store(self) -> tuple[int, int, int]:
        """Size of the cached crop: big enough for either network's crop plus the jitter on both sides."""
        return tuple(max(a, b) + 2 * self.jitter for a, b in zip(self.lmnet_crop, self.linet_crop))  # type: ignore[return-value]

    def key(self) -> str:
        blob = json.dumps({**asdict(self), "v": CACHE_VERSION}, sort_keys=True)
        return hashlib.sha1(blob.encode()).hexdigest()[:12]


@dataclass
class Manifest:
    """Index of a prepared cache: cases (full volumes for VQ-GAN) and lesions (crops for LMNet/LINet)."""

    root: Path
    config: PrepConfig
    cases: list[dict[str, Any]] = field(default_factory=list)
    lesions: list[dict[str, Any]] = field(default_factory=list)
    fingerprint: str = ""

    def save(self) -> None:
        write_json(self.root / "manifest.json", {
            "version": CACHE_VERSION, "config": asdict(self.config), "fingerprint": self.fingerprint,
            "cases": self.cases, "lesions": self.lesions,
        })

    @classmethod
    def load(cls, root: str | os.PathLike) -> "Manifest":
        root = Path(root)
        path = root / "manifest.json"
        if not path.exists():
            raise LesionDiffusionError(f"{path}: no prepared cache here. Run preparation first "
                                       "(any `lesiondiffusion pretrain <net>` command prepares it).")
        d = json.loads(path.read_text(encoding="utf-8"))
        cfg = d["config"]
        config = PrepConfig(spacing_mm=tuple(cfg["spacing_mm"]), hu_window=tuple(cfg["hu_window"]),
                            lmnet_crop=tuple(cfg["lmnet_crop"]), linet_crop=tuple(cfg["linet_crop"]),
                            jitter=int(cfg.get("jitter", 4)))
        return cls(root=root, config=config, cases=d["cases"], lesions=d["lesions"],
                   fingerprint=d.get("fingerprint", ""))


def dataset_fingerprint(data_dir: Path) -> str:
    """Cheap identity of the input files (names, sizes, mtimes): a changed file invalidates the cache."""
    h = hashlib.sha1()
    for sub in ("dataset.json", "imagesTr", "labelsTr", "organsTr", "reportsTr"):
        p = data_dir / sub
        files = [p] if p.is_file() else sorted(p.glob("*")) if p.is_dir() else []
        for f in files:
            st = f.stat()
            h.update(f"{f.relative_to(data_dir)}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()


def _to_ras(img: Any) -> tuple[np.ndarray, np.ndarray]:
    """Array in the canonical (closest RAS) order with its affine: the same ``geometry.to_canonical``
    synthesis applies, so the networks learn and generate in one orientation."""
    return to_canonical(np.asanyarray(img.dataobj), np.asarray(img.affine, dtype=np.float64))


def resample_volume(arr: np.ndarray, spacing: Sequence[float], new_spacing: Sequence[float], kind: str) -> np.ndarray:
    """Resample with nnU-Net's own resampling so the cache matches nnU-Net preprocessing.

    image: third-order spline in-plane; along a low-resolution axis (anisotropy > 3) nnU-Net switches
    to separate-z nearest-neighbour, exactly as in its preprocessing. lesion: nnU-Net's segmentation
    resampling (per-label linear on one-hot, then argmax-like threshold) for smooth boundaries.
    organs: nearest neighbour (order 0), because ~100 TotalSegmentator labels make per-label linear
    resampling slow and the organ map only conditions, it is never a training target.
    """
    from nnunetv2.preprocessing.resampling.default_resampling import resample_data_or_seg_to_shape

    spacing = np.asarray(spacing, dtype=float)
    new_spacing = np.asarray(new_spacing, dtype=float)
    new_shape = np.maximum(1, np.round(np.asarray(arr.shape) * spacing / new_spacing)).astype(int)
    if tuple(new_shape) == arr.shape and np.allclose(spacing, new_spacing):
        return arr
    if kind == "image":
        out = resample_data_or_seg_to_shape(arr[None].astype(np.float32), new_shape, spacing, new_spacing,
                                            is_seg=False, order=3, order_z=0, force_separate_z=None)
    elif kind == "lesion":
        out = resample_data_or_seg_to_shape(arr[None].astype(np.int16), new_shape, spacing, new_spacing,
                                            is_seg=True, order=1, order_z=0, force_separate_z=None)
    elif kind == "organs":
        out = resample_data_or_seg_to_shape(arr[None].astype(np.int16), new_shape, spacing, new_spacing,
                                            is_seg=True, order=0, order_z=0, force_separate_z=None)
    else:
        raise ValueError(kind)
    return np.asarray(out[0])


def window(hu: np.ndarray, hu_window: Sequence[float]) -> np.ndarray:
    """HU -> [-1, 1] with the bundle's window: the pipeline's own ``hu_to_unit`` (one definition)."""
    from lesiondiffusion.models.vqgan import hu_to_unit

    t = hu_to_unit(torch.from_numpy(np.asarray(hu, dtype=np.float32)), (float(hu_window[0]), float(hu_window[1])))
    return t.numpy().astype(np.float32)


def unwindow(x: np.ndarray | torch.Tensor, hu_window: Sequence[float]) -> Any:
    """[-1, 1] -> HU (``unit_to_hu``) for tensors; arrays the same way."""
    from lesiondiffusion.models.vqgan import unit_to_hu

    window_t = (float(hu_window[0]), float(hu_window[1]))
    if isinstance(x, torch.Tensor):
        return unit_to_hu(x, window_t)
    return unit_to_hu(torch.from_numpy(np.asarray(x, dtype=np.float32)), window_t).numpy()


def crop_at(arr: np.ndarray, center: Sequence[int], size: Sequence[int], fill: float) -> np.ndarray:
    """Crop of ``size`` whose voxel ``size // 2`` is ``center``; outside the volume filled with ``fill``."""
    out = np.full(tuple(size), fill, dtype=arr.dtype)
    src, dst = [], []
    for c, s, n in zip(center, size, arr.shape):
        lo = int(c) - s // 2
        a, b = max(lo, 0), min(lo + s, n)
        if b <= a:
            return out
        src.append(slice(a, b))
        dst.append(slice(a - lo, b - lo))
    out[tuple(dst)] = arr[tuple(src)]
    return out


def crop_scaled(arr: np.ndarray, center: Sequence[float], size: Sequence[int], factor: float, fill: float, *,
                order: int, binary: bool = False) -> np.ndarray:
    """``crop_at`` on a grid ``factor`` times coarser around ``center`` (``factor`` 1: exactly ``crop_at``).
    Binary masks are interpolated linearly and thresholded at 0.5 (a partial-volume-correct nearest)."""
    if factor <= 1.0:
        return crop_at(arr, [int(round(c)) for c in center], size, fill)

    # the pipeline's crop grid (one resampling for pretraining and synthesis); crop voxel n // 2 sits on
    # ``center`` as in ``crop_at``, where CropGeometry centres (n - 1) / 2
    n = np.asarray(size, dtype=np.float64)
    mid = np.asarray(center, dtype=np.float64) + ((n - 1) / 2 - n // 2) * factor
    geo = CropGeometry(mid, np.full(3, float(factor)), tuple(int(v) for v in size), tuple(int(v) for v in size))
    out = geo.sample(arr.astype(np.float32), order=order, mode="constant", cval=fill)
    if binary:
        return (out >= 0.5).astype(arr.dtype)
    return out.astype(arr.dtype) if np.issubdtype(arr.dtype, np.integer) else out


def _save_npy(path: Path, arr: np.ndarray) -> None:
    with atomic_path(path, suffix=".npy") as tmp:
        np.save(tmp, arr)


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    with atomic_path(path, suffix=".npz") as tmp:
        np.savez(tmp, **arrays)


def _prepare_case(data_dir: Path, cache: Path, case: str, cfg: PrepConfig, valid: dict[int, str],
                  file_ending: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    paths = case_paths(data_dir, case, file_ending)
    ct, affine = _to_ras(nib.load(str(paths["image"])))
    les, _ = _to_ras(nib.load(str(paths["lesion"])))
    org, _ = _to_ras(nib.load(str(paths["organs"])))
    spacing = voxel_spacing(affine)
    les = np.rint(les).astype(np.int16)
    org = np.rint(org).astype(np.int16)

    entries: list[LesionEntry] = []
    if paths["report"] is not None:
        probs: list[str] = []
        entries = parse_report_entries(paths["report"], valid, probs)
        if probs:  # validated before; a change in between is a user error
            raise DataCheckError("\n".join(probs))
    # components are resolved on the original grid (as the user labelled them), then resampled,
    # so a component index keeps meaning "the k-th largest lesion of this label"
    comps: dict[int, list[np.ndarray]] = {}
    ids = np.zeros(les.shape, dtype=np.int16)
    for k, entry in enumerate(entries):
        ids[entry_mask(les, entry, comps)] = k + 1

    img_r = window(resample_volume(ct.astype(np.float32), spacing, cfg.spacing_mm, "image"), cfg.hu_window)
    ids_r = resample_volume(ids, spacing, cfg.spacing_mm, "lesion").astype(np.int16)
    org_r = resample_volume(org, spacing, cfg.spacing_mm, "organs").astype(np.int16)

    img_file = f"cases/{case}_image.npy"
    _save_npy(cache / img_file, img_r.astype(np.float16))
    case_rec = {"case": case, "image": img_file, "shape": list(img_r.shape),
                "n_lesions": len(entries), "source_spacing": list(spacing)}

    lesion_recs: list[dict[str, Any]] = []
    for k, entry in enumerate(entries):
        mask = ids_r == (k + 1)
        if not mask.any():
            log.warning("case %s lesion %d vanished after resampling to %s mm (too small); skipped",
                        case, k, cfg.spacing_mm)
            continue
        lesion_recs.append(_save_lesion_crop(cache, case, k, entry, mask, img_r, ids_r, org_r, cfg))
    return case_rec, lesion_recs


def _save_lesion_crop(cache: Path, case: str, k: int, entry: LesionEntry, mask: np.ndarray, img_r: np.ndarray,
                      ids_r: np.ndarray, org_r: np.ndarray, cfg: PrepConfig) -> dict[str, Any]:
    """Write lesion ``k``'s crop (image, lesion, organ, other lesions, organ labels) and return its record."""
    store = cfg.crop_store()
    nz = np.nonzero(mask)
    lo = [int(a.min()) for a in nz]
    hi = [int(a.max()) + 1 for a in nz]
    center = [(a + b) // 2 for a, b in zip(lo, hi)]
    extent = [b - a for a, b in zip(lo, hi)]
    # the organ the lesion sits in: organ labels touching the lesion (dilated by one voxel). Taken
    # from the data, not from catalogs, so user datasets with any lesion type work.
    ring = ndimage.binary_dilation(mask, iterations=1)
    touched = org_r[ring]
    organ_ids = sorted(int(v) for v in np.unique(touched[touched > 0]))
    organ_mask = np.isin(org_r, organ_ids) if organ_ids else np.zeros_like(mask)
    other = (ids_r > 0) & ~mask
    crop_file = f"lesions/{case}_{k:03d}.npz"
    # a lesion larger than the networks' crop (less the jitter) is stored at a coarser spacing chosen
    # so it fits whole, as synthesis does for large boxes: never truncated
    # (a jitter as large as half the crop would leave no room: then half the crop is the room, and the
    # jitter may push part of the lesion out, as it always could)
    room = [max(min(a, b) - 2 * cfg.jitter, min(a, b) // 2) for a, b in zip(cfg.lmnet_crop, cfg.linet_crop)]
    coarsen = max(1.0, max(e / max(r, 1) for e, r in zip(extent, room)))
    mid = [(a + b - 1) / 2 for a, b in zip(lo, hi)] if coarsen > 1.0 else center
    _save_npz(cache / crop_file,
              image=crop_scaled(img_r, mid, store, coarsen, -1.0, order=1).astype(np.float16),
              lesion=crop_scaled(mask.astype(np.uint8), mid, store, coarsen, 0, order=1, binary=True),
              organ=crop_scaled(organ_mask.astype(np.uint8), mid, store, coarsen, 0, order=1, binary=True),
              other=crop_scaled(other.astype(np.uint8), mid, store, coarsen, 0, order=1, binary=True),
              organ_labels=crop_scaled(org_r, mid, store, coarsen, 0, order=0))
    if coarsen > 1.0:
        log.info("case %s lesion %d extent %s voxels exceeds the crop %s/%s: stored at %.2fx the spacing",
                 case, k, extent, cfg.lmnet_crop, cfg.linet_crop, coarsen)
    return {"case": case, "index": k, "label": entry.label, "component": entry.component,
            "file": crop_file, "center": center, "extent": extent, "organ_ids": organ_ids,
            "voxels": int(mask.sum()), "truncated": False, "coarsen": round(coarsen, 4),
            "report": entry.report}


def prepare_dataset(data_dir: str | os.PathLike, cache_dir: str | os.PathLike, cfg: PrepConfig,
                    *, force: bool = False, progress: bool = True) -> Manifest:
    """Validate, then resample/window/crop every case into ``cache_dir`` (reused when up to date).

    Every file is written atomically and the manifest last, so an interrupted preparation is redone
    from scratch on the next call instead of training on a partial cache.
    """
    data_dir, cache = Path(data_dir), Path(cache_dir)
    cases = validate_dataset(data_dir)
    fp = dataset_fingerprint(data_dir)
    if not force and (cache / "manifest.json").exists():
        try:
            old = Manifest.load(cache)
            if old.fingerprint == fp and old.config.key() == cfg.key():
                log.info("reusing prepared cache %s (%d cases, %d lesions)", cache, len(old.cases), len(old.lesions))
                return old
        except (KeyError, ValueError, json.JSONDecodeError):
            pass
        log.info("cache %s is stale (dataset or preparation settings changed); preparing again", cache)
        (cache / "manifest.json").unlink()
    meta = json.loads((data_dir / "dataset.json").read_text(encoding="utf-8"))
    valid = label_ids(meta)
    file_ending = meta.get("file_ending", ".nii.gz")
    man = Manifest(root=cache, config=cfg, fingerprint=fp)
    for case in tqdm(cases, desc="prepare", disable=not progress, unit="case"):
        rec, lrecs = _prepare_case(data_dir, cache, case, cfg, valid, file_ending)
        man.cases.append(rec)
        man.lesions.extend(lrecs)
    if not man.lesions:
        log.warning("no lesions in %s: only the VQ-GAN can be trained on this dataset", data_dir)
    man.save()
    return man
