"""The torch Datasets the three pretraining tasks stream from a prepared cache (by DataLoader workers):
VQ-GAN volume patches and LMNet/LINet lesion crops, their randomness a function of (seed, epoch, index)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from lesiondiffusion.errors import LesionDiffusionError
from lesiondiffusion.report import LesionReport

from .prepare import Manifest, crop_at


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """Per-sample randomness from (seed, epoch, index) only, so workers and resume cannot change it."""
    return np.random.default_rng([seed, epoch, index])


class _EpochDataset(Dataset):
    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch


def _box_mask(mask: np.ndarray) -> np.ndarray:
    """Axis-aligned bounding box of a mask, as a mask (the B of the LMNet/LINet losses)."""
    box = np.zeros(mask.shape, dtype=np.float32)
    nz = np.nonzero(mask)
    if len(nz[0]):
        box[tuple(slice(int(a.min()), int(a.max()) + 1) for a in nz)] = 1.0
    return box


class VolumePatchDataset(_EpochDataset):
    """VQ-GAN training patches: one random patch per case per epoch, from the memory-mapped cache.

    Half of the patches of lesion cases are centred on a lesion, so the autoencoder sees lesion
    texture often enough to reconstruct it (lesions are a tiny fraction of CT voxels).
    """

    def __init__(self, manifest: Manifest, patch: Sequence[int], seed: int = 0) -> None:
        super().__init__(seed)
        self.root = manifest.root
        self.cases = manifest.cases
        self.patch = tuple(int(p) for p in patch)
        by_case: dict[str, list[list[int]]] = {}
        for les in manifest.lesions:
            by_case.setdefault(les["case"], []).append(les["center"])
        self.centers = by_case
        if not self.cases:
            raise LesionDiffusionError(f"{manifest.root}: the prepared cache has no cases.")

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = sample_rng(self.seed, self.epoch, index)
        rec = self.cases[index]
        vol = np.load(self.root / rec["image"], mmap_mode="r")
        centers = self.centers.get(rec["case"])
        if centers and rng.random() < 0.5:
            c = np.asarray(centers[rng.integers(len(centers))]) + rng.integers(-4, 5, size=3)
        else:
            c = [int(rng.integers(0, max(1, n))) for n in vol.shape]
        patch = crop_at(vol, c, self.patch, -1.0).astype(np.float32)
        return {"image": torch.from_numpy(patch[None])}


class LesionCropDataset(_EpochDataset):
    """LMNet/LINet samples: one cached lesion crop cut to the network's crop with a random shift.

    Returns image (windowed CT), lesion mask, organ mask, box mask (all [1, *crop]) and the
    indices of the report's phrases in ``phrase_index`` (mask or image phrases by ``kind``).
    """

    def __init__(self, manifest: Manifest, crop: Sequence[int], phrase_index: dict[str, int],
                 kind: str, seed: int = 0) -> None:
        super().__init__(seed)
        if kind not in ("mask", "image"):
            raise ValueError(kind)
        self.root = manifest.root
        self.crop = tuple(int(c) for c in crop)
        self.store = manifest.config.crop_store()
        self.jitter = manifest.config.jitter
        self.items = manifest.lesions
        if not self.items:
            raise LesionDiffusionError(f"{manifest.root}: the prepared cache has no lesions; LMNet/LINet need "
                                       "cases with lesion labels and reports.")
        self.phrases: list[list[int]] = []
        for les in self.items:
            rep = LesionReport.from_dict(les["report"], source=les["file"])
            ph = rep.mask_phrases() if kind == "mask" else rep.image_phrases()
            self.phrases.append([phrase_index[p] for p in ph])

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = sample_rng(self.seed, self.epoch, index)
        rec = self.items[index]
        with np.load(self.root / rec["file"]) as z:
            arrays = {k: z[k] for k in ("image", "lesion", "organ", "other", "organ_labels")}
        shift = rng.integers(-self.jitter, self.jitter + 1, size=3) if self.jitter else np.zeros(3, int)
        center = [s // 2 + int(d) for s, d in zip(self.store, shift)]
        out = {k: crop_at(v, center, self.crop, -1.0 if k == "image" else 0).astype(
            np.int64 if k == "organ_labels" else np.float32) for k, v in arrays.items()}
        out["box"] = _box_mask(out["lesion"])
        sample = {k: torch.from_numpy(v[None]) for k, v in out.items()}
        sample["phrase_ids"] = torch.tensor(self.phrases[index], dtype=torch.long)
        sample["index"] = torch.tensor(index)
        return sample
