"""Structured lesion reports: the 11 attributes, their vocabulary with synonyms, and the phrases the
text encoders embed.

Owns ``LesionReport`` (typed, YAML/JSON round trip), ``normalize_value`` (synonym -> canonical) and
``vocabulary_phrases`` (the finite set of phrases any report can produce, so embeddings can be cached).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from .errors import ReportError

ATTRIBUTES: tuple[str, ...] = (
    "shape",
    "organ_type",
    "lesion_location",
    "organ",
    "size",
    "relationship",
    "surface",
    "specific_features",
    "enhancement",
    "density",
    "density_variations",
)
# The method's split: mask attributes condition LMNet (the lesion's outline and where it sits), image
# attributes condition LINet (what the inside and the margin look like). Surface characteristics
# (margin definition) is an image attribute in the method: the mask's outline is drawn by the shape
# prompt, the margin's sharpness is intensity.
MASK_ATTRIBUTES: tuple[str, ...] = (
    "shape",
    "organ_type",
    "lesion_location",
    "organ",
    "size",
    "relationship",
)
IMAGE_ATTRIBUTES: tuple[str, ...] = (
    "surface",
    "specific_features",
    "enhancement",
    "density",
    "density_variations",
)
# Bundles written before the split followed the method (config.yaml without `conditioning`) gave both
# networks 8 phrases, with organ, size, relationship, surface and specific_features in both.
LEGACY_MASK_ATTRIBUTES: tuple[str, ...] = MASK_ATTRIBUTES + ("surface", "specific_features")
LEGACY_IMAGE_ATTRIBUTES: tuple[str, ...] = ("organ", "size", "relationship") + IMAGE_ATTRIBUTES

# Canonical value -> synonyms. Canonical strings are what phrases and catalogs use; synonyms are what
# people write in reports. Matching ignores case, hyphens, underscores and repeated spaces.
VOCABULARY: dict[str, dict[str, tuple[str, ...]]] = {
    "shape": {
        "round-like": ("round", "rounded", "roundish", "spherical", "round shape", "round-like shape"),
        "oval": ("ovoid", "oval-shaped", "elliptical", "ellipsoid"),
        "irregular": ("irregular shape", "irregularly shaped", "amorphous"),
        "lobulated": ("lobular", "multilobulated", "lobulated shape"),
        "nodular": ("punctate", "punctate/nodular", "nodule", "nodule-like", "dot-like", "punctiform"),
        "cystic": ("cyst-like", "cystic shape", "saccular"),
        "irregular wall thickening": ("wall thickening", "thickened wall", "irregular thickening of the wall"),
        "luminal narrowing": ("lumen narrowing", "narrowed lumen", "stenosis", "stricture"),
        "protrusion into the lumen": ("intraluminal protrusion", "polypoid", "polypoid mass", "intraluminal mass"),
        "patchy": ("patchy shape", "flaky", "patchy area"),
    },
    "organ_type": {
        "parenchymal organ": ("parenchymal", "solid organ", "parenchymatous organ"),
        "hollow organ": ("hollow", "hollow viscus", "luminal organ"),
    },
    "lesion_location": {
        "within the parenchymal organ": ("within the parenchyma", "intraparenchymal", "inside the organ", "within parenchyma"),
        "protruding from the parenchymal organ": ("protruding from the organ", "exophytic", "protruding", "partly exophytic"),
        "within the lumen of a hollow organ": ("within the lumen", "intraluminal", "in the lumen", "lumen"),
        "wall thickening": ("in the wall", "within the wall of a hollow organ", "mural", "wall"),
    },
    "organ": {
        "liver": ("hepatic", "hepar"),
        "kidney": ("renal", "kidneys"),
        "left kidney": ("kidney left", "left renal"),
        "right kidney": ("kidney right", "right renal"),
        "pancreas": ("pancreatic",),
        "stomach": ("gastric",),
        "colon": ("large bowel", "large intestine", "colorectum", "colonic"),
        "urinary bladder": ("bladder", "vesica urinaria"),
        "gallbladder": ("gall bladder",),
        "esophagus": ("oesophagus", "esophageal", "oesophageal"),
        "lung": ("lungs", "pulmonary"),
        "left lung": ("lung left",),
        "right lung": ("lung right",),
        "brain": ("cerebrum", "intracranial", "cerebral"),
        "spleen": ("splenic",),
    },
    "size": {
        "tiny (<1 cm)": ("tiny", "<1 cm", "less than 1 cm", "subcentimeter", "subcentimetre"),
        "small (1-2 cm)": ("small", "1-2 cm"),
        "medium (2-5 cm)": ("medium", "2-5 cm", "moderate", "medium-sized"),
        "large (>5 cm)": ("large", ">5 cm", "more than 5 cm", "big", "bulky"),
    },
    "relationship": {
        "no close relationship with surrounding organs": (
            "no relationship", "isolated", "no relationship with surrounding organs",
            "no close relationship with adjacent organs", "separate from surrounding organs",
        ),
        "close relationship with adjacent organs": (
            "close relationship with surrounding organs", "abutting adjacent organs", "adjacent to surrounding organs",
            "in contact with adjacent organs",
        ),
        "invasion of adjacent organs": ("invading adjacent organs", "infiltration of adjacent organs", "invasive"),
    },
    "surface": {
        "well-defined margin": ("clear margin", "well defined", "well-circumscribed", "sharp margin", "clear boundary", "smooth margin"),
        "ill-defined margin": ("unclear margin", "ill defined", "poorly defined margin", "blurred margin", "unclear boundary"),
        "lobulated margin": ("lobulated contour",),
        "clear serosal surface": ("smooth serosal surface", "intact serosa"),
        "irregular serosal surface": ("unclear serosal surface", "serosal invasion", "rough serosal surface"),
        "clear boundary with the renal parenchyma": ("clear boundary with renal parenchyma",),
        "unclear boundary with the renal parenchyma": ("unclear boundary with renal parenchyma",),
    },
    "specific_features": {
        "none": ("no specific features", "no", "n/a", "nothing specific"),
        "areas of decreased density": ("necrosis", "necrotic areas", "low density areas", "hypodense areas", "areas of low density"),
        "areas of increased density": ("hemorrhage", "high density areas", "hyperdense areas", "areas of high density"),
        "spiculated margins": ("spiculation", "spiculated", "spiculae", "burr-like margin"),
        "calcification": ("calcifications", "calcified", "calcific foci", "calcification/stone"),
        "stone": ("calculus", "calculi", "stones", "lithiasis"),
        "septation": ("septations", "septa", "septated", "internal septa"),
        "cavitation": ("cavity", "cavitary", "cavitating"),
        "perilesional edema": ("perihematomal edema", "surrounding edema", "peripheral edema", "oedema"),
        "ductal dilatation": ("duct dilatation", "dilated duct", "dilated pancreatic duct", "bile duct dilatation"),
        "hydronephrosis": ("dilated collecting system", "pelvicalyceal dilatation"),
    },
    "enhancement": {
        "enhanced CT": ("contrast-enhanced CT", "contrast enhanced", "enhanced", "CECT", "contrast CT", "post-contrast"),
        "non-contrast CT": ("non-enhanced CT", "unenhanced CT", "plain CT", "NCCT", "non-contrast", "unenhanced", "plain scan"),
    },
    "density": {
        "hypodense": ("low density", "low density lesion", "hypoattenuating", "hypoattenuating lesion", "low attenuation", "hypodense lesion"),
        "isodense": ("iso-dense", "isoattenuating", "isoattenuating lesion", "isodense lesion", "equal density"),
        "hyperdense": ("high density", "high density lesion", "hyperattenuating", "hyperattenuating lesion", "high attenuation", "hyperdense lesion"),
        "mixed-density": ("mixed density", "mixed attenuation", "mixed"),
        "hypodense fluid-like": ("fluid density", "water density", "fluid-like", "fluid attenuation", "hypodense fluid"),
        "isodense soft-tissue mass": ("soft-tissue density", "soft tissue mass", "soft-tissue mass", "solid", "solid mass"),
        "ground-glass opacity": ("ground glass", "ground-glass", "GGO", "ground glass opacity", "ground-glass nodule"),
        "ring enhancement": ("rim enhancement", "peripheral enhancement", "ring-enhancing", "rim-enhancing"),
    },
    "density_variations": {
        "homogeneous": ("uniform", "homogeneous density", "homogenous", "even"),
        "heterogeneous": ("inhomogeneous", "non-uniform", "heterogeneous density", "heterogenous", "uneven"),
    },
}

# Size categories by the largest diameter in mm: [low, high). Phrases use the category, never numbers,
# so the phrase vocabulary stays finite.
SIZE_CATEGORIES: tuple[tuple[str, float, float], ...] = (
    ("tiny (<1 cm)", 0.0, 10.0),
    ("small (1-2 cm)", 10.0, 20.0),
    ("medium (2-5 cm)", 20.0, 50.0),
    ("large (>5 cm)", 50.0, math.inf),
)
# Diameter used when a report gives only the size category (geometric middle of the category).
SIZE_DEFAULT_MM: dict[str, float] = {
    "tiny (<1 cm)": 6.0,
    "small (1-2 cm)": 15.0,
    "medium (2-5 cm)": 32.0,
    "large (>5 cm)": 70.0,
}

# lesion_location -> placement rule (see placement.py)
LOCATION_CATEGORY: dict[str, str] = {
    "within the parenchymal organ": "within_parenchyma",
    "protruding from the parenchymal organ": "protruding",
    "within the lumen of a hollow organ": "lumen",
    "wall thickening": "wall",
}


def _key(text: str) -> str:
    return re.sub(r"[\s\-_]+", " ", str(text).strip().lower()).strip()


def _build_lookup() -> dict[str, dict[str, str]]:
    lookup: dict[str, dict[str, str]] = {}
    for attribute, values in VOCABULARY.items():
        table: dict[str, str] = {}
        for canonical, synonyms in values.items():
            for alias in (canonical, *synonyms):
                k = _key(alias)
                if k in table and table[k] != canonical:  # pragma: no cover - vocabulary bug
                    raise AssertionError(f"synonym {alias!r} of {attribute} is ambiguous")
                table[k] = canonical
        lookup[attribute] = table
    return lookup


_LOOKUP = _build_lookup()


def allowed_values(attribute: str) -> list[str]:
    """Canonical values of one attribute, in vocabulary order."""
    _check_attribute(attribute)
    return list(VOCABULARY[attribute])


def _check_attribute(attribute: str) -> None:
    if attribute not in VOCABULARY:
        raise ReportError(
            f"Unknown report attribute {attribute!r}. The 11 attributes are: {', '.join(ATTRIBUTES)}."
        )


def normalize_value(attribute: str, value: str) -> str:
    """Map a value or one of its synonyms to the canonical vocabulary string.

    Raises ``ReportError`` naming the attribute, the value and the allowed values when unknown.
    """
    _check_attribute(attribute)
    if not isinstance(value, str):
        raise ReportError(
            f"Attribute {attribute!r} must be a string, got {value!r} ({type(value).__name__}). "
            f"Allowed values: {', '.join(VOCABULARY[attribute])}."
        )
    canonical = _LOOKUP[attribute].get(_key(value))
    if canonical is None and attribute == "organ":
        canonical = declared_organ(value)
    if canonical is None:
        if attribute == "organ":
            extra = sorted(set(_DECLARED_ORGANS.values()))
            raise ReportError(
                f"Unknown value {value!r} for attribute 'organ'. Known organs: {', '.join(VOCABULARY['organ'])}"
                + (f"; declared by catalogs: {', '.join(extra)}" if extra else "")
                + ". Any organ can be added: declare it under `organs:` in a catalog (a display name mapped to "
                "TotalSegmentator v2/v1 class names or to names of your own label map), see docs/catalogs.md."
            )
        raise ReportError(
            f"Unknown value {value!r} for attribute {attribute!r}. Allowed values: "
            f"{', '.join(VOCABULARY[attribute])} (synonyms are accepted; declare the attribute under "
            "`free_text` in the catalog to allow any text)."
        )
    return canonical


# Organs beyond VOCABULARY["organ"], declared by catalogs (``organs:`` keys): match key -> display name.
# The organ vocabulary is open: a catalog may target any organ it can map to labels of an organ map.
_DECLARED_ORGANS: dict[str, str] = {}


def declare_organ(name: str, synonyms: Iterable[str] = ()) -> str:
    """Add a catalog-declared organ (and its synonyms) to the organ vocabulary; returns the display name.

    Raises ``ReportError`` when a synonym already names a different organ.
    """
    display = " ".join(str(name).split())
    for alias in (display, *synonyms):
        k = _key(alias)
        known = _LOOKUP["organ"].get(k) or _DECLARED_ORGANS.get(k)
        if known is not None and known != display:
            raise ReportError(f"organ {display!r}: the name or synonym {alias!r} already means organ {known!r}.")
    for alias in (display, *synonyms):
        _DECLARED_ORGANS[_key(alias)] = display
    return display


def declared_organs() -> dict[str, list[str]]:
    """Catalog-declared organs registered so far: display name -> its other spellings."""
    out: dict[str, list[str]] = {}
    for k, display in _DECLARED_ORGANS.items():
        out.setdefault(display, [])
        if k != _key(display):
            out[display].append(k)
    return out


def declared_organ(value: str) -> str | None:
    """The display name of a catalog-declared organ (or synonym) ``value``; ``None`` when no catalog
    on the catalog path declares it."""
    k = _key(value)
    if k not in _DECLARED_ORGANS:
        # a report may be read before its catalog: declare the organs of every catalog on the path once
        from .catalog import declare_catalog_organs  # lazy: catalog imports this module

        declare_catalog_organs()
    return _DECLARED_ORGANS.get(k)


def size_category(size_mm: Iterable[float]) -> str:
    """Size category of a lesion from its largest extent in mm."""
    largest = max(float(v) for v in size_mm)
    for name, low, high in SIZE_CATEGORIES:
        if low <= largest < high:
            return name
    raise ReportError(f"size_mm {tuple(size_mm)} has no size category; sizes must be positive and finite.")


def size_category_range(category: str) -> tuple[float, float]:
    """The [low, high) diameter range in mm of a size category (canonical or synonym)."""
    category = normalize_value("size", category)
    for name, low, high in SIZE_CATEGORIES:
        if name == category:
            return low, high
    raise AssertionError(category)  # pragma: no cover


def phrase(attribute: str, value: str) -> str:
    """The phrase a text encoder embeds for one attribute value, e.g. ``"shape: round-like"``."""
    return f"{attribute.replace('_', ' ')}: {value}"


def vocabulary_phrases() -> list[str]:
    """Every phrase any report with vocabulary values can produce (finite, stable order)."""
    return [phrase(a, v) for a in ATTRIBUTES for v in VOCABULARY[a]]


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
    import os

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
        from .io import write_yaml

        write_yaml(path, self.to_dict())

    def to_json(self, path: str | Path) -> None:
        from .io import write_json

        write_json(path, self.to_dict())

    @classmethod
    def from_yaml(cls, path: str | Path) -> "LesionReport":
        """Read a report from YAML (or JSON, which is YAML) written by ``to_yaml``/``to_json``."""
        import yaml

        path = Path(path)
        if not path.exists():
            raise ReportError(f"Report file not found: {path}. Create one with `lesiondiffusion report sample TYPE -o {path}`.")
        from .io import read_text_input
        from .safeyaml import load_yaml

        text = read_text_input(path, "report", ReportError)
        try:
            data = json.loads(text) if path.suffix.lower() == ".json" else load_yaml(text, path, ReportError)
        except (yaml.YAMLError, json.JSONDecodeError) as exc:
            raise ReportError(f"{path}: not valid YAML/JSON ({exc}). Fix the syntax at the position shown.") from None
        if isinstance(data, Mapping) and "report" in data and isinstance(data["report"], Mapping):
            data = data["report"]  # accept {report: {...}} as written inside dataset reports
        return cls.from_dict(data, source=str(path))

    from_json = from_yaml
