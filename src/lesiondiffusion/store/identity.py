"""What an offline cache was built from and whether its files are still what was written: sha256 digests
of files and folders, and the difference between two cache identities."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any


def file_digest(path: str | os.PathLike, chunk: int = 1 << 20) -> tuple[int, str]:
    """``(size in bytes, sha256 hex)`` of one file, read in chunks."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while True:
            block = fh.read(chunk)
            if not block:
                break
            size += len(block)
            h.update(block)
    return size, h.hexdigest()


def folder_digest(folder: str | os.PathLike) -> str:
    """sha256 over every file of a folder (relative path + content, sorted): a bundle's identity by content,
    so a re-initialised or re-trained bundle at the same path is a different generator."""
    root = Path(folder)
    if root.is_file():
        return file_digest(root)[1]
    h = hashlib.sha256()
    for p in sorted(q for q in root.rglob("*") if q.is_file() and not q.name.startswith(".")):
        h.update(p.relative_to(root).as_posix().encode("utf-8") + b"\0")
        h.update(file_digest(p)[1].encode("ascii"))
    return h.hexdigest()


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out if out or not prefix else {prefix[:-1]: {}}
    return {prefix[:-1]: d}


def identity_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ between two cache identities, with both values (short)."""
    a, b = _flat(old), _flat(new)
    out = []
    for k in sorted(set(a) | set(b)):
        if a.get(k) != b.get(k):
            va, vb = repr(a.get(k, "<absent>")), repr(b.get(k, "<absent>"))
            out.append(f"{k}: {va[:70]} -> {vb[:70]}")
    return out
