"""Bring a user's own folder of CT + lesion masks into the dataset layout every other command reads.

A user's data rarely arrives as an nnU-Net raw dataset: it is one folder per patient (``STS_001/ct.nii.gz``,
``STS_001/gtv.nii.gz``) or two folders of matching files, with masks but no reports and no organ maps.
``import_mask_dataset`` writes, without touching the source files:

``imagesTr/{case}_0000.nii.gz``   the CT (copied byte for byte)
``labelsTr/{case}.nii.gz``        the lesion mask as label 1 (any non-zero voxel), on the CT's grid
``organsTr/{case}.nii.gz``        an organ map: the tissue map built from HU (``tissue.py``), or the
                                  user's own map (``--organs PATTERN``)
``dataset.json``                  nnU-Net's keys plus ``organ_mapping`` (and ``catalog_path`` if given)

The label is named after the lesion type, so ``pretrain prepare --derive-reports`` knows the catalog.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .catalog import load_catalog, use_catalog_dirs
from .errors import DataCheckError
from .io import atomic_path, load_nifti, save_nifti, voxel_spacing, write_json
from .tissue import TISSUE_LABELS, tissue_map

log = logging.getLogger(__name__)

CASE_FIELD = "{case}"


@dataclass
class ImportResult:
    out_dir: Path
    cases: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


def find_pairs(source: Path, image: str, mask: str, organs: str | None = None) -> dict[str, dict[str, Path | None]]:
    """case id -> {image, mask, organs} from patterns holding ``{case}`` (relative to ``source``)."""
    for name, pattern in (("--image", image), ("--mask", mask), ("--organs", organs)):
        if pattern is not None and pattern.count(CASE_FIELD) != 1:
            raise DataCheckError(f"{name} {pattern!r} must contain {CASE_FIELD} exactly once, e.g. "
                                 "'{case}/ct.nii.gz' (one folder per case) or 'images/{case}.nii.gz'.")
    if not source.is_dir():
        raise DataCheckError(f"Source folder {source} does not exist.")
    head, tail = image.split(CASE_FIELD)
    rx = re.compile("^" + re.escape(head) + "(?P<case>[^/]+?)" + re.escape(tail) + "$")
    cases: dict[str, dict[str, Path | None]] = {}
    for path in sorted(glob.glob(str(source / image.replace(CASE_FIELD, "*")))):
        rel = Path(path).relative_to(source).as_posix()
        m = rx.match(rel)
        if not m:
            continue
        case = m.group("case")
        cases[case] = {"image": Path(path), "mask": source / mask.replace(CASE_FIELD, case),
                       "organs": source / organs.replace(CASE_FIELD, case) if organs else None}
    if not cases:
        raise DataCheckError(f"No file matches {source / image}. Give --image as a pattern relative to {source} "
                             "with {case} where the case id stands, e.g. --image '{case}/ct.nii.gz'.")
    return cases


def _copy(src: Path, dst: Path) -> None:
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def import_mask_dataset(source: str | os.PathLike, out_dir: str | os.PathLike, lesion_type: str, *,
                        image: str = "{case}/ct.nii.gz", mask: str = "{case}/mask.nii.gz",
                        organs: str | None = None, cases: Sequence[str] | None = None,
                        catalog_path: Sequence[str] | None = None, overwrite: bool = False) -> ImportResult:
    """Write the dataset (layout in the module docstring). ``organs`` None: build tissue maps from HU.

    A case whose mask is missing, on another grid, or empty is reported and skipped, never guessed."""
    source, out = Path(source), Path(out_dir)
    catalog = load_catalog(lesion_type)  # a clear error now, not after 26 cases
    pairs = find_pairs(source, image, mask, organs)
    if cases:
        unknown = sorted(set(cases) - set(pairs))
        if unknown:
            raise DataCheckError(f"--cases {unknown} not found under {source} with --image {image!r}; "
                                 f"found {len(pairs)} case(s), e.g. {', '.join(list(pairs)[:5])}.")
        pairs = {c: pairs[c] for c in cases}
    src_res = source.resolve()
    if out.resolve() == src_res or src_res in out.resolve().parents:
        raise DataCheckError(f"Output {out} lies inside the source folder {source}; choose a folder outside it "
                             "(the source is never written to).")
    if (out / "dataset.json").exists() and not overwrite:
        raise DataCheckError(f"{out / 'dataset.json'} exists. Pass --overwrite to rewrite this dataset, or choose "
                             "another output folder.")
    for sub in ("imagesTr", "labelsTr", "organsTr"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    result = ImportResult(out)
    for case, p in pairs.items():
        if not p["mask"].is_file():  # type: ignore[union-attr]
            result.skipped.append((case, f"mask {p['mask']} missing"))
            continue
        ct, affine, _ = load_nifti(p["image"])  # type: ignore[arg-type]
        les, les_aff, _ = load_nifti(p["mask"])  # type: ignore[arg-type]
        if les.shape != ct.shape or not np.allclose(les_aff, affine, atol=1e-3):
            result.skipped.append((case, f"mask {p['mask']} is on another grid (shape {les.shape} vs CT {ct.shape}, "
                                         "or another affine); resample it onto the CT"))
            continue
        lesion = (np.asarray(les) > 0).astype(np.uint8)
        if not lesion.any():
            result.skipped.append((case, f"mask {p['mask']} has no lesion voxel"))
            continue
        _copy(p["image"], out / "imagesTr" / f"{case}_0000.nii.gz")  # type: ignore[arg-type]
        save_nifti(out / "labelsTr" / f"{case}.nii.gz", lesion, affine)
        if p["organs"] is None:
            labels = tissue_map(np.asarray(ct, dtype=np.float32), voxel_spacing(affine))
            save_nifti(out / "organsTr" / f"{case}.nii.gz", labels, affine)
        else:
            if not p["organs"].is_file():
                raise DataCheckError(f"case {case}: organ map {p['organs']} missing (from --organs {organs!r}).")
            _copy(p["organs"], out / "organsTr" / f"{case}.nii.gz")
        result.cases.append(case)
    if not result.cases:
        raise DataCheckError(f"No usable case under {source}: " + "; ".join(f"{c}: {why}" for c, why in result.skipped))
    meta: dict[str, Any] = {
        "name": out.name,
        "description": f"{catalog.name} cases imported from {source} by `lesiondiffusion dataset import`",
        "channel_names": {"0": "CT"},
        "labels": {"background": 0, catalog.label_name: 1},
        "numTraining": len(result.cases),
        "file_ending": ".nii.gz",
    }
    if organs is None:
        write_json(out / "tissue_labels.json", TISSUE_LABELS)
        meta["organ_mapping"] = "tissue_labels.json"
    if catalog_path:
        meta["catalog_path"] = [str(c) for c in catalog_path]
    write_json(out / "dataset.json", meta)
    return result


def dataset_catalog_path(data_dir: str | os.PathLike) -> list[Path]:
    """Register a dataset.json's ``catalog_path`` folders (relative to the dataset) for this process."""
    path = Path(data_dir) / "dataset.json"
    if not path.is_file():
        return []
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return []  # the dataset check names the problem with its fix
    entries = meta.get("catalog_path") if isinstance(meta, dict) else None
    if not entries:
        return []
    if isinstance(entries, str):
        entries = [entries]
    if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
        raise DataCheckError(f"{path}: 'catalog_path' must be a folder or a list of folders, got {entries!r}.")
    return use_catalog_dirs(entries, base=data_dir)


__all__ = ["ImportResult", "dataset_catalog_path", "find_pairs", "import_mask_dataset"]
