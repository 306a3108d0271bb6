"""Parsing and validation of one catalog YAML file into a ``Catalog``, one parser per section.

Every problem is collected with its line and dotted key (``_Problems``) and raised together in one
``CatalogError``; a section that cannot be read is reported and the other sections are still checked.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import yaml

from .catalog_model import SAMPLED_ATTRIBUTES, Catalog, Constraint, PlacementSpec, SizeSpec, _norm_or
from .errors import CatalogError, ReportError
from .io import read_text_input
from .organs import TOTALSEG_V1, TOTALSEG_V2
from .report import ATTRIBUTES, SIZE_CATEGORIES, declare_organ, normalize_value
from .safeyaml import compose_yaml, syntax_error

TOP_KEYS = ("name", "label_name", "description", "organ_type", "organs", "attributes", "size_mm", "hu",
            "constraints", "free_text", "placement")
REQUIRED_TOP_KEYS = ("label_name", "organ_type", "organs", "attributes", "size_mm", "hu")
SIZE_KEYS = ("distribution", "median", "sigma", "min", "max", "aspect")
ORGAN_KEYS = ("weight", "v2", "v1", "names", "synonyms")
PLACEMENT_KEYS = ("inside_fraction", "min_organ_fraction", "max_organ_fraction", "wall_mm", "max_tries", "shrink_factor")


# ---------------------------------------------------------------------------------------------
# the YAML document: line numbers, duplicate keys, the problem list
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


def _compose(path: Path) -> tuple[yaml.Node | None, Any]:
    """The file's composed YAML node (for line numbers) and its data; a syntax error is a ``CatalogError``."""
    text = read_text_input(path, "catalog", CatalogError)
    try:
        return compose_yaml(text, path, CatalogError)
    except yaml.YAMLError as exc:
        raise syntax_error(exc, path, CatalogError) from None


# ---------------------------------------------------------------------------------------------
# the file, then one parser per section
def parse_catalog(path: Path) -> Catalog:
    """Read and validate one catalog file; every problem is raised together in one ``CatalogError``."""
    node, data = _compose(path)
    lines = _line_index(node)
    P = _Problems(path, lines)
    for key, line in _duplicate_keys(node):
        P.add(key, "duplicate key (the later one would silently win); keep one")
    if not isinstance(data, dict):
        P.add((), f"a catalog must be a YAML mapping with keys {', '.join(REQUIRED_TOP_KEYS)}")
        P.raise_if_any()
    _check_top_keys(data, P)
    name, label_name = _parse_names(data, path, P)
    free_text = _parse_free_text(data.get("free_text") or [], P)
    organ_type = _parse_organ_type(data.get("organ_type"), P)
    organs, organ_weights = _parse_organs(data.get("organs"), P)
    attributes = _parse_attributes(data.get("attributes"), free_text, P)
    size = _parse_size(data.get("size_mm"), P)
    hu = _parse_hu(data.get("hu"), free_text, P)
    domains: dict[str, set[str]] = {a: set(v) for a, v in attributes.items()}
    domains["organ"] = set(organ_weights)
    domains["organ_type"] = {organ_type} if organ_type else set()
    domains["size"] = {n for n, _, _ in SIZE_CATEGORIES}
    constraints = _parse_constraints(data.get("constraints") or [], domains, free_text, P)
    placement = _parse_placement(data.get("placement"), P)
    if isinstance(data.get("hu"), dict):
        _check_hu_coverage(attributes, hu, constraints, P)

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


def _check_top_keys(data: dict, P: _Problems) -> None:
    for key in data:
        if key not in TOP_KEYS:
            P.add((key,), f"unknown key; allowed top-level keys: {', '.join(TOP_KEYS)}")
    for key in REQUIRED_TOP_KEYS:
        if key not in data:
            P.add((), f"missing required key {key!r}")


def _parse_names(data: dict, path: Path, P: _Problems) -> tuple[str, Any]:
    """``name`` (default: the file's stem) and ``label_name`` (default: the name)."""
    name = data.get("name", path.stem)
    if not isinstance(name, str) or not name.strip():
        P.add(("name",), f"must be a non-empty string, got {name!r}")
        name = path.stem
    label_name = data.get("label_name", name)
    if not isinstance(label_name, str) or not label_name.strip():
        P.add(("label_name",), f"must be a non-empty string, got {label_name!r}")
    return name, label_name


def _parse_free_text(raw: Any, P: _Problems) -> list[str]:
    free_text: list[str] = []
    if not isinstance(raw, list):
        P.add(("free_text",), "must be a list of attribute names")
        return free_text
    for i, a in enumerate(raw):
        if a not in ATTRIBUTES or a in ("size", "organ", "organ_type", "lesion_location"):
            P.add(("free_text", i), f"unknown or non-free attribute {a!r}; allowed: {', '.join(SAMPLED_ATTRIBUTES)}")
        else:
            free_text.append(a)
    return free_text


def _parse_organ_type(raw: Any, P: _Problems) -> str | None:
    if raw is None:
        return None
    try:
        return normalize_value("organ_type", str(raw))
    except ReportError as exc:
        P.add(("organ_type",), str(exc))
        return None


def _parse_organs(raw: Any, P: _Problems) -> tuple[dict[str, dict[str, list[str]]], dict[str, float]]:
    """``organs:`` -> (organ value -> {v2/v1/names: class names}, organ value -> weight)."""
    organs: dict[str, dict[str, list[str]]] = {}
    organ_weights: dict[str, float] = {}
    if raw is not None and not isinstance(raw, dict):
        P.add(("organs",), "must map organ values (e.g. kidney) to {weight, v2: [...], v1: [...]}")
    for organ_key, spec in (raw or {}).items() if isinstance(raw, dict) else []:
        k = ("organs", organ_key)
        if not isinstance(spec, dict):
            P.add(k, "must be a mapping with weight and class names (v2, v1 and/or names)")
            continue
        organ = _organ_value(organ_key, spec, P)
        if organ is None:
            continue
        for sub in spec:
            if sub not in ORGAN_KEYS:
                P.add(k + (sub,), f"unknown key; allowed: {', '.join(ORGAN_KEYS)}")
        w = _number(spec.get("weight", 1.0))
        if w is None or w < 0:
            P.add(k + ("weight",), f"bad weight {spec.get('weight')!r}; weights are finite numbers >= 0")
            w = 0.0
        organ_weights[organ] = w
        organs[organ] = _organ_class_names(k, spec, P)
        if not any(organs[organ].get(v) for v in ("v2", "v1", "names")):
            P.add(k, "lists no class names; give v2: [...] (TotalSegmentator) or names: [...] (your label map, "
                     "with a --mapping JSON file name -> label id)")
    if isinstance(raw, dict) and organ_weights and not any(w > 0 for w in organ_weights.values()):
        P.add(("organs",), "every organ weight is 0; at least one must be > 0")
    return organs, organ_weights


def _organ_value(organ_key: Any, spec: dict, P: _Problems) -> str | None:
    """The organ value of one ``organs:`` key (the vocabulary's, or a new organ), declared with this
    catalog's synonyms; None when the key is unusable."""
    k = ("organs", organ_key)
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
            return None
    if synonyms or not known:
        # declared now, so rules and sampling below can name it. An organ already known (shipped, or
        # declared by another catalog) still gets this catalog's synonyms: which catalog was read
        # first must not decide whether "adrenal" names the adrenal gland
        try:
            declare_organ(organ, synonyms)
        except ReportError as exc:
            P.add(k, str(exc))
            return None
    return organ


def _organ_class_names(k: tuple, spec: dict, P: _Problems) -> dict[str, list[str]]:
    """One organ's class names: TotalSegmentator v2 and v1 (checked against their tables) and ``names``."""
    out: dict[str, list[str]] = {}
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
        out[version] = list(names)
    return out


def _parse_attributes(raw: Any, free_text: list[str], P: _Problems) -> dict[str, dict[str, float]]:
    """``attributes:`` -> attribute -> {canonical value: weight}, for every sampled attribute."""
    attributes: dict[str, dict[str, float]] = {}
    if raw is not None and not isinstance(raw, dict):
        P.add(("attributes",), "must map attribute names to {value: weight}")
        raw = {}
    for a in (raw or {}):
        if a not in SAMPLED_ATTRIBUTES:
            hint = {"organ": "organs", "organ_type": "organ_type", "size": "size_mm"}.get(a)
            P.add(("attributes", a), "unknown attribute" + (f"; {a} is set by the top-level `{hint}` key" if hint else
                  f"; allowed: {', '.join(SAMPLED_ATTRIBUTES)}"))
    for a in SAMPLED_ATTRIBUTES:
        if raw is None:
            break
        if a not in raw:
            P.add(("attributes",), f"missing attribute {a!r}")
            continue
        dom = _attribute_domain(a, raw[a], free_text, P)
        if dom is not None:
            attributes[a] = dom
    return attributes


def _attribute_domain(a: str, values: Any, free_text: list[str], P: _Problems) -> dict[str, float] | None:
    """One attribute's {canonical value: weight} (a plain list: equal weights); None when unusable."""
    k = ("attributes", a)
    if isinstance(values, list):  # plain list: equal weights
        values = {v: 1.0 for v in values}
    if not isinstance(values, dict) or not values:
        P.add(k, "must map values to weights (or be a list of values)")
        return None
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
    return dom


def _parse_size(raw: Any, P: _Problems) -> SizeSpec | None:
    """``size_mm:`` -> the diameter distribution (None when absent or unusable)."""
    if raw is None:
        return None
    k = ("size_mm",)
    if not isinstance(raw, dict):
        P.add(k, "must be a mapping: distribution, min, max (and median, sigma for lognormal), aspect")
        return None
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


def _parse_hu(raw: Any, free_text: list[str], P: _Problems) -> dict[str, dict[str, tuple[float, float]]]:
    """``hu:`` -> enhancement -> density -> (low, high) HU."""
    hu: dict[str, dict[str, tuple[float, float]]] = {}
    if raw is not None and not isinstance(raw, dict):
        P.add(("hu",), "must map enhancement -> density -> [low, high] HU")
    for e_key, ds in (raw.items() if isinstance(raw, dict) else []):
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
    return hu


def _parse_constraints(raw: Any, domains: dict[str, set[str]], free_text: list[str], P: _Problems) -> list[Constraint]:
    """``constraints:`` -> the rules whose attributes and values are all known to this catalog."""
    if not isinstance(raw, list):
        P.add(("constraints",), "must be a list of {name, if: {...}, then: {...}} rules")
        return []
    constraints: list[Constraint] = []
    for i, rule in enumerate(raw):
        k = ("constraints", i)
        if not isinstance(rule, dict) or "if" not in rule or "then" not in rule:
            P.add(k, "each rule needs `if:` and `then:` mappings (and optionally `name:`)")
            continue
        for sub in rule:
            if sub not in ("name", "if", "then"):
                P.add(k + (sub,), "unknown key; a rule has name, if, then")
        parts = {part: _rule_part(k + (part,), rule[part], domains, free_text, P) for part in ("if", "then")}
        if parts["if"] is not None and parts["then"] is not None:
            constraints.append(
                Constraint(
                    name=str(rule.get("name", f"constraint {i + 1}")),
                    when=parts["if"],
                    then=parts["then"],
                    line=P.lines.get(k, 0),
                )
            )
    return constraints


def _rule_part(k: tuple, spec: Any, domains: dict[str, set[str]], free_text: list[str],
               P: _Problems) -> dict[str, tuple[str, ...]] | None:
    """One rule's ``if:`` or ``then:``: attribute -> allowed canonical values; None when any is wrong."""
    if not isinstance(spec, dict) or not spec:
        P.add(k, "must map attributes to a value or a list of values")
        return None
    out: dict[str, tuple[str, ...]] = {}
    ok = True
    for a, vs in spec.items():
        if a not in ATTRIBUTES:
            P.add(k + (a,), f"unknown attribute {a!r}; attributes: {', '.join(ATTRIBUTES)}")
            ok = False
            continue
        vs_list = vs if isinstance(vs, list) else [vs]
        canon: list[str] = []
        for v in vs_list:
            try:
                c = _norm_or(str(v), a, free_text)
            except ReportError as exc:
                P.add(k + (a,), str(exc))
                ok = False
                continue
            if a in domains and domains[a] and c not in domains[a] and a not in free_text:
                P.add(k + (a,), f"value {c!r} is not an allowed {a} of this catalog ({', '.join(sorted(domains[a]))})")
                ok = False
            canon.append(c)
        out[a] = tuple(canon)
    return out if ok else None


def _parse_placement(raw: Any, P: _Problems) -> PlacementSpec:
    """``placement:`` -> the placement tolerances (defaults for absent keys)."""
    if raw is None:
        return PlacementSpec()
    if not isinstance(raw, dict):
        P.add(("placement",), f"must be a mapping with keys {', '.join(PLACEMENT_KEYS)}")
        return PlacementSpec()
    kw: dict[str, Any] = {}
    for key, v in raw.items():
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
    return placement


def _check_hu_coverage(attributes: dict[str, dict[str, float]], hu: dict[str, dict[str, tuple[float, float]]],
                       constraints: list[Constraint], P: _Problems) -> None:
    """Cross-check: every density/enhancement pair the rules allow needs an HU range."""
    if not (attributes.get("density") and attributes.get("enhancement")):
        return
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
