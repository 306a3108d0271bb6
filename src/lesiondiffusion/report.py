"""Structured lesion reports: ``LesionReport``, one lesion described by the 11 attributes (typed,
validated, YAML/JSON round trip).

The vocabulary it is written in (attributes, values and synonyms, ``normalize_value``, the organ
registry, ``vocabulary_phrases``) lives in ``vocabulary`` and is re-exported here.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from .errors import ReportError
from .io import read_text_input, write_json, write_yaml
from .safeyaml import load_yaml

# the vocabulary lives in its own bottom-level module; re-exported here, where callers have always found it
from .vocabulary import (  # noqa: F401
    ATTRIBUTES,
    IMAGE_ATTRIBUTES,
    LEGACY_IMAGE_ATTRIBUTES,
    LEGACY_MASK_ATTRIBUTES,
    LOCATION_CATEGORY,
    MASK_ATTRIBUTES,
    SIZE_CATEGORIES,
    SIZE_DEFAULT_MM,
    VOCABULARY,
    _DECLARED_ORGANS,
    _LOOKUP,
    _check_attribute,
    _key,
    add_organ_source,
    allowed_values,
    declare_organ,
    declared_organ,
    declared_organs,
    normalize_value,
    phrase,
    size_category,
    size_category_range,
    vocabulary_phrases,
)


def _parse_size_mm(value: Any, source: str) -> tuple[float, float, float]:
    if isinstance(value, str):
        value = [p for p in re.split(r"[,\sx×]+", value.strip()) if p]
    # no broadcasting of one number and no booleans (YAML true is 1): a size is read exactly as written
    if isinstance(value, (bool, int, float)) or any(isinstance(v, bool) for v in value or ()):
        raise ReportError(
            f"{source}: size_mm must be a list of three numbers in mm (x, y, z), got {value!r}. "
            "Example: size_mm: [22, 18, 20]."
        )
    try:
        numbers = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise ReportError(
            f"{source}: size_mm must be three numbers in mm (x, y, z), got {value!r}. Example: size_mm: [22, 18, 20]."
        ) from None
    if len(numbers) != 3 or not all(math.isfinite(v) and v > 0 for v in numbers):
        raise ReportError(
            f"{source}: size_mm must be three positive finite numbers in mm (x, y, z), got {value!r}. "
            "Example: size_mm: [22, 18, 20]."
        )
    return numbers  # type: ignore[return-value]


def _check_type_name(name: str) -> None:
    """A report's lesion type is resolved by name on the catalog path, never opened as a file: a report from
    elsewhere must not make the tool read ``../../etc/passwd`` or any other file it names."""
    if ("/" in name or "\\" in name or name.startswith(".") or os.path.isabs(name)
            or name.lower().endswith((".yaml", ".yml")) or any(ord(c) < 32 for c in name)):
        raise ReportError(
            f"lesion_type {name!r} is a path; a lesion type is a catalog name (e.g. 'kidney_tumor', see "
            "`lesiondiffusion catalogs list`). For your own catalog, put its YAML file in a folder listed in "
            "$LESIONDIFFUSION_CATALOG_PATH and use the file's name without .yaml.")


@dataclass
class LesionReport:
    """One lesion described by the 11 attributes plus its extent in mm.

    Values are canonical vocabulary strings (synonyms are normalised on construction). ``size`` is the
    category of ``max(size_mm)``; use ``with_size_mm`` to change the extent. Attributes listed in
    ``free_text`` (declared by the catalog) may hold any non-empty text.
    """

    lesion_type: str
    shape: str
    organ_type: str
    lesion_location: str
    organ: str
    size: str
    relationship: str
    surface: str
    specific_features: str
    enhancement: str
    density: str
    density_variations: str
    size_mm: tuple[float, float, float]
    free_text: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.lesion_type, str) or not self.lesion_type.strip():
            raise ReportError(
                f"lesion_type must be a non-empty catalog name (e.g. 'kidney_tumor'), got {self.lesion_type!r}."
            )
        _check_type_name(self.lesion_type)
        self.free_text = tuple(self.free_text)
        for name in self.free_text:
            _check_attribute(name)
        self.size_mm = _parse_size_mm(self.size_mm, f"report {self.lesion_type}")
        for attribute in ATTRIBUTES:
            value = getattr(self, attribute)
            if attribute in self.free_text and attribute != "size":
                if not isinstance(value, str) or not value.strip():
                    raise ReportError(
                        f"Free-text attribute {attribute!r} of report {self.lesion_type} must be non-empty text, got {value!r}."
                    )
                try:
                    value = normalize_value(attribute, value)
                except ReportError:
                    value = " ".join(value.split())
            else:
                value = normalize_value(attribute, value)
            setattr(self, attribute, value)
        expected = size_category(self.size_mm)
        if self.size != expected:
            raise ReportError(
                f"Report {self.lesion_type}: size {self.size!r} contradicts size_mm {list(self.size_mm)} "
                f"(largest extent {max(self.size_mm):g} mm is {expected!r}). Fix size or size_mm, or omit "
                "size: it is derived from size_mm (in code use report.with_size_mm())."
            )

    # -- phrases -------------------------------------------------------------------------------
    def phrases(self, attributes: Iterable[str] = ATTRIBUTES) -> list[str]:
        return [phrase(a, getattr(self, a)) for a in attributes]

    def mask_phrases(self) -> list[str]:
        """The mask model's (LMNet) phrases, in ``MASK_ATTRIBUTES`` order."""
        return self.phrases(MASK_ATTRIBUTES)

    def image_phrases(self) -> list[str]:
        """The image model's (LINet) phrases, in ``IMAGE_ATTRIBUTES`` order."""
        return self.phrases(IMAGE_ATTRIBUTES)

    @property
    def placement_category(self) -> str:
        """The placement rule of this report's lesion_location (see placement.py)."""
        return LOCATION_CATEGORY[self.lesion_location]

    def with_size_mm(self, size_mm: Iterable[float]) -> "LesionReport":
        """A copy with a new extent and the matching size category."""
        size_mm = _parse_size_mm(list(size_mm), f"report {self.lesion_type}")
        return dataclasses.replace(self, size_mm=size_mm, size=size_category(size_mm))

    # -- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"lesion_type": self.lesion_type}
        for attribute in ATTRIBUTES:
            d[attribute] = getattr(self, attribute)
        d["size_mm"] = [round(float(v), 3) for v in self.size_mm]
        if self.free_text:
            d["free_text"] = list(self.free_text)
        return d

    @classmethod
    def from_dict(
        cls, d: Mapping[str, Any], source: str = "<dict>", free_text: Iterable[str] | None = None
    ) -> "LesionReport":
        """Build a report from a mapping, normalising synonyms.

        ``size`` may be omitted (derived from ``size_mm``) and ``size_mm`` may be omitted (a typical
        extent of the ``size`` category is used). ``free_text`` overrides the attributes allowed to hold
        any text (default: the ``free_text`` key of ``d``).
        """
        if not isinstance(d, Mapping):
            raise ReportError(
                f"{source}: a report must be a mapping of attribute: value, got {type(d).__name__}."
            )
        # every problem is collected and reported at once, so one edit fixes the whole file
        problems: list[str] = []
        known = set(ATTRIBUTES) | {"lesion_type", "size_mm", "free_text"}
        unknown = [k for k in d if k not in known]
        if unknown:
            problems.append(
                f"unknown report key(s) {', '.join(map(repr, unknown))}. Allowed keys: "
                f"lesion_type, {', '.join(ATTRIBUTES)}, size_mm, free_text."
            )
        missing = [k for k in ("lesion_type", *ATTRIBUTES) if k not in d and k != "size"]
        if "size" not in d and "size_mm" not in d:
            missing.append("size or size_mm")
        if missing:
            problems.append(
                f"report is missing {', '.join(missing)}. Every report needs lesion_type, "
                "the 11 attributes (size may be replaced by size_mm) and size_mm."
            )
        lesion_type = d.get("lesion_type")
        if "lesion_type" in d and (not isinstance(lesion_type, str) or not lesion_type.strip()):
            problems.append(f"key 'lesion_type' must be a non-empty catalog name (e.g. 'kidney_tumor'), got {lesion_type!r}.")
        ft = tuple(free_text) if free_text is not None else tuple(d.get("free_text") or ())
        values: dict[str, Any] = {}
        for attribute in ATTRIBUTES:
            if attribute not in d:
                continue
            value = d[attribute]
            if attribute in ft and attribute != "size":
                values[attribute] = value
                continue
            try:
                values[attribute] = normalize_value(attribute, value)
            except ReportError as exc:
                problems.append(f"key {attribute!r}: {exc}")
        size_mm = None
        if "size_mm" in d and d["size_mm"] is not None:
            try:
                size_mm = _parse_size_mm(d["size_mm"], "key 'size_mm'")
            except ReportError as exc:
                problems.append(str(exc))
        elif "size" in values:
            size_mm = (SIZE_DEFAULT_MM[values["size"]],) * 3
        if size_mm is not None:
            derived = size_category(size_mm)
            if "size" in values and values["size"] != derived:
                problems.append(
                    f"key 'size' is {values['size']!r} but size_mm {list(size_mm)} has largest extent "
                    f"{max(size_mm):g} mm, which is {derived!r}. Fix one of them (or omit size: it is derived)."
                )
        if problems:
            if len(problems) == 1:
                raise ReportError(f"{source}: {problems[0]}")
            raise ReportError(f"{source}: {len(problems)} problems:\n  " + "\n  ".join(problems))
        assert size_mm is not None
        derived = size_category(size_mm)
        values["size"] = derived
        try:
            return cls(lesion_type=str(d["lesion_type"]), size_mm=size_mm, free_text=ft, **values)
        except ReportError as exc:
            raise ReportError(f"{source}: {exc}") from None

    def to_yaml(self, path: str | Path) -> None:
        write_yaml(path, self.to_dict())

    def to_json(self, path: str | Path) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def from_yaml(cls, path: str | Path) -> "LesionReport":
        """Read a report from YAML (or JSON, which is YAML) written by ``to_yaml``/``to_json``."""
        path = Path(path)
        if not path.exists():
            raise ReportError(f"Report file not found: {path}. Create one with `lesiondiffusion report sample TYPE -o {path}`.")
        text = read_text_input(path, "report", ReportError)
        try:
            data = json.loads(text) if path.suffix.lower() == ".json" else load_yaml(text, path, ReportError)
        except (yaml.YAMLError, json.JSONDecodeError) as exc:
            raise ReportError(f"{path}: not valid YAML/JSON ({exc}). Fix the syntax at the position shown.") from None
        if isinstance(data, Mapping) and "report" in data and isinstance(data["report"], Mapping):
            data = data["report"]  # accept {report: {...}} as written inside dataset reports
        return cls.from_dict(data, source=str(path))

    from_json = from_yaml
