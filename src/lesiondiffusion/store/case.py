"""One synthetic training case: its type, the check that makes it usable, and its file format.

A case travels between processes (the producer's spool folder) and lives in the offline cache as one
``.npz`` written atomically; its JSON parts (name, properties, meta) go through ``_jsonable``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..io import atomic_path


@dataclass
class SyntheticCase:
    """One preprocessed synthetic training case, in the layout nnU-Net's data loader crops from.

    ``data`` is float32 (C, X, Y, Z), already normalised like the real preprocessed cases; ``seg`` is
    int16 (1, X, Y, Z) with the dataset's label ids; ``properties`` carries ``class_locations`` for
    foreground oversampling; ``meta`` holds the reports, seed and template name (JSON-serialisable).
    """

    name: str
    data: np.ndarray
    seg: np.ndarray
    properties: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)


class CaseFactory(Protocol):
    """Makes one synthetic case from a seed, or returns ``(None, reason)`` when synthesis failed.
    Factories used with a producer ``batch`` > 1 also have ``batch(seeds)``: one result per seed."""

    def __call__(self, seed: int) -> tuple[SyntheticCase | None, str | None]: ...


def validate_case(case: SyntheticCase) -> str | None:
    """Reason to drop ``case`` (NaN/inf data, shape mismatch, no lesion voxels unless the case is a
    no-lesion control), or None when usable."""
    if case.data.ndim != 4 or case.seg.ndim != 4 or case.data.shape[1:] != case.seg.shape[1:]:
        return f"shape mismatch data {case.data.shape} vs seg {case.seg.shape}"
    if not np.isfinite(case.data).all():
        return "non-finite values in the synthetic image"
    # the no_lesion control's cases are empty on purpose (its meta says so); any other empty label is a fault
    if not (case.seg > 0).any() and case.meta.get("inpainted", True):
        return "no lesion voxels in the synthetic label"
    return None


def save_case(path: Path, case: SyntheticCase) -> None:
    """Write a case as one .npz atomically (temp file + rename)."""
    props = {k: v for k, v in case.properties.items() if k != "class_locations"}
    locs = case.properties.get("class_locations", {})
    arrays = {"data": case.data.astype(np.float32, copy=False), "seg": case.seg.astype(np.int16, copy=False)}
    keys = []
    for i, (k, v) in enumerate(locs.items()):
        arrays[f"loc_{i}"] = np.asarray(v, dtype=np.int64).reshape(-1, case.seg.ndim)
        keys.append(list(k) if isinstance(k, tuple) else k)
    extra = json.dumps({"name": case.name, "properties": props, "loc_keys": keys, "meta": case.meta}, default=_jsonable)
    arrays["extra"] = np.frombuffer(extra.encode("utf-8"), dtype=np.uint8)
    with atomic_path(path, suffix=".npz") as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)


def load_case(path: Path) -> SyntheticCase:
    with np.load(path) as z:
        extra = json.loads(bytes(z["extra"]).decode("utf-8"))
        locs = {}
        for i, k in enumerate(extra["loc_keys"]):
            locs[tuple(k) if isinstance(k, list) else k] = z[f"loc_{i}"]
        props = dict(extra["properties"])
        props["class_locations"] = locs
        return SyntheticCase(extra["name"], z["data"], z["seg"], props, extra["meta"])


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
