"""File input/output shared by every stage: NIfTI volumes, YAML/JSON, atomic writes.

Outputs are always written to a temporary file in the destination folder and renamed into place, so
an interrupted run never leaves a half-written file under the final name.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import json
import os
import re
import shlex
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .errors import LesionDiffusionError


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FIXES = {
    errno.ENOSPC: "the disk is full; free space or choose an output on another disk",
    errno.EDQUOT: "the disk quota is exceeded; free space or choose an output on another disk",
    errno.EACCES: "it is not writable; choose a writable output folder or fix its permissions",
    errno.EPERM: "it is not writable; choose a writable output folder or fix its permissions",
    errno.EROFS: "it is on a read-only file system; choose a writable output folder",
    errno.ENOTDIR: "a part of the path is a file, not a folder; choose an output path under a folder",
    errno.EEXIST: "a file of that name exists where a folder is needed; choose another output path",
    errno.EISDIR: "it is a folder; give a file name",
    errno.ENAMETOOLONG: "the name is too long; choose a shorter output path",
}


def os_error_message(exc: OSError, path: str | os.PathLike | None = None, action: str = "Cannot write") -> str:
    """One line for an operating-system failure: what failed, on which path, and the fix."""
    where = path if path is not None else (exc.filename or "?")
    if path is None and exc.filename2:
        where = f"{exc.filename} -> {exc.filename2}"
    if exc.errno == errno.ENOENT:
        return f"{where}: no such file or folder — check the path."
    fix = _FIXES.get(exc.errno or -1, "check the path, its permissions and the free disk space")
    return f"{action} {where}: {exc.strerror or exc} — {fix}."


def ensure_output_dir(path: str | os.PathLike, option: str | None = None) -> Path:
    """Create an output folder (and its parents) or raise one clear error saying why it cannot be used."""
    path = Path(path)
    label = f"{option} {path}" if option else str(path)
    if path.exists() and not path.is_dir():
        raise LesionDiffusionError(f"Output folder {label} is a file; choose a folder path (or remove the file).")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise LesionDiffusionError(
                    f"Output folder {label} lies under {parent}, which is a file, not a folder; choose another path.")
            break
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LesionDiffusionError(os_error_message(exc, label)) from exc
    if not os.access(path, os.W_OK | os.X_OK):
        raise LesionDiffusionError(
            f"Cannot write {label}: it is read-only for this user — choose a writable output folder or fix its permissions.")
    return path


def temp_tag() -> str:
    """Part of a temporary name that says which process owns it, so a later run can tell a crashed
    run's leftovers (removed) from a live run's work in progress (kept)."""
    return f"pid{os.getpid()}@{_host()}."


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())


_TAG = re.compile(r"pid(\d+)@([^.]+)\.")


def _owner_alive(name: str) -> bool:
    m = _TAG.search(name)
    if not m:
        return False  # made before names carried their owner: a crashed run's leftover
    if m.group(2) != _host():
        return True  # another machine's run on a shared disk: cannot tell, keep it
    pid = int(m.group(1))
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(folder: str | os.PathLike, pattern: str) -> list[Path]:
    """Delete entries of ``folder`` whose name matches ``pattern`` (a crashed run's temporaries) unless
    the process that made them still runs; returns what was removed."""
    removed = []
    rx = re.compile(pattern)
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        if not rx.fullmatch(entry.name) or _owner_alive(entry.name):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


@contextlib.contextmanager
def claim_folder(folder: str | os.PathLike, command: str, lock_name: str = ".lesiondiffusion.lock") -> Iterator[Path]:
    """Hold ``folder`` for one run: an exclusive create of a lock file (atomic on local disks and NFSv3+), so
    a second run into the same folder refuses instead of mixing its files with ours. A lock left by a run
    that crashed on this machine is taken over; the lock is removed when the block ends."""
    lock = Path(folder) / lock_name
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            try:
                owner = lock.read_text(encoding="utf-8").strip()
            except OSError:
                owner = ""
            if owner and not _owner_alive(owner):  # a crashed run's lock on this machine
                lock.unlink(missing_ok=True)
                continue
            m = _TAG.search(owner)
            who = f"process {m.group(1)} on {m.group(2)}" if m else "another process"
            raise LesionDiffusionError(
                f"{folder} is in use by another {command} run ({who} holds {lock}); wait for it to finish or choose "
                f"another output folder. If no such run is alive, delete {lock}.")
    else:
        raise LesionDiffusionError(f"Cannot claim {folder}: {lock} keeps reappearing; another run is starting there.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(temp_tag())
        yield lock
    finally:
        lock.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    ``suffix`` keeps the file extension for writers that dispatch on it (nibabel, matplotlib).
    """
    path = Path(path)
    if suffix is None:
        suffix = "".join(path.suffixes) or ".tmp"
    ensure_output_dir(path.parent)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{temp_tag()}", suffix=suffix, dir=path.parent)
    except OSError as exc:
        raise LesionDiffusionError(os_error_message(exc, path)) from exc
    os.close(fd)
    tmp_path = Path(tmp)
    # mkstemp creates owner-only files; give the final file the permissions a plain open() would
    os.chmod(tmp_path, 0o666 & ~_current_umask())
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except OSError as exc:
        raise LesionDiffusionError(os_error_message(exc, path)) from exc
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


def write_csv(path: str | os.PathLike, rows: list[dict[str, Any]], float_format: str = ".4g") -> None:
    """Rows (dicts with the same keys) as a CSV with a header, atomically; floats as ``float_format``."""
    if not rows:
        atomic_write_text(path, "")
        return
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            for r in rows:
                w.writerow({k: (format(v, float_format) if isinstance(v, float) else v) for k, v in r.items()})


def _forms(path: str | os.PathLike) -> set[Path]:
    """The literal absolute path and its symlink-resolved form (a link and its target both count)."""
    return {Path(os.path.abspath(path)), Path(path).resolve()}


def _overlap(out: Path, item: Path) -> str | None:
    if out == item:
        return "is"
    if out in item.parents:
        return "contains"
    if item in out.parents:
        return "lies inside"
    return None


def refuse_overwrite_input(output: str | os.PathLike, *inputs: str | os.PathLike | None,
                           names: dict[str, str | os.PathLike | None] | None = None,
                           may_contain: bool = False) -> None:
    """Raise if ``output`` is, contains or lies inside one of the inputs: user inputs are never overwritten.

    Paths are compared literally and resolved through symlinks, so a link to an input, or an output
    folder reached through a link, is caught too. ``names`` maps an option name (``--ct``) to an input
    so the message names the option. ``may_contain`` allows an output folder that only receives new
    entries (checked one by one by the caller) to hold inputs.
    """
    items: list[tuple[str, str | os.PathLike]] = [("input", p) for p in inputs if p is not None]
    items += [(k, p) for k, p in (names or {}).items() if p is not None]
    outs = _forms(output)
    for label, item in items:
        for o in outs:
            for i in _forms(item):
                how = _overlap(o, i)
                if how is not None and not (how == "contains" and may_contain):
                    what = {"is": "is the same path as", "contains": "contains",
                            "lies inside": "lies inside"}[how]
                    raise LesionDiffusionError(
                        f"Output path {output} {what} the {label} {item}; inputs are never overwritten or "
                        "deleted. Choose an output path outside every input (and not holding one)."
                    )


MAX_TEXT_INPUT_BYTES = 1 << 20  # catalogs and reports are a few KB; 1 MiB leaves room and parses in well under 1 s


def read_text_input(path: str | os.PathLike, what: str, error: type[LesionDiffusionError] = LesionDiffusionError,
                    limit: int = MAX_TEXT_INPUT_BYTES) -> str:
    """Read a small YAML/JSON input, refusing at once a file that is too large or not text.

    Parsing a 32 MB YAML file took 85 s of CPU before its first error; binary files gave a bare codec
    message. Both are refused here before any parsing, naming the file and the fix.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > limit:
            raise error(f"{path}: {size / 2**20:.1f} MiB is far too large for a {what} file (limit "
                        f"{limit // 2**20} MiB; they are a few KB of YAML). Check that this is the right file.")
        data = path.read_bytes()
    except OSError as exc:
        raise error(f"Cannot read {what} file {path}: {exc.strerror or exc}.") from None
    nul = data.find(b"\0")
    if nul >= 0:
        raise error(f"{path}: not a text file (a NUL byte at offset {nul}); a {what} file is UTF-8 YAML or JSON. "
                    "Check that this is the right file.")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise error(f"{path}:{line}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); save the "
                    f"{what} file as UTF-8.") from None


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


def hu_problem(ct: np.ndarray) -> str | None:
    """Why a CT volume does not look like Hounsfield units, or None.

    Every CT field of view holds air (about -1000 HU) outside the body, in the lungs or the bowel; a
    minimum above -200 means another scale (8-bit export 0-255, unrescaled 0-4095 storage, [0, 1]
    normalisation), for which the catalogs' HU ranges would paint wrong lesions.
    """
    lo, hi = float(np.min(ct)), float(np.max(ct))
    if not (np.isfinite(lo) and np.isfinite(hi)):
        arr = np.asarray(ct)
        n_nan, n_inf = int(np.isnan(arr).sum()), int(np.isinf(arr).sum())
        return f"holds {n_nan} NaN and {n_inf} infinite voxel(s)"
    if lo > -200.0:
        return (f"has values {lo:g} to {hi:g} ({np.asarray(ct).dtype}); a CT in Hounsfield units has air near "
                "-1000 HU, so this looks like another scale (8-bit export, unrescaled storage or normalised)")
    return None


def non_finite_fix(path: str | os.PathLike) -> tuple[str, Path]:
    """A shell command that writes a copy of the CT at ``path`` with NaN/inf voxels set to air (-1024 HU)
    and upper ones to 3071 HU, and the copy's path: the fix an error about a non-finite CT prints."""
    path = Path(path)
    name = path.name[:-7] if path.name.endswith(".nii.gz") else path.stem
    out = path.with_name(f"{name}_finite.nii.gz")
    code = ("import nibabel as nib, numpy as np; i = nib.load({src!r}); "
            "d = np.nan_to_num(i.get_fdata(), nan=-1024.0, posinf=3071.0, neginf=-1024.0); "
            "nib.save(nib.Nifti1Image(d.astype(np.float32), i.affine), {dst!r})").format(src=str(path), dst=str(out))
    return f"python -c {shlex.quote(code)}", out


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
