"""The report vocabulary: the 11 attributes, their values with synonyms, the size categories, the
open organ registry that catalogs fill, and the phrases the text encoders embed.

The bottom of the library (it imports only ``errors``): ``report`` builds ``LesionReport`` on it and
``catalog`` declares the organs its files name into it.
"""

from __future__ import annotations

import math
import re
from typing import Callable, Iterable

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
        # skeletal muscle: the host of soft-tissue lesions, labelled by tissue maps (tissue.py), not by TotalSegmentator organs
        "muscle": ("skeletal muscle", "musculature", "intramuscular"),
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
# Callables that declare every organ they know of (``catalog.declare_catalog_organs``); the catalog module
# registers itself on import, so this bottom module never imports the catalogs that import it.
_ORGAN_SOURCES: list[Callable[[], None]] = []


def add_organ_source(source: Callable[[], None]) -> None:
    """Register a callable that declares organs (with ``declare_organ``) when an unknown one is looked up."""
    if source not in _ORGAN_SOURCES:
        _ORGAN_SOURCES.append(source)


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
        # a report may be read before its catalog: the catalog loader declares the organs of every
        # catalog on the path (it registered itself with ``add_organ_source`` when it was imported)
        for source in _ORGAN_SOURCES:
            source()
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
