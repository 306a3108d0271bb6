"""The catalog model: ``Catalog`` (one lesion type's allowed values, organs, sizes, HU ranges and rules)
with its seeded, constraint-respecting report sampling, and the specs it is made of.

``catalog_parse`` builds these from a YAML file; ``catalog`` finds and loads the files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from .errors import CatalogError, ReportError
from .report import ATTRIBUTES, SIZE_CATEGORIES, LesionReport, _parse_size_mm, normalize_value, phrase, size_category

# attributes whose values come from the `attributes:` section; organ, organ_type and size have their
# own sections (organs, organ_type, size_mm)
SAMPLED_ATTRIBUTES: tuple[str, ...] = tuple(a for a in ATTRIBUTES if a not in ("organ", "organ_type", "size"))
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
