"""Pretraining data: dataset validation (`pretrain check`), one-time preparation into a cache, and the
torch Datasets the three trainers stream from.

Layout (see docs/pretraining.md): an nnU-Net raw dataset (dataset.json, imagesTr, labelsTr) plus
organsTr/{case}.nii.gz (TotalSegmentator labels) and reportsTr/{case}.yaml (one report per lesion).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from lesiondiffusion.errors import DataCheckError, LesionDiffusionError
from lesiondiffusion.io import atomic_path, write_json

log = logging.getLogger(__name__)

REPORT_SUFFIXES = (".yaml", ".yml", ".json")
CACHE_VERSION = 2  # 2: lesions larger than the crop are stored coarser, not truncated


# --------------------------------------------------------------------------------------------------
# dataset discovery and validation
# --------------------------------------------------------------------------------------------------


@dataclass
class LesionEntry:
    """One report entry of a case: which voxels (label, component) it describes and the report dict."""

    label: int
    component: int | None
    report: dict[str, Any]


def _read_dataset_json(data_dir: Path, problems: list[str]) -> dict[str, Any] | None:
    path = data_dir / "dataset.json"
    if not path.exists():
        problems.append(f"{path}: missing. Add nnU-Net's dataset.json with channel_names and labels.")
        return None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        problems.append(f"{path}: not valid JSON ({exc}). Fix the syntax.")
        return None
    labels = meta.get("labels")
    if not isinstance(labels, dict) or not labels:
        problems.append(f"{path}: key 'labels' must map names to ids, got {labels!r}. "
                        "Example: {\"background\": 0, \"kidney_tumor\": 1}.")
        meta["labels"] = {}
    else:
        for name, value in labels.items():
            # nnU-Net region-based labels use lists; lesion reports need one id per label
            if not isinstance(value, int) or isinstance(value, bool):
                problems.append(f"{path}: labels.{name} = {value!r}; pretraining needs one integer id per "
                                "label (region-based lists are not supported).")
    channels = meta.get("channel_names")
    if not isinstance(channels, dict) or "0" not in {str(k) for k in channels}:
        problems.append(f"{path}: key 'channel_names' must contain channel \"0\" (the CT), got {channels!r}.")
    return meta


def label_ids(meta: dict[str, Any]) -> dict[int, str]:
    """Lesion label ids (background excluded) -> name, from dataset.json."""
    out: dict[int, str] = {}
    for name, value in (meta.get("labels") or {}).items():
        if isinstance(value, int) and not isinstance(value, bool) and value != 0:
            out[value] = name
    return out


def find_cases(data_dir: Path, file_ending: str = ".nii.gz") -> list[str]:
    """Every case id that appears in any of the four folders (so a file missing in one is reported)."""
    names: set[str] = set()
    img = data_dir / "imagesTr"
    if img.is_dir():
        for p in img.glob(f"*_0000{file_ending}"):
            names.add(p.name[: -len(f"_0000{file_ending}")])
    for sub in ("labelsTr", "organsTr"):
        d = data_dir / sub
        if d.is_dir():
            names.update(p.name[: -len(file_ending)] for p in d.glob(f"*{file_ending}"))
    rep = data_dir / "reportsTr"
    if rep.is_dir():
        for p in rep.iterdir():
            if p.suffix in REPORT_SUFFIXES:
                names.add(p.stem)
    return sorted(names)


def case_paths(data_dir: Path, case: str, file_ending: str = ".nii.gz") -> dict[str, Path | None]:
    rep = None
    for suf in REPORT_SUFFIXES:
        cand = data_dir / "reportsTr" / f"{case}{suf}"
        if cand.exists():
            rep = cand
            break
    return {
        "image": data_dir / "imagesTr" / f"{case}_0000{file_ending}",
        "lesion": data_dir / "labelsTr" / f"{case}{file_ending}",
        "organs": data_dir / "organsTr" / f"{case}{file_ending}",
        "report": rep,
    }


def read_report_file(path: Path) -> Any:
    import yaml

    from lesiondiffusion.io import read_text_input

    text = read_text_input(path, "report")
    if path.suffix == ".json":
        return json.loads(text)
    return yaml.safe_load(text)


def parse_report_entries(path: Path, valid_labels: dict[int, str], problems: list[str]) -> list[LesionEntry]:
    """Parse reportsTr/{case}.yaml; every problem is appended (with file, key, value, fix), none raised."""
    from lesiondiffusion.report import LesionReport

    try:
        doc = read_report_file(path)
    except Exception as exc:  # yaml/json raise several types; all mean "unparsable"
        problems.append(f"{path}: cannot parse ({type(exc).__name__}: {exc}). Fix the YAML/JSON syntax.")
        return []
    if doc is None:
        doc = {"lesions": []}
    if not isinstance(doc, dict) or not isinstance(doc.get("lesions", None), list):
        problems.append(f"{path}: top level must be a mapping with a list under 'lesions', got "
                        f"{type(doc).__name__}. See docs/pretraining.md for the layout.")
        return []
    entries: list[LesionEntry] = []
    for i, item in enumerate(doc["lesions"]):
        where = f"{path}: lesions[{i}]"
        if not isinstance(item, dict):
            problems.append(f"{where} must be a mapping with keys label, report (got {item!r}).")
            continue
        label = item.get("label")
        if not isinstance(label, int) or isinstance(label, bool):
            problems.append(f"{where}.label = {label!r}; must be an integer label id from dataset.json "
                            f"(one of {sorted(valid_labels)}).")
            continue
        if label not in valid_labels:
            problems.append(f"{where}.label = {label} is not a lesion label in dataset.json "
                            f"(valid: {sorted(valid_labels)}). Use one of them or add it to dataset.json.")
            continue
        comp = item.get("component")
        if comp is not None and (not isinstance(comp, int) or isinstance(comp, bool) or comp < 0):
            problems.append(f"{where}.component = {comp!r}; must be a non-negative integer "
                            "(connected component index, largest first) or omitted.")
            continue
        rep = item.get("report")
        if not isinstance(rep, dict):
            problems.append(f"{where}.report must be a mapping of the 11 report attributes + lesion_type + "
                            f"size_mm, got {rep!r}.")
            continue
        try:
            report = LesionReport.from_dict(rep, source=f"{where}.report")
        except LesionDiffusionError as exc:
            problems.append(f"{where}.report: {exc}")
            continue
        problems.extend(f"{where}.report: {p}" for p in catalog_problems(report))
        entries.append(LesionEntry(label=label, component=comp, report=rep))
    return entries


def catalog_problems(report: Any) -> list[str]:
    """What `report check` refuses in a report whose lesion_type has a catalog (the same
    ``Catalog.check_report``), each with the fix. A lesion type without a catalog is only a warning
    (``check_dataset_warnings``): pretraining needs no catalog, synthesis does."""
    from lesiondiffusion.catalog import catalog_files, load_catalog
    from lesiondiffusion.errors import CatalogError

    path = catalog_files().get(report.lesion_type)
    if path is None:
        return []
    try:
        catalog = load_catalog(path)
    except CatalogError as exc:
        return [f"its catalog cannot be read: {exc}"]
    found = catalog.check_report(report)
    if not found:
        return []
    return [f"does not fit catalog {catalog.name} ({catalog.path}): " + "; ".join(found)
            + ". `report check`, `synthesize --report` and pretraining refuse it alike: fix the values, or delete "
              "the file and derive it again (`lesiondiffusion pretrain prepare DATA --derive-reports` fits derived "
              "reports to their catalog)."]


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """Connected components (26-connectivity) of a boolean mask, largest first (ties: first voxel)."""
    from scipy import ndimage

    lab, n = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    if n == 0:
        return []
    sizes = np.bincount(lab.ravel())[1:]
    order = sorted(range(n), key=lambda k: -sizes[k])  # stable: equal sizes keep scan order
    return [lab == (k + 1) for k in order]


def entry_mask(lesion_labels: np.ndarray, entry: LesionEntry, comps_cache: dict[int, list[np.ndarray]]) -> np.ndarray:
    """Boolean voxels of one report entry (all voxels of the label, or one of its components)."""
    full = lesion_labels == entry.label
    if entry.component is None:
        return full
    if entry.label not in comps_cache:
        comps_cache[entry.label] = _components(full)
    comps = comps_cache[entry.label]
    if entry.component >= len(comps):
        return np.zeros_like(full)
    return comps[entry.component]


def _header(path: Path, problems: list[str]) -> Any:
    import nibabel as nib

    try:
        img = nib.load(str(path))
        # nib.load reads only the header; a truncated .nii.gz fails when the voxels are read (EOFError),
        # so read them here, once, and keep them in memory for the checks below
        img = type(img)(np.asanyarray(img.dataobj), img.affine, img.header)
    except Exception as exc:  # nibabel, gzip and zlib raise many types for corrupt files
        problems.append(f"{path}: cannot read as NIfTI ({type(exc).__name__}: {exc}). Re-export the file.")
        return None
    if len(img.shape) != 3:
        problems.append(f"{path}: shape {img.shape}; a 3D volume is required.")
        return None
    return img


def check_case(data_dir: Path, case: str, valid_labels: dict[int, str], file_ending: str = ".nii.gz") -> list[str]:
    """All problems of one case (empty list = usable)."""
    problems: list[str] = []
    paths = case_paths(data_dir, case, file_ending)
    imgs: dict[str, Any] = {}
    for key in ("image", "lesion", "organs"):
        p = paths[key]
        assert p is not None
        if not p.exists():
            folder = {"image": "imagesTr", "lesion": "labelsTr", "organs": "organsTr"}[key]
            problems.append(f"case {case}: missing {p} ({folder}). Add the file or remove the case's other files.")
            continue
        img = _header(p, problems)
        if img is not None:
            imgs[key] = img
    if "image" in imgs:
        ref = imgs["image"]
        for key in ("lesion", "organs"):
            if key not in imgs:
                continue
            other = imgs[key]
            if tuple(other.shape) != tuple(ref.shape):
                problems.append(f"case {case}: {paths[key]} has shape {tuple(other.shape)} but the image "
                                f"{paths['image'].name} has {tuple(ref.shape)}. Resample it onto the image grid.")
            elif not np.allclose(other.affine, ref.affine, atol=1e-3, rtol=1e-5):
                problems.append(f"case {case}: {paths[key]} affine differs from the image's "
                                f"(max |diff| {np.abs(other.affine - ref.affine).max():.4g} mm). "
                                "Save it with the image's affine/header.")
        data = np.asanyarray(ref.dataobj)
        if not np.isfinite(data).all():
            problems.append(f"case {case}: {paths['image']} contains NaN/inf voxels. Replace them (e.g. with -1024 HU).")
    lesion = None
    if "lesion" in imgs:
        lesion = np.asanyarray(imgs["lesion"].dataobj)
        if not np.issubdtype(lesion.dtype, np.integer):
            if not np.all(np.mod(lesion, 1) == 0):
                problems.append(f"case {case}: {paths['lesion']} has non-integer values; labels must be integers.")
            lesion = np.rint(lesion).astype(np.int32)
        present = {int(v) for v in np.unique(lesion)} - {0}
        unknown = present - set(valid_labels)
        if unknown:
            problems.append(f"case {case}: {paths['lesion']} contains label values {sorted(unknown)} that are "
                            f"not in dataset.json labels {sorted(valid_labels)}. Add them or relabel.")
    if "organs" in imgs:
        org = np.asanyarray(imgs["organs"].dataobj)
        if not np.issubdtype(org.dtype, np.integer) and not np.all(np.mod(org, 1) == 0):
            problems.append(f"case {case}: {paths['organs']} has non-integer values; organ maps are label maps.")
        elif not np.any(org):
            problems.append(f"case {case}: {paths['organs']} is empty (all zero). Run TotalSegmentator on the image.")

    rep_path = paths["report"]
    entries: list[LesionEntry] = []
    if rep_path is None:
        if lesion is not None and np.any(lesion):
            problems.append(f"case {case}: missing reportsTr/{case}.yaml although {paths['lesion'].name} has "
                            f"lesion voxels. Derive the missing reports from the images: `lesiondiffusion pretrain "
                            f"prepare {data_dir} --derive-reports`, or write one report per lesion (docs/pretraining.md).")
    else:
        n_before = len(problems)
        entries = parse_report_entries(rep_path, valid_labels, problems)
        report_parsed_ok = len(problems) == n_before
    if lesion is not None and entries:
        comps: dict[int, list[np.ndarray]] = {}
        seen: set[tuple[int, int | None]] = set()
        for i, entry in enumerate(entries):
            key = (entry.label, entry.component)
            if key in seen:
                problems.append(f"{rep_path}: lesions[{i}] repeats label {entry.label} component "
                                f"{entry.component}; each lesion needs its own entry (set 'component').")
            seen.add(key)
            if not entry_mask(lesion, entry, comps).any():
                what = f"label {entry.label}" + ("" if entry.component is None else f" component {entry.component}")
                n_comp = len(comps.get(entry.label, _components(lesion == entry.label)))
                problems.append(f"{rep_path}: lesions[{i}] refers to {what}, which has zero voxels in "
                                f"{paths['lesion'].name} ({n_comp} component(s) of that label). "
                                "Fix the label/component or drop the entry.")
        labels_with_entries = {e.label for e in entries}
        mixed = {e.label for e in entries if e.component is None} & {e.label for e in entries if e.component is not None}
        for lab in sorted(mixed):
            problems.append(f"{rep_path}: label {lab} has entries both with and without 'component'; "
                            "use components for all of them.")
        present = {int(v) for v in np.unique(lesion)} - {0}
        for lab in sorted((present & set(valid_labels)) - labels_with_entries):
            problems.append(f"case {case}: label {lab} ({valid_labels[lab]}) has voxels in {paths['lesion'].name} "
                            f"but no report entry in {rep_path.name}. Add a report for it.")
    elif lesion is not None and rep_path is not None and np.any(lesion):
        present = {int(v) for v in np.unique(lesion)} - {0}
        if present & set(valid_labels) and report_parsed_ok:
            problems.append(f"{rep_path}: no lesion entries although {paths['lesion'].name} has labels "
                            f"{sorted(present)}. Add one report per lesion.")
    return problems


def check_dataset(data_dir: str | os.PathLike) -> list[str]:
    """Every problem of a pretraining dataset, as messages naming file, key, value and fix."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        return [f"{data_dir}: not a folder. Point --data at the dataset root (with dataset.json, imagesTr, ...)."]
    problems: list[str] = []
    meta = _read_dataset_json(data_dir, problems)
    file_ending = (meta or {}).get("file_ending", ".nii.gz")
    for sub in ("imagesTr", "labelsTr", "organsTr"):
        if not (data_dir / sub).is_dir():
            problems.append(f"{data_dir / sub}: folder missing. See docs/pretraining.md for the layout.")
    cases = find_cases(data_dir, file_ending)
    if not cases:
        problems.append(f"{data_dir}: no cases found (expected imagesTr/<case>_0000{file_ending}).")
    valid = label_ids(meta or {})
    for case in cases:
        problems.extend(check_case(data_dir, case, valid, file_ending))
    return problems


SIZE_WARN_FACTOR = 1.5  # report size_mm vs the mask's measured extent: beyond this factor, warn


def _organ_classes(report: Any) -> list[str]:
    """Class names of the report's organ: from its lesion type's catalog, else from any catalog that
    declares the organ (an empty list when no catalog knows it)."""
    from lesiondiffusion.catalog import catalog_files, load_catalog
    from lesiondiffusion.errors import CatalogError

    files = catalog_files()
    order = ([files[report.lesion_type]] if report.lesion_type in files else []) + list(files.values())
    for path in order:
        try:
            cat = load_catalog(path)
            return cat.organ_names(report.organ)
        except CatalogError:
            continue
    return []


def check_dataset_warnings(data_dir: str | os.PathLike, mapping: str | None = None) -> list[str]:
    """What pretraining can live with but a user should see: a lesion_type without a catalog, an organ
    absent from the case's organ map, a size_mm that disagrees with the mask (factor ``SIZE_WARN_FACTOR``).
    (A value or size its catalog forbids is a problem of ``check_dataset``, as in `report check`.)
    Call after ``check_dataset`` found no problems."""
    import nibabel as nib

    from lesiondiffusion.catalog import catalog_files
    from lesiondiffusion.derive import measure_extent_mm
    from lesiondiffusion.organs import organ_map_from_array
    from lesiondiffusion.report import LesionReport

    data_dir = Path(data_dir)
    meta = json.loads((data_dir / "dataset.json").read_text(encoding="utf-8"))
    valid = label_ids(meta)
    file_ending = meta.get("file_ending", ".nii.gz")
    if mapping is None:  # --mapping overrides dataset.json's organ_mapping (relative to the dataset)
        mapping = meta.get("organ_mapping", "auto")
        mapping = mapping if not str(mapping).endswith(".json") else str(data_dir / mapping)
    types = catalog_files()
    warnings: list[str] = []
    for case in find_cases(data_dir, file_ending):
        paths = case_paths(data_dir, case, file_ending)
        if paths["report"] is None:
            continue
        entries = parse_report_entries(paths["report"], valid, [])
        if not entries:
            continue
        les_img = nib.load(str(paths["lesion"]))
        lesion = np.rint(np.asanyarray(les_img.dataobj)).astype(np.int32)
        org_img = nib.load(str(paths["organs"]))
        organs = organ_map_from_array(np.rint(np.asanyarray(org_img.dataobj)).astype(np.int32), org_img.affine,
                                      mapping, path=paths["organs"])
        comps: dict[int, list[np.ndarray]] = {}
        for i, entry in enumerate(entries):
            where = f"{paths['report']}: lesions[{i}]"
            rep = LesionReport.from_dict(entry.report, source=where)
            if rep.lesion_type not in types:
                warnings.append(f"{where}.report.lesion_type = {rep.lesion_type!r} has no catalog (known: "
                                f"{', '.join(sorted(types))}). Pretraining works; synthesising this type needs one: "
                                "copy attribute_catalogs/_template.yaml into a folder on $LESIONDIFFUSION_CATALOG_PATH.")
            classes = _organ_classes(rep)
            present = [c for c in classes if organs.has(c)]
            if not present:
                shown = ", ".join(organs.present_names()[:12])
                warnings.append(f"{where}.report.organ = {rep.organ!r}: "
                                + (f"its classes {', '.join(classes)} have no voxel in {paths['organs'].name} "
                                   f"(name table {organs.source}; labels present: {shown})" if classes else
                                   "no catalog maps this organ to organ-map classes")
                                + ". Fix the organ, the organ map, or dataset.json 'organ_mapping' (v1, v2 or a JSON file).")
            mask = entry_mask(lesion, entry, comps)
            if mask.any():
                measured = measure_extent_mm(mask, les_img.affine)
                ratio = max(rep.size_mm) / max(max(measured), 1e-6)
                if ratio > SIZE_WARN_FACTOR or ratio < 1.0 / SIZE_WARN_FACTOR:
                    warnings.append(f"{where}.report.size_mm = {list(rep.size_mm)} but the mask measures "
                                    f"{[round(v, 1) for v in measured]} mm through the affine (largest extent x{ratio:.2f}). "
                                    "Fix size_mm (or derive it: `lesiondiffusion report derive`) or the label/component.")
    return warnings


def derive_missing_reports(data_dir: Path, *, enhancement: str = "non-contrast CT", mapping: str | None = None,
                           file_ending: str | None = None) -> list[tuple[Path, int]]:
    """Write reportsTr/{case}.yaml, derived from the images (``lesiondiffusion.derive``), for every case
    with lesion voxels and no report file; a dataset.json label name is the lesion_type. Existing report
    files are never touched. Returns (file, number of lesions) per written file."""
    from lesiondiffusion.derive import derive_reports
    from lesiondiffusion.io import load_nifti, write_yaml
    from lesiondiffusion.organs import load_organ_map

    meta_problems: list[str] = []
    meta = _read_dataset_json(data_dir, meta_problems)
    if meta is None or meta_problems:
        raise DataCheckError("\n".join(meta_problems))
    file_ending = file_ending or meta.get("file_ending", ".nii.gz")
    valid = label_ids(meta)
    if mapping is None:  # dataset.json's entry, relative to the dataset folder
        mapping = meta.get("organ_mapping", "auto")
        if str(mapping).endswith(".json"):
            mapping = str(data_dir / mapping)
    written = []
    (data_dir / "reportsTr").mkdir(exist_ok=True)
    for case in find_cases(data_dir, file_ending):
        paths = case_paths(data_dir, case, file_ending)
        if paths["report"] is not None or not paths["lesion"].exists():  # type: ignore[union-attr]
            continue
        lesion, _, _ = load_nifti(paths["lesion"])
        if not np.any(lesion):
            continue
        ct, _, _ = load_nifti(paths["image"], np.float32)
        organs = load_organ_map(paths["organs"], mapping)
        try:
            entries = derive_reports(ct, lesion, organs, enhancement=enhancement, label_types=valid)
        except LesionDiffusionError as exc:
            raise DataCheckError(f"case {case}: cannot derive reports: {exc}") from None
        out = data_dir / "reportsTr" / f"{case}.yaml"
        write_yaml(out, {"lesions": entries})
        written.append((out, len(entries)))
    return written


def validate_dataset(data_dir: str | os.PathLike) -> list[str]:
    """Raise DataCheckError listing every problem; return the case ids when the dataset is usable."""
    problems = check_dataset(data_dir)
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise DataCheckError(f"dataset {data_dir} has {len(problems)} problem(s):\n{lines}")
    meta = json.loads((Path(data_dir) / "dataset.json").read_text(encoding="utf-8"))
    return find_cases(Path(data_dir), meta.get("file_ending", ".nii.gz"))


# --------------------------------------------------------------------------------------------------
# preparation: reorient, resample, window, crop, cache
# --------------------------------------------------------------------------------------------------


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
    from lesiondiffusion.geometry import to_canonical

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
    from lesiondiffusion.geometry import CropGeometry

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
    import nibabel as nib

    from lesiondiffusion.io import voxel_spacing

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

    store = cfg.crop_store()
    lesion_recs: list[dict[str, Any]] = []
    for k, entry in enumerate(entries):
        mask = ids_r == (k + 1)
        if not mask.any():
            log.warning("case %s lesion %d vanished after resampling to %s mm (too small); skipped",
                        case, k, cfg.spacing_mm)
            continue
        nz = np.nonzero(mask)
        lo = [int(a.min()) for a in nz]
        hi = [int(a.max()) + 1 for a in nz]
        center = [(a + b) // 2 for a, b in zip(lo, hi)]
        extent = [b - a for a, b in zip(lo, hi)]
        # the organ the lesion sits in: organ labels touching the lesion (dilated by one voxel). Taken
        # from the data, not from catalogs, so user datasets with any lesion type work.
        from scipy import ndimage

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
        lesion_recs.append({"case": case, "index": k, "label": entry.label, "component": entry.component,
                            "file": crop_file, "center": center, "extent": extent, "organ_ids": organ_ids,
                            "voxels": int(mask.sum()), "truncated": False, "coarsen": round(coarsen, 4),
                            "report": entry.report})
    return case_rec, lesion_recs


def prepare_dataset(data_dir: str | os.PathLike, cache_dir: str | os.PathLike, cfg: PrepConfig,
                    *, force: bool = False, progress: bool = True) -> Manifest:
    """Validate, then resample/window/crop every case into ``cache_dir`` (reused when up to date).

    Every file is written atomically and the manifest last, so an interrupted preparation is redone
    from scratch on the next call instead of training on a partial cache.
    """
    from tqdm import tqdm

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


# --------------------------------------------------------------------------------------------------
# datasets (streamed from the cache by DataLoader workers)
# --------------------------------------------------------------------------------------------------


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
        from lesiondiffusion.report import LesionReport

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
