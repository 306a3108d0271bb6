"""YAML attribute catalogs: one file per lesion type (attribute values with weights, organs, size
distribution, HU ranges, constraints).

Owns loading, validation with line numbers (every problem in one error), and seeded sampling of
reports that respect the constraints and any attributes the user fixed.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import yaml

from .errors import CatalogError, ReportError
from .organs import TOTALSEG_V1, TOTALSEG_V2, add_class_name_source
from .report import (
    ATTRIBUTES,
    add_organ_source,
    declare_organ,
    SIZE_CATEGORIES,
    LesionReport,
    normalize_value,
    phrase,
    size_category,
)

log = logging.getLogger(__name__)

CATALOG_PATH_ENV = "LESIONDIFFUSION_CATALOG_PATH"
# attributes whose values come from the `attributes:` section; organ, organ_type and size have their
# own sections (organs, organ_type, size_mm)
SAMPLED_ATTRIBUTES: tuple[str, ...] = tuple(a for a in ATTRIBUTES if a not in ("organ", "organ_type", "size"))
TOP_KEYS = ("name", "label_name", "description", "organ_type", "organs", "attributes", "size_mm", "hu",
            "constraints", "free_text", "placement")
REQUIRED_TOP_KEYS = ("label_name", "organ_type", "organs", "attributes", "size_mm", "hu")
SIZE_KEYS = ("distribution", "median", "sigma", "min", "max", "aspect")
ORGAN_KEYS = ("weight", "v2", "v1", "names", "synonyms")
PLACEMENT_KEYS = ("inside_fraction", "min_organ_fraction", "max_organ_fraction", "wall_mm", "max_tries", "shrink_factor")
MAX_SAMPLE_TRIES = 200


@dataclass(frozen=True)
class Constraint:
    """``if`` every listed attribute has one of its listed values, ``then`` each listed attribute must
    take one of its listed values."""

    name: str
    when: dict[str, tuple[str, ...]]
    then: dict[str, tuple[str, ...]]
    line: int = 0

    def applies(self, values: Mapping[str, str]) -> bool:
        return all(a in values and values[a] in vs for a, vs in self.when.items())

    def satisfied(self, values: Mapping[str, str]) -> bool:
        if not self.applies(values):
            return True
        return all(a not in values or values[a] in vs for a, vs in self.then.items())

    def describe(self) -> str:
        cond = " and ".join(f"{a} in {list(v)}" for a, v in self.when.items())
        res = " and ".join(f"{a} in {list(v)}" for a, v in self.then.items())
        return f"rule {self.name!r} (line {self.line}: if {cond} then {res})"


@dataclass(frozen=True)
class SizeSpec:
    """Distribution of the largest lesion diameter in mm; the two other axes are that diameter times a
    uniform factor in ``aspect``."""

    distribution: str
    min: float
    max: float
    median: float | None = None
    sigma: float | None = None
    aspect: tuple[float, float] = (0.7, 1.0)

    def cdf(self, x: float) -> float:
        x = min(max(x, self.min), self.max)
        if self.distribution == "uniform":
            return (x - self.min) / (self.max - self.min)
        z = (math.log(x) - math.log(self.median)) / (self.sigma * math.sqrt(2.0))  # type: ignore[arg-type]
        lo = (math.log(self.min) - math.log(self.median)) / (self.sigma * math.sqrt(2.0))  # type: ignore[arg-type]
        hi = (math.log(self.max) - math.log(self.median)) / (self.sigma * math.sqrt(2.0))  # type: ignore[arg-type]
        return (math.erf(z) - math.erf(lo)) / max(math.erf(hi) - math.erf(lo), 1e-12)

    def mass(self, low: float, high: float) -> float:
        return max(0.0, self.cdf(high) - self.cdf(low))

    def draw(self, rng: np.random.Generator, low: float, high: float) -> float:
        """One diameter from the distribution truncated to [max(min, low), min(max, high))."""
        a, b = max(self.min, low), min(self.max, high)
        if a >= b:
            return a
        # inverse-CDF sampling of the truncated distribution: exact and loop-free
        u = rng.uniform(self.cdf(a), self.cdf(b))
        if self.distribution == "uniform":
            d = self.min + u * (self.max - self.min)
        else:
            lo = math.erf((math.log(self.min) - math.log(self.median)) / (self.sigma * math.sqrt(2.0)))  # type: ignore[arg-type]
            hi = math.erf((math.log(self.max) - math.log(self.median)) / (self.sigma * math.sqrt(2.0)))  # type: ignore[arg-type]
            e = min(max(lo + u * (hi - lo), -1 + 1e-15), 1 - 1e-15)
            from scipy.special import erfinv

            d = math.exp(math.log(self.median) + self.sigma * math.sqrt(2.0) * float(erfinv(e)))  # type: ignore[operator]
        return float(min(max(d, a), np.nextafter(b, a)))


@dataclass(frozen=True)
class PlacementSpec:
    """Placement tolerances for this lesion type (see placement.py)."""

    inside_fraction: float = 0.9  # within_parenchyma/lumen: share of the lesion ellipsoid inside the organ
    min_organ_fraction: float = 0.25  # protruding/wall: least share inside the organ (box and mask alike)
    max_organ_fraction: float = 0.9  # protruding: most share inside the organ (else it does not protrude)
    wall_mm: float = 4.0          # wall: thickness of the wall shell in mm
    max_tries: int = 40           # candidate centres tried per size
    shrink_factor: float = 0.8    # size multiplier when no centre fits


@dataclass
class Catalog:
    """One lesion type: allowed attribute values with weights, organs, sizes, HU ranges, constraints."""

    name: str
    path: Path
    label_name: str
    organ_type: str
    description: str = ""
    organs: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    organ_weights: dict[str, float] = field(default_factory=dict)
    attributes: dict[str, dict[str, float]] = field(default_factory=dict)
    size: SizeSpec = field(default_factory=lambda: SizeSpec("uniform", 5.0, 50.0))
    hu: dict[str, dict[str, tuple[float, float]]] = field(default_factory=dict)
    constraints: list[Constraint] = field(default_factory=list)
    free_text: tuple[str, ...] = ()
    placement: PlacementSpec = field(default_factory=PlacementSpec)

    # -- domains -------------------------------------------------------------------------------
    def size_categories(self) -> list[str]:
        """Size categories reachable with this catalog's diameter range."""
        return [n for n, lo, hi in SIZE_CATEGORIES if lo < self.size.max and hi > self.size.min]

    def domain(self, attribute: str) -> dict[str, float]:
        """Allowed values of one attribute with their sampling weights (weight 0: only when fixed)."""
        if attribute == "organ":
            return dict(self.organ_weights)
        if attribute == "organ_type":
            return {self.organ_type: 1.0}
        if attribute == "size":
            ranges = {n: (lo, hi) for n, lo, hi in SIZE_CATEGORIES}
            return {n: self.size.mass(*ranges[n]) for n in self.size_categories()}
        return dict(self.attributes[attribute])

    def organ_names(self, organ: str | None = None) -> list[str]:
        """Class names of one organ value, or of all: TotalSegmentator v2, then v1 spelling, then the names
        of a user label map (deduplicated); an organ map knows the ones its name table holds."""
        if organ is None:
            keys = list(self.organs)
        else:
            try:
                key = normalize_value("organ", organ)
            except ReportError:
                key = organ
            if key not in self.organs:
                raise CatalogError(
                    f"{self.path}: organ {organ!r} is not a target of catalog {self.name}; its organs are "
                    f"{', '.join(self.organs)}. Use one of them or add it under `organs:`."
                )
            keys = [key]
        out: list[str] = []
        for k in keys:
            for version in ("v2", "v1", "names"):
                for n in self.organs[k].get(version, []):
                    if n not in out:
                        out.append(n)
        return out

    def hu_range(self, density: str, enhancement: str) -> tuple[float, float]:
        """Plausible HU interval of a lesion with this density under this enhancement status."""
        d = _norm_or(density, "density", self.free_text)
        e = _norm_or(enhancement, "enhancement", self.free_text)
        try:
            lo, hi = self.hu[e][d]
        except KeyError:
            have = ", ".join(f"{ee}/{dd}" for ee, ds in self.hu.items() for dd in ds)
            raise CatalogError(
                f"{self.path}: no HU range for density {d!r} under {e!r} in catalog {self.name} (it has: {have}). "
                f"Add `hu: {e}: {d}: [low, high]`."
            ) from None
        return float(lo), float(hi)

    def phrases(self) -> list[str]:
        """Every phrase this catalog's reports can emit, in attribute order."""
        return [phrase(a, v) for a in ATTRIBUTES for v in self.domain(a)]

    # -- sampling ------------------------------------------------------------------------------
    def _normalize_fixed(self, fixed: Mapping[str, Any] | None) -> tuple[dict[str, str], tuple[float, ...] | None]:
        values: dict[str, str] = {}
        size_mm = None
        for key, value in (fixed or {}).items():
            if key == "size_mm":
                from .report import _parse_size_mm

                try:
                    size_mm = _parse_size_mm(value, f"fixed size_mm for {self.name}")
                except ReportError as exc:
                    raise CatalogError(str(exc)) from None
                problem = self.size_problem(size_mm)
                if problem:
                    raise CatalogError(f"Cannot fix {problem}")
                continue
            if key not in ATTRIBUTES:
                raise CatalogError(
                    f"Cannot fix {key!r}: not a report attribute. Attributes: {', '.join(ATTRIBUTES)}, size_mm."
                )
            dom = self.domain(key)
            if key in self.free_text and key not in ("size", "organ", "organ_type"):
                values[key] = _norm_or(str(value), key, self.free_text)
                continue
            try:
                v = normalize_value(key, str(value))
            except ReportError as exc:
                raise CatalogError(f"Cannot fix {key}={value!r}: {exc}") from None
            if v not in dom:
                raise CatalogError(
                    f"Cannot fix {key}={value!r} for {self.name}: catalog {self.path} allows "
                    f"{', '.join(dom) or 'nothing'}. Choose one of them or add the value to the catalog."
                )
            values[key] = v
        if size_mm is not None:
            cat = size_category(size_mm)
            if "size" in values and values["size"] != cat:
                raise CatalogError(
                    f"Fixed size={values['size']!r} contradicts fixed size_mm={list(size_mm)} ({cat}). Fix only one of them."
                )
            values["size"] = cat
        return values, size_mm

    def _allowed(self, attribute: str, assigned: Mapping[str, str]) -> tuple[dict[str, float], list[Constraint]]:
        dom = self.domain(attribute)
        used: list[Constraint] = []
        for rule in self.constraints:
            if attribute in rule.then and rule.applies(assigned):
                dom = {v: w for v, w in dom.items() if v in rule.then[attribute]}
                used.append(rule)
            elif attribute in rule.when:
                # contrapositive: a value that would trigger a rule already broken by assigned values is out
                others = {a: vs for a, vs in rule.when.items() if a != attribute}
                if all(a in assigned and assigned[a] in vs for a, vs in others.items()) and any(
                    a in assigned and assigned[a] not in vs for a, vs in rule.then.items()
                ):
                    dom = {v: w for v, w in dom.items() if v not in rule.when[attribute]}
                    used.append(rule)
        return dom, used

    def sample(self, seed: int | np.random.Generator, fixed: Mapping[str, Any] | None = None) -> LesionReport:
        """Draw one report; ``fixed`` attributes (synonyms allowed, plus ``size_mm``) are kept as given.

        Attributes are drawn in report order, each restricted by the rules already decided; a draw that
        still breaks a rule is redrawn (at most ``MAX_SAMPLE_TRIES`` times). An impossible request raises
        ``CatalogError`` naming the rule.
        """
        rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        fixed_values, fixed_size_mm = self._normalize_fixed(fixed)
        fixed_values.setdefault("organ_type", self.organ_type)
        for rule in self.constraints:
            if not rule.satisfied(fixed_values) and all(a in fixed_values for a in rule.then):
                raise CatalogError(
                    f"Impossible combination for {self.name} ({self.path}): fixed values "
                    f"{ {k: v for k, v in fixed_values.items() if k in rule.when or k in rule.then} } break "
                    f"{rule.describe()}. Change one of the fixed values."
                )
        conflict: tuple[str, list[Constraint]] | None = None
        for _ in range(MAX_SAMPLE_TRIES):
            assigned = dict(fixed_values)
            failed = False
            for attribute in ATTRIBUTES:
                if attribute in assigned:
                    continue
                dom, used = self._allowed(attribute, assigned)
                if not dom:
                    conflict = (attribute, used)
                    failed = True
                    break
                assigned[attribute] = _weighted_choice(rng, dom)
            if failed:
                continue
            broken = [r for r in self.constraints if not r.satisfied(assigned)]
            if broken:
                conflict = (next(iter(broken[0].then)), broken)
                continue
            return self._build(rng, assigned, fixed_size_mm)
        attribute, rules = conflict if conflict else ("?", [])
        rules_text = "; ".join(r.describe() for r in rules) or "the catalog's constraints"
        raise CatalogError(
            f"Impossible combination for {self.name} ({self.path}): no value of {attribute!r} satisfies "
            f"{rules_text} with fixed values {fixed or {}}. Change the fixed values or the rule."
        )

    def _build(self, rng: np.random.Generator, values: dict[str, str], size_mm: tuple[float, ...] | None) -> LesionReport:
        if size_mm is None:
            low, high = next((lo, hi) for n, lo, hi in SIZE_CATEGORIES if n == values["size"])
            diameter = self.size.draw(rng, low, high)
            aspect = rng.uniform(self.size.aspect[0], self.size.aspect[1], size=3)
            aspect[int(rng.integers(3))] = 1.0
            size_mm = tuple(float(round(diameter * a, 2)) for a in aspect)
            # rounding must not move the diameter across a category boundary
            if size_category(size_mm) != values["size"]:
                size_mm = tuple(float(diameter * a) for a in aspect)
        report_values = {a: values[a] for a in ATTRIBUTES if a != "size"}
        return LesionReport(
            lesion_type=self.name,
            size=size_category(size_mm),
            size_mm=tuple(size_mm),  # type: ignore[arg-type]
            free_text=self.free_text,
            **report_values,
        )

    def check_report(self, report: LesionReport) -> list[str]:
        """Problems that make ``report`` impossible under this catalog (empty list when valid)."""
        problems = []
        values = {a: getattr(report, a) for a in ATTRIBUTES}
        for a in ATTRIBUTES:
            if a in self.free_text:
                continue
            if values[a] not in self.domain(a):
                problems.append(f"{a}={values[a]!r} is not allowed (allowed: {', '.join(self.domain(a))})")
        for rule in self.constraints:
            if not rule.satisfied(values):
                problems.append(f"breaks {rule.describe()}")
        size = self.size_problem(report.size_mm)
        if size:
            problems.append(size)
        if report.lesion_type != self.name:
            problems.append(f"lesion_type={report.lesion_type!r} is not this catalog's type {self.name!r} "
                            f"(pass --catalog {report.lesion_type} or fix lesion_type)")
        return problems

    def size_problem(self, size_mm: Iterable[float]) -> str | None:
        """Why ``size_mm`` lies outside this catalog's diameter range, or None.

        Sizes enter from reports and ``--set``; bounding them here keeps every later allocation
        (placement, crops, masks) bounded too.
        """
        size_mm = [float(v) for v in size_mm]
        largest = max(size_mm)
        # sampled sizes are rounded to 0.01 mm, so allow that much above max
        if largest > self.size.max + 0.01 or largest < self.size.min - 0.01:
            return (f"size_mm={size_mm}: largest extent {largest:g} mm is outside catalog {self.name}'s range "
                    f"{self.size.min:g}-{self.size.max:g} mm ({self.path}: size_mm.min/max). Give a size in that "
                    "range, or widen the catalog's size_mm range if such lesions are real.")
        return None


def _weighted_choice(rng: np.random.Generator, dom: Mapping[str, float]) -> str:
    values = list(dom)
    w = np.array([max(0.0, float(dom[v])) for v in values], dtype=np.float64)
    if w.sum() <= 0:  # only zero-weight values survive the rules: they are still allowed
        w = np.ones(len(values))
    return values[int(rng.choice(len(values), p=w / w.sum()))]


def _norm_or(value: str, attribute: str, free_text: Iterable[str]) -> str:
    try:
        return normalize_value(attribute, value)
    except ReportError:
        if attribute in free_text:
            return " ".join(str(value).split())
        raise


# ---------------------------------------------------------------------------------------------
# discovery
# folders added by the program (``--catalog-path``, a dataset.json's ``catalog_path``), searched first:
# a user's own catalogs then need no exported environment variable
_EXTRA_DIRS: list[Path] = []


def use_catalog_dirs(paths: Sequence[str | os.PathLike], base: str | os.PathLike | None = None) -> list[Path]:
    """Search ``paths`` (relative ones resolved against ``base``) for catalogs before every other folder,
    for the rest of this process. A folder that does not exist is an error naming it."""
    added = []
    for p in paths:
        d = Path(os.path.expandvars(str(p))).expanduser()
        if base is not None and not d.is_absolute():
            d = Path(base) / d
        if not d.is_dir():
            raise CatalogError(f"Catalog folder {d} does not exist. Fix the --catalog-path option or the dataset.json "
                               "'catalog_path' entry (a folder holding <lesion_type>.yaml files).")
        d = d.resolve()
        if d not in _EXTRA_DIRS:
            _EXTRA_DIRS.insert(len(added), d)
        added.append(d)
    return added


def catalog_dirs() -> list[Path]:
    """Folders searched for catalogs: ``use_catalog_dirs`` folders, ``$LESIONDIFFUSION_CATALOG_PATH``
    entries, then the shipped ones."""
    dirs = list(_EXTRA_DIRS)
    dirs += [Path(p) for p in os.environ.get(CATALOG_PATH_ENV, "").split(os.pathsep) if p]
    dirs.append(Path(str(resources.files("lesiondiffusion.attribute_catalogs"))))
    return dirs


def catalog_files() -> dict[str, Path]:
    """Lesion type name -> catalog file (the first folder of ``catalog_dirs()`` that has it wins)."""
    found: dict[str, Path] = {}
    for d in catalog_dirs():
        if not d.is_dir():
            continue
        for p in sorted(d.glob("*.yaml")) + sorted(d.glob("*.yml")):
            if p.name.startswith("_"):  # templates and drafts
                continue
            found.setdefault(p.stem, p)
    return found


def list_catalogs() -> list[str]:
    """Names of the available catalogs (shipped plus ``$LESIONDIFFUSION_CATALOG_PATH``), sorted."""
    return sorted(catalog_files())


def declare_catalog_organs() -> None:
    """Declare the organs of every loadable catalog on the catalog path (broken files are skipped: their
    errors belong to ``catalogs list``/``validate``)."""
    global _DECLARING
    if _DECLARING:
        return
    _DECLARING = True
    try:
        for path in catalog_files().values():
            try:
                load_catalog(path)
            except CatalogError:
                continue
    finally:
        _DECLARING = False


_DECLARING = False
# a report naming a catalog-declared organ may be read before its catalog: the vocabulary asks this
add_organ_source(declare_catalog_organs)


def catalog_class_names() -> set[str]:
    """Every class name the loadable catalogs on the catalog path list (v2, v1 or `names:`)."""
    names: set[str] = set()
    for path in catalog_files().values():
        try:
            names.update(load_catalog(path).organ_names())
        except CatalogError:
            continue  # a broken catalog's errors belong to `catalogs validate`
    return names


# organ maps naming classes only a catalog lists are not warned about: organs asks this
add_class_name_source(catalog_class_names)


def load_catalog(name_or_path: str | Path) -> Catalog:
    """Load a catalog by name (``kidney_tumor``) or by path to a YAML file; validated, cached per file."""
    p = Path(name_or_path)
    # a bare name is always looked up on the catalog path (a file of that name in the working folder
    # never takes its place); only something spelled as a path is opened as one
    text = str(name_or_path)
    if isinstance(name_or_path, Path) or p.suffix in (".yaml", ".yml") or os.sep in text or "/" in text \
            or (os.altsep and os.altsep in text):
        if not p.exists():
            raise CatalogError(f"Catalog file not found: {p}. Check the path, or run `lesiondiffusion catalogs list`.")
        path = p.resolve()
    else:
        files = catalog_files()
        if str(name_or_path) not in files:
            raise CatalogError(
                f"Unknown lesion type {str(name_or_path)!r}. Available catalogs: {', '.join(sorted(files))}. "
                f"Add a YAML file to a folder in ${CATALOG_PATH_ENV} to define a new type (see attribute_catalogs/_template.yaml)."
            )
        path = files[str(name_or_path)].resolve()
    stat = path.stat()
    return _load_cached(str(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=128)
def _load_cached(path: str, mtime_ns: int, size: int) -> Catalog:
    return _parse_catalog(Path(path))


def validate_catalog_file(path: str | Path) -> None:
    """Raise ``CatalogError`` listing every problem of a catalog file with its line and key."""
    path = Path(path)
    if not path.exists():
        raise CatalogError(f"Catalog file not found: {path}.")
    _parse_catalog(path)


# ---------------------------------------------------------------------------------------------
# parsing + validation
def _line_index(node: yaml.Node | None, prefix: tuple = (), out: dict | None = None,
                seen: set | None = None) -> dict[tuple, int]:
    """Map each key path of a composed YAML document to its 1-based line. An aliased node is entered once
    (where it is defined): walking every alias would expand a 'billion laughs' file."""
    out = {} if out is None else out
    seen = set() if seen is None else seen
    if node is None:
        return out
    out.setdefault(prefix, node.start_mark.line + 1)
    if id(node) in seen:
        return out
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            key = k.value
            out[prefix + (key,)] = k.start_mark.line + 1
            _line_index(v, prefix + (key,), out, seen)
            out[prefix + (key,)] = k.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            out[prefix + (i,)] = v.start_mark.line + 1
            _line_index(v, prefix + (i,), out, seen)
    return out


def _duplicate_keys(node: yaml.Node | None, prefix: tuple = (), seen: set | None = None) -> list[tuple[tuple, int]]:
    dups: list[tuple[tuple, int]] = []
    seen = set() if seen is None else seen
    if node is None or id(node) in seen:  # aliases: each node checked once, where it is defined
        return dups
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        keys: set = set()
        for k, v in node.value:
            if k.value in keys:
                dups.append((prefix + (k.value,), k.start_mark.line + 1))
            keys.add(k.value)
            dups.extend(_duplicate_keys(v, prefix + (k.value,), seen))
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            dups.extend(_duplicate_keys(v, prefix + (i,), seen))
    return dups


class _Problems:
    def __init__(self, path: Path, lines: dict[tuple, int]):
        self.path, self.lines, self.items = path, lines, []

    def add(self, key: tuple, message: str) -> None:
        probe = key
        while probe and probe not in self.lines:
            probe = probe[:-1]
        line = self.lines.get(probe, 1)
        dotted = ".".join(str(k) for k in key) or "<document>"
        self.items.append((line, f"{self.path}:{line}: {dotted}: {message}"))

    def raise_if_any(self) -> None:
        if self.items:
            self.items.sort(key=lambda t: t[0])
            n = len(self.items)
            raise CatalogError(
                f"Catalog {self.path} has {n} problem{'s' if n > 1 else ''}:\n  "
                + "\n  ".join(m for _, m in self.items)
            )


def _number(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x) if math.isfinite(float(x)) else None


def _parse_catalog(path: Path) -> Catalog:
    from .io import read_text_input

    from .safeyaml import compose_yaml

    text = read_text_input(path, "catalog", CatalogError)
    try:
        node, data = compose_yaml(text, path, CatalogError)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        raise CatalogError(f"{where}: YAML syntax error: {problem}. Fix the YAML at that line.") from None
    lines = _line_index(node)
    P = _Problems(path, lines)
    for key, line in _duplicate_keys(node):
        P.add(key, "duplicate key (the later one would silently win); keep one")
    if not isinstance(data, dict):
        P.add((), f"a catalog must be a YAML mapping with keys {', '.join(REQUIRED_TOP_KEYS)}")
        P.raise_if_any()
    for key in data:
        if key not in TOP_KEYS:
            P.add((key,), f"unknown key; allowed top-level keys: {', '.join(TOP_KEYS)}")
    for key in REQUIRED_TOP_KEYS:
        if key not in data:
            P.add((), f"missing required key {key!r}")

    name = data.get("name", path.stem)
    if not isinstance(name, str) or not name.strip():
        P.add(("name",), f"must be a non-empty string, got {name!r}")
        name = path.stem
    label_name = data.get("label_name", name)
    if not isinstance(label_name, str) or not label_name.strip():
        P.add(("label_name",), f"must be a non-empty string, got {label_name!r}")

    free_text_raw = data.get("free_text") or []
    free_text: list[str] = []
    if not isinstance(free_text_raw, list):
        P.add(("free_text",), "must be a list of attribute names")
    else:
        for i, a in enumerate(free_text_raw):
            if a not in ATTRIBUTES or a in ("size", "organ", "organ_type", "lesion_location"):
                P.add(("free_text", i), f"unknown or non-free attribute {a!r}; allowed: {', '.join(SAMPLED_ATTRIBUTES)}")
            else:
                free_text.append(a)

    organ_type = data.get("organ_type")
    if organ_type is not None:
        try:
            organ_type = normalize_value("organ_type", str(organ_type))
        except ReportError as exc:
            P.add(("organ_type",), str(exc))
            organ_type = None

    # organs
    organs: dict[str, dict[str, list[str]]] = {}
    organ_weights: dict[str, float] = {}
    raw_organs = data.get("organs")
    if raw_organs is not None and not isinstance(raw_organs, dict):
        P.add(("organs",), "must map organ values (e.g. kidney) to {weight, v2: [...], v1: [...]}")
    for organ_key, spec in (raw_organs or {}).items() if isinstance(raw_organs, dict) else []:
        k = ("organs", organ_key)
        if not isinstance(spec, dict):
            P.add(k, "must be a mapping with weight and class names (v2, v1 and/or names)")
            continue
        synonyms = spec.get("synonyms", [])
        if not isinstance(synonyms, list) or not all(isinstance(x, str) and x.strip() for x in synonyms):
            P.add(k + ("synonyms",), "must be a list of alternative names of this organ")
            synonyms = []
        try:
            organ, known = normalize_value("organ", str(organ_key)), True
        except ReportError:
            # an organ outside the shipped vocabulary: the key is its display name in reports and prompts
            organ, known = " ".join(str(organ_key).split()), False
            if not organ or not isinstance(organ_key, str):
                P.add(k, f"organ names are non-empty text, got {organ_key!r}")
                continue
        if synonyms or not known:
            # declared now, so rules and sampling below can name it. An organ already known (shipped, or
            # declared by another catalog) still gets this catalog's synonyms: which catalog was read
            # first must not decide whether "adrenal" names the adrenal gland
            try:
                declare_organ(organ, synonyms)
            except ReportError as exc:
                P.add(k, str(exc))
                continue
        for sub in spec:
            if sub not in ORGAN_KEYS:
                P.add(k + (sub,), f"unknown key; allowed: {', '.join(ORGAN_KEYS)}")
        w = _number(spec.get("weight", 1.0))
        if w is None or w < 0:
            P.add(k + ("weight",), f"bad weight {spec.get('weight')!r}; weights are finite numbers >= 0")
            w = 0.0
        organ_weights[organ] = w
        organs[organ] = {}
        for version, table in (("v2", TOTALSEG_V2), ("v1", TOTALSEG_V1), ("names", None)):
            names = spec.get(version, [])
            if not isinstance(names, list) or not all(isinstance(n, str) and n.strip() for n in names):
                what = "TotalSegmentator class names" if table else "class names of your label map's mapping file"
                P.add(k + (version,), f"must be a list of {what}")
                continue
            for i, n in enumerate(names if table is not None else []):
                if n not in table:
                    close = sorted(x for x in table if n.split("_")[0] in x)[:6]
                    P.add(k + (version, i), f"unknown TotalSegmentator {version} class name {n!r}"
                          + (f"; similar: {', '.join(close)}" if close else "")
                          + "; for your own label map list its class names under `names:`")
            organs[organ][version] = list(names)
        if not any(organs[organ].get(v) for v in ("v2", "v1", "names")):
            P.add(k, "lists no class names; give v2: [...] (TotalSegmentator) or names: [...] (your label map, "
                     "with a --mapping JSON file name -> label id)")
    if isinstance(raw_organs, dict) and organ_weights and not any(w > 0 for w in organ_weights.values()):
        P.add(("organs",), "every organ weight is 0; at least one must be > 0")

    # attributes
    attributes: dict[str, dict[str, float]] = {}
    raw_attrs = data.get("attributes")
    if raw_attrs is not None and not isinstance(raw_attrs, dict):
        P.add(("attributes",), "must map attribute names to {value: weight}")
        raw_attrs = {}
    for a in (raw_attrs or {}):
        if a not in SAMPLED_ATTRIBUTES:
            hint = {"organ": "organs", "organ_type": "organ_type", "size": "size_mm"}.get(a)
            P.add(("attributes", a), "unknown attribute" + (f"; {a} is set by the top-level `{hint}` key" if hint else
                  f"; allowed: {', '.join(SAMPLED_ATTRIBUTES)}"))
    for a in SAMPLED_ATTRIBUTES:
        if raw_attrs is None:
            break
        if a not in raw_attrs:
            P.add(("attributes",), f"missing attribute {a!r}")
            continue
        values = raw_attrs[a]
        k = ("attributes", a)
        if isinstance(values, list):  # plain list: equal weights
            values = {v: 1.0 for v in values}
        if not isinstance(values, dict) or not values:
            P.add(k, "must map values to weights (or be a list of values)")
            continue
        dom: dict[str, float] = {}
        for v, w in values.items():
            try:
                canon = normalize_value(a, str(v))
            except ReportError as exc:
                if a in free_text:
                    canon = " ".join(str(v).split())
                else:
                    P.add(k + (v,), f"unknown value {v!r}. {exc}")
                    continue
            wn = _number(w)
            if wn is None or wn < 0:
                P.add(k + (v,), f"bad weight {w!r}; weights are finite numbers >= 0")
                continue
            if canon in dom:
                P.add(k + (v,), f"value {canon!r} listed twice (synonyms count as the same value)")
            dom[canon] = wn
        if dom and not any(w > 0 for w in dom.values()):
            P.add(k, "every weight is 0; at least one must be > 0")
        attributes[a] = dom

    # size
    size = None
    raw_size = data.get("size_mm")
    if raw_size is not None:
        if not isinstance(raw_size, dict):
            P.add(("size_mm",), "must be a mapping: distribution, min, max (and median, sigma for lognormal), aspect")
        else:
            size = _parse_size(raw_size, P)

    # hu
    hu: dict[str, dict[str, tuple[float, float]]] = {}
    raw_hu = data.get("hu")
    if raw_hu is not None and not isinstance(raw_hu, dict):
        P.add(("hu",), "must map enhancement -> density -> [low, high] HU")
    for e_key, ds in (raw_hu.items() if isinstance(raw_hu, dict) else []):
        try:
            e = normalize_value("enhancement", str(e_key))
        except ReportError as exc:
            P.add(("hu", e_key), str(exc))
            continue
        if not isinstance(ds, dict):
            P.add(("hu", e_key), "must map density values to [low, high] HU")
            continue
        hu[e] = {}
        for d_key, rng in ds.items():
            k = ("hu", e_key, d_key)
            try:
                d = _norm_or(str(d_key), "density", free_text)
            except ReportError as exc:
                P.add(k, str(exc))
                continue
            if not (isinstance(rng, list) and len(rng) == 2 and all(_number(x) is not None for x in rng)):
                P.add(k, f"must be [low, high] in HU, got {rng!r}")
                continue
            lo, hi = float(rng[0]), float(rng[1])
            if lo > hi:
                P.add(k, f"inverted HU range [{lo:g}, {hi:g}]; write [low, high]")
            if lo < -1024 or hi > 3071:
                P.add(k, f"HU range [{lo:g}, {hi:g}] leaves the CT scale [-1024, 3071]")
            hu[e][d] = (lo, hi)

    # constraints
    constraints: list[Constraint] = []
    domains: dict[str, set[str]] = {a: set(v) for a, v in attributes.items()}
    domains["organ"] = set(organ_weights)
    domains["organ_type"] = {organ_type} if organ_type else set()
    domains["size"] = {n for n, _, _ in SIZE_CATEGORIES}
    raw_cons = data.get("constraints") or []
    if not isinstance(raw_cons, list):
        P.add(("constraints",), "must be a list of {name, if: {...}, then: {...}} rules")
        raw_cons = []
    for i, rule in enumerate(raw_cons):
        k = ("constraints", i)
        if not isinstance(rule, dict) or "if" not in rule or "then" not in rule:
            P.add(k, "each rule needs `if:` and `then:` mappings (and optionally `name:`)")
            continue
        for sub in rule:
            if sub not in ("name", "if", "then"):
                P.add(k + (sub,), "unknown key; a rule has name, if, then")
        parts: dict[str, dict[str, tuple[str, ...]]] = {}
        ok = True
        for part in ("if", "then"):
            spec = rule[part]
            if not isinstance(spec, dict) or not spec:
                P.add(k + (part,), "must map attributes to a value or a list of values")
                ok = False
                continue
            parts[part] = {}
            for a, vs in spec.items():
                if a not in ATTRIBUTES:
                    P.add(k + (part, a), f"unknown attribute {a!r}; attributes: {', '.join(ATTRIBUTES)}")
                    ok = False
                    continue
                vs_list = vs if isinstance(vs, list) else [vs]
                canon: list[str] = []
                for j, v in enumerate(vs_list):
                    try:
                        c = _norm_or(str(v), a, free_text)
                    except ReportError as exc:
                        P.add(k + (part, a), str(exc))
                        ok = False
                        continue
                    if a in domains and domains[a] and c not in domains[a] and a not in free_text:
                        P.add(k + (part, a), f"value {c!r} is not an allowed {a} of this catalog ({', '.join(sorted(domains[a]))})")
                        ok = False
                    canon.append(c)
                parts[part][a] = tuple(canon)
        if ok:
            constraints.append(
                Constraint(
                    name=str(rule.get("name", f"constraint {i + 1}")),
                    when=parts["if"],
                    then=parts["then"],
                    line=lines.get(k, 0),
                )
            )

    # placement
    placement = PlacementSpec()
    raw_pl = data.get("placement")
    if raw_pl is not None:
        if not isinstance(raw_pl, dict):
            P.add(("placement",), f"must be a mapping with keys {', '.join(PLACEMENT_KEYS)}")
        else:
            kw: dict[str, Any] = {}
            for key, v in raw_pl.items():
                x = _number(v)
                if key not in PLACEMENT_KEYS:
                    P.add(("placement", key), f"unknown key; allowed: {', '.join(PLACEMENT_KEYS)}")
                elif x is None:
                    P.add(("placement", key), f"must be a number, got {v!r}")
                elif key in ("inside_fraction", "shrink_factor", "min_organ_fraction", "max_organ_fraction") \
                        and not 0 < x < 1.0 + (key != "shrink_factor"):
                    P.add(("placement", key), f"must be in (0, 1], got {v!r}")
                elif key in ("wall_mm",) and x <= 0:
                    P.add(("placement", key), f"must be > 0 mm, got {v!r}")
                elif key == "max_tries" and (x < 1 or x != int(x)):
                    P.add(("placement", key), f"must be a whole number >= 1, got {v!r}")
                else:
                    kw[key] = int(x) if key == "max_tries" else x
            placement = PlacementSpec(**kw)
            if placement.min_organ_fraction > placement.max_organ_fraction:
                P.add(("placement", "min_organ_fraction"),
                      f"{placement.min_organ_fraction:g} exceeds max_organ_fraction {placement.max_organ_fraction:g}; "
                      "a protruding lesion could never be accepted")

    # cross-checks: every reachable density/enhancement pair needs an HU range
    if attributes.get("density") and attributes.get("enhancement") and isinstance(raw_hu, dict):
        for e in attributes["enhancement"]:
            for d in attributes["density"]:
                combo = {"density": d, "enhancement": e}
                excluded = any(
                    set(r.when) <= set(combo) and r.applies(combo)
                    and any(a in combo and combo[a] not in vs for a, vs in r.then.items())
                    for r in constraints
                )
                if not excluded and d not in hu.get(e, {}):
                    P.add(("hu",), f"missing HU range for density {d!r} under {e!r}; add `{e}: {{{d}: [low, high]}}`")

    P.raise_if_any()
    assert organ_type is not None and size is not None
    catalog = Catalog(
        name=name,
        path=path,
        label_name=str(label_name),
        organ_type=organ_type,
        description=str(data.get("description", "")).strip(),
        organs=organs,
        organ_weights=organ_weights,
        attributes=attributes,
        size=size,
        hu=hu,
        constraints=constraints,
        free_text=tuple(free_text),
        placement=placement,
    )
    # a catalog whose rules leave nothing to sample is broken, not just unlucky: find out now
    try:
        catalog.sample(0)
    except CatalogError as exc:
        raise CatalogError(f"Catalog {path}: the constraints allow no report at all: {exc}") from None
    return catalog


def _parse_size(raw: dict, P: _Problems) -> SizeSpec | None:
    k = ("size_mm",)
    for key in raw:
        if key not in SIZE_KEYS:
            P.add(k + (key,), f"unknown key; allowed: {', '.join(SIZE_KEYS)}")
    dist = raw.get("distribution", "lognormal")
    if dist not in ("lognormal", "uniform"):
        P.add(k + ("distribution",), f"unknown distribution {dist!r}; use lognormal or uniform")
        return None
    ok = True
    vals: dict[str, float] = {}
    needed = ["min", "max"] + (["median", "sigma"] if dist == "lognormal" else [])
    for key in needed:
        if key not in raw:
            P.add(k, f"missing {key!r} (mm)" if key != "sigma" else "missing 'sigma' (log-scale spread, e.g. 0.4)")
            ok = False
            continue
        x = _number(raw[key])
        if x is None or x <= 0:
            P.add(k + (key,), f"must be a positive number, got {raw[key]!r} (sizes in mm are > 0)")
            ok = False
            continue
        vals[key] = x
    if ok and vals["min"] > vals["max"]:
        P.add(k + ("min",), f"inverted size range: min {vals['min']:g} > max {vals['max']:g}; write min <= max")
        ok = False
    if ok and vals["min"] == vals["max"]:
        P.add(k + ("max",), f"empty size range min == max == {vals['min']:g}; make max larger than min")
        ok = False
    if ok and dist == "lognormal" and not vals["min"] <= vals["median"] <= vals["max"]:
        P.add(k + ("median",), f"median {vals['median']:g} lies outside [min, max] = [{vals['min']:g}, {vals['max']:g}]")
        ok = False
    aspect = raw.get("aspect", [0.7, 1.0])
    if not (isinstance(aspect, list) and len(aspect) == 2 and all(_number(x) is not None for x in aspect)
            and 0 < float(aspect[0]) <= float(aspect[1]) <= 1.0):
        P.add(k + ("aspect",), f"must be [low, high] with 0 < low <= high <= 1, got {aspect!r}")
        ok = False
    if not ok:
        return None
    return SizeSpec(
        distribution=dist, min=vals["min"], max=vals["max"], median=vals.get("median"), sigma=vals.get("sigma"),
        aspect=(float(aspect[0]), float(aspect[1])),
    )
