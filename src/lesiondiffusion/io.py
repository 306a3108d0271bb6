"""File input/output shared by every stage: NIfTI volumes, YAML/JSON, atomic writes.

Outputs are always written to a temporary file in the destination folder and renamed into place, so
an interrupted run never leaves a half-written file under the final name.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .errors import LesionDiffusionError


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    ``suffix`` keeps the file extension for writers that dispatch on it (nibabel, matplotlib).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix is None:
        suffix = "".join(path.suffixes) or ".tmp"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    # mkstemp creates owner-only files; give the final file the permissions a plain open() would
    os.chmod(tmp_path, 0o666 & ~_current_umask())
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_yaml(path: str | os.PathLike, obj: Any) -> None:
    import yaml

    atomic_write_text(path, yaml.safe_dump(obj, sort_keys=False, allow_unicode=True))


def refuse_overwrite_input(output: str | os.PathLike, *inputs: str | os.PathLike | None) -> None:
    """Raise if ``output`` resolves to one of the ``inputs``: user inputs are never overwritten."""
    out = Path(output).resolve()
    for item in inputs:
        if item is not None and Path(item).resolve() == out:
            raise LesionDiffusionError(
                f"Output path {output} is the same file as the input {item}; inputs are never "
                "overwritten. Choose a different output path."
            )


def load_nifti(path: str | os.PathLike, dtype: Any = None) -> tuple[np.ndarray, np.ndarray, Any]:
    """Read a NIfTI file and return ``(array, affine, header)`` in the file's voxel order."""
    import nibabel as nib

    path = Path(path)
    if not path.exists():
        raise LesionDiffusionError(f"File not found: {path}. Check the path and try again.")
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise LesionDiffusionError(
            f"Cannot read {path} as NIfTI ({type(exc).__name__}: {exc}). Provide a valid .nii or .nii.gz file."
        ) from exc
    if data.ndim != 3:
        raise LesionDiffusionError(
            f"{path} has shape {data.shape}; a 3D volume is required. Split 4D files into single volumes."
        )
    if dtype is not None:
        data = data.astype(dtype, copy=False)
    return data, np.asarray(img.affine, dtype=np.float64), img.header


def save_nifti(
    path: str | os.PathLike, array: np.ndarray, affine: np.ndarray, header: Any = None
) -> None:
    """Write a NIfTI file atomically, keeping the given affine (and header fields when provided)."""
    import nibabel as nib

    hdr = header.copy() if header is not None else None
    img = nib.Nifti1Image(np.asarray(array), affine, header=hdr)
    img.set_data_dtype(np.asarray(array).dtype)
    if hdr is not None:
        # keep the input's qform/sform codes so viewers place the volume identically
        img.set_qform(affine, code=int(hdr["qform_code"]) or 1)
        img.set_sform(affine, code=int(hdr["sform_code"]) or 1)
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))


def voxel_spacing(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size in mm along each array axis (column norms of the affine)."""
    return tuple(float(v) for v in np.linalg.norm(np.asarray(affine)[:3, :3], axis=0))
