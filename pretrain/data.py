"""Pretraining data, by stage: ``check`` (dataset validation, `pretrain check`, derived reports),
``prepare`` (one-time preparation into a cache) and ``datasets`` (the torch Datasets the three trainers
stream from). Every name they define is importable from here as before.

Layout (see docs/pretraining.md): an nnU-Net raw dataset (dataset.json, imagesTr, labelsTr) plus
organsTr/{case}.nii.gz (TotalSegmentator labels) and reportsTr/{case}.yaml (one report per lesion).
"""

from __future__ import annotations

from .check import (
    REPORT_SUFFIXES,
    SIZE_WARN_FACTOR,
    LesionEntry,
    case_paths,
    catalog_problems,
    check_case,
    check_dataset,
    check_dataset_warnings,
    derive_missing_reports,
    entry_mask,
    find_cases,
    label_ids,
    parse_report_entries,
    read_report_file,
    validate_dataset,
)
from .datasets import LesionCropDataset, VolumePatchDataset, sample_rng
from .prepare import (
    CACHE_VERSION,
    Manifest,
    PrepConfig,
    crop_at,
    crop_scaled,
    dataset_fingerprint,
    prepare_dataset,
    resample_volume,
    unwindow,
    window,
)

__all__ = [
    "REPORT_SUFFIXES", "SIZE_WARN_FACTOR", "LesionEntry", "case_paths", "catalog_problems", "check_case",
    "check_dataset", "check_dataset_warnings", "derive_missing_reports", "entry_mask", "find_cases", "label_ids",
    "parse_report_entries", "read_report_file", "validate_dataset",
    "LesionCropDataset", "VolumePatchDataset", "sample_rng",
    "CACHE_VERSION", "Manifest", "PrepConfig", "crop_at", "crop_scaled", "dataset_fingerprint", "prepare_dataset",
    "resample_volume", "unwindow", "window",
]
