"""Pretraining dataset discovery and validation (`lesiondiffusion pretrain check`), and the reports
`pretrain prepare --derive-reports` writes for cases that have none.

Layout (see docs/pretraining.md): an nnU-Net raw dataset (dataset.json, imagesTr, labelsTr) plus
organsTr/{case}.nii.gz (TotalSegmentator labels) and reportsTr/{case}.yaml (one report per lesion).
Every problem is a message naming file, key, value and fix; none is raised until all are collected.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage

from lesiondiffusion.catalog import catalog_files, load_catalog
from lesiondiffusion.derive import derive_reports, measure_extent_mm
from lesiondiffusion.errors import CatalogError, DataCheckError, LesionDiffusionError
from lesiondiffusion.io import load_nifti, read_text_input, write_yaml
from lesiondiffusion.organs import load_organ_map, organ_map_from_array
from lesiondiffusion.report import LesionReport
from lesiondiffusion.safeyaml import load_yaml

REPORT_SUFFIXES = (".yaml", ".yml", ".json")


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
    text = read_text_input(path, "report")
    if path.suffix == ".json":
        return json.loads(text)
    # the bounded loader: an alias bomb in one report hung `pretrain check` (every value is walked)
    return load_yaml(text, path, DataCheckError)


def parse_report_entries(path: Path, valid_labels: dict[int, str], problems: list[str]) -> list[LesionEntry]:
    """Parse reportsTr/{case}.yaml; every problem is appended (with file, key, value, fix), none raised."""
    try:
        doc = read_report_file(path)
    except LesionDiffusionError as exc:  # refused before parsing (size, encoding, alias bomb): says why and the fix
        problems.append(str(exc))
        return []
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
    imgs = _read_case_volumes(case, paths, problems)
    _check_same_grid(case, paths, imgs, problems)
    lesion = _check_lesion_labels(case, paths, imgs, valid_labels, problems)
    _check_organ_map(case, paths, imgs, problems)
    _check_reports(data_dir, case, paths, lesion, valid_labels, problems)
    return problems


def _read_case_volumes(case: str, paths: dict[str, Path | None], problems: list[str]) -> dict[str, Any]:
    """The case's image, lesion and organ volumes that exist and read as 3D NIfTI (key -> image)."""
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
    return imgs


def _check_same_grid(case: str, paths: dict[str, Any], imgs: dict[str, Any], problems: list[str]) -> None:
    """Lesion and organ maps on the image's grid (shape, affine); the image free of NaN/inf."""
    if "image" not in imgs:
        return
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


def _check_lesion_labels(case: str, paths: dict[str, Any], imgs: dict[str, Any], valid_labels: dict[int, str],
                         problems: list[str]) -> np.ndarray | None:
    """The lesion label volume (integers; None when unreadable), its values checked against dataset.json."""
    if "lesion" not in imgs:
        return None
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
    return lesion


def _check_organ_map(case: str, paths: dict[str, Any], imgs: dict[str, Any], problems: list[str]) -> None:
    if "organs" not in imgs:
        return
    org = np.asanyarray(imgs["organs"].dataobj)
    if not np.issubdtype(org.dtype, np.integer) and not np.all(np.mod(org, 1) == 0):
        problems.append(f"case {case}: {paths['organs']} has non-integer values; organ maps are label maps.")
    elif not np.any(org):
        problems.append(f"case {case}: {paths['organs']} is empty (all zero). Run TotalSegmentator on the image.")


def _check_reports(data_dir: Path, case: str, paths: dict[str, Any], lesion: np.ndarray | None,
                   valid_labels: dict[int, str], problems: list[str]) -> None:
    """The report file parses, and its entries and the lesion labels describe the same lesions."""
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
        _check_entries_match_labels(case, paths, lesion, entries, valid_labels, problems)
    elif lesion is not None and rep_path is not None and np.any(lesion):
        present = {int(v) for v in np.unique(lesion)} - {0}
        if present & set(valid_labels) and report_parsed_ok:
            problems.append(f"{rep_path}: no lesion entries although {paths['lesion'].name} has labels "
                            f"{sorted(present)}. Add one report per lesion.")


def _check_entries_match_labels(case: str, paths: dict[str, Any], lesion: np.ndarray, entries: list[LesionEntry],
                                valid_labels: dict[int, str], problems: list[str]) -> None:
    """One entry per lesion: no repeats, none without voxels, no label mixing whole-label and component
    entries, and no labelled lesion without an entry."""
    rep_path = paths["report"]
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


# fewer training lesions than this for a value its catalog allows: the networks cannot be expected to
# follow that prompt (the demo phantoms had 5 irregular liver lesions of 40 and LMNet never learnt
# "irregular"; the 9 derived sarcoma reports had no "irregular" and no "hypodense")
MIN_PROMPT_EXAMPLES = 5


def prompt_coverage(data_dir: str | os.PathLike, attributes: tuple[str, ...] = ("shape", "density", "surface",
                                                                                  "density_variations"),
                    min_examples: int = MIN_PROMPT_EXAMPLES) -> tuple[dict, list[str]]:
    """How many training lesions show each value of the conditioning attributes, per lesion type, and a
    warning per lesion type listing the values its catalog can ask for (weight > 0) that fewer than
    ``min_examples`` lesions show. Text conditioning is learnt from these examples only: a prompt value
    the data never shows gives lesions that look like the values it does show. Call after
    ``check_dataset`` found no problems."""
    data_dir = Path(data_dir)
    meta = json.loads((data_dir / "dataset.json").read_text(encoding="utf-8"))
    valid = label_ids(meta)
    counts: dict[str, dict[str, dict[str, int]]] = {}
    lesions: dict[str, int] = {}
    for case in find_cases(data_dir, meta.get("file_ending", ".nii.gz")):
        report_file = case_paths(data_dir, case, meta.get("file_ending", ".nii.gz"))["report"]
        if report_file is None:
            continue
        for entry in parse_report_entries(report_file, valid, []):
            rep = LesionReport.from_dict(entry.report, source=str(report_file))
            per_type = counts.setdefault(rep.lesion_type, {a: {} for a in attributes})
            lesions[rep.lesion_type] = lesions.get(rep.lesion_type, 0) + 1
            for a in attributes:
                value = getattr(rep, a, None)
                if value:
                    per_type[a][value] = per_type[a].get(value, 0) + 1
    types = catalog_files()
    warnings = []
    for lesion_type, per_type in sorted(counts.items()):
        if lesion_type not in types:
            continue  # check_dataset_warnings already says this type has no catalog
        catalog = load_catalog(lesion_type)
        n = lesions[lesion_type]
        thin = []
        for a in attributes:
            if a not in catalog.attributes:
                continue
            asked = [v for v, w in catalog.domain(a).items() if w > 0]
            if len(asked) < 2:
                continue  # a single allowed value is not a prompt the network must tell apart
            thin += [f"{a} '{v}' ({per_type[a].get(v, 0)})" for v in asked if per_type[a].get(v, 0) < min_examples]
        if thin:
            warnings.append(
                f"{lesion_type}: of {n} training lesion(s), fewer than {min_examples} show these values its catalog "
                f"samples: {', '.join(thin)}. The networks cannot learn to follow a prompt they (almost) never see; "
                "synthesis asked for it will look like the values the data shows. Add lesions that show them, or "
                f"restrict the catalog's attributes to the values your data has (`lesiondiffusion catalogs show "
                f"{lesion_type}`).")
    return counts, warnings


def derive_missing_reports(data_dir: Path, *, enhancement: str = "non-contrast CT", mapping: str | None = None,
                           file_ending: str | None = None) -> list[tuple[Path, int]]:
    """Write reportsTr/{case}.yaml, derived from the images (``lesiondiffusion.derive``), for every case
    with lesion voxels and no report file; a dataset.json label name is the lesion_type. Existing report
    files are never touched. Returns (file, number of lesions) per written file."""
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
