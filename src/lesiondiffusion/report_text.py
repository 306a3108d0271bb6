"""Free-text radiology wording -> structured report (this project's addition: in the paper the user
either picks attribute values or asks an LLM to *generate* a report, §2.3; parsing existing text is not
in it).

``parse_text`` is an offline parser built on the report vocabulary (``report.VOCABULARY`` synonyms), size
patterns in mm/cm and negation cues; every attribute keeps the words it came from, and an attribute the
text does not mention is ``"unspecified"`` (sampled from a catalog by ``ParsedReport.to_report``).
``parse_with_llm`` asks any OpenAI-compatible chat endpoint instead and validates its answer against
the same vocabulary.
"""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from .errors import CatalogError, ReportError
from .report import ATTRIBUTES, VOCABULARY, LesionReport, declared_organs, normalize_value, size_category

UNSPECIFIED = "unspecified"

# Vocabulary synonyms that are fine as a report value but too generic to find inside running text
# ("no" would turn every negation into "specific_features: none", "wall"/"lumen" appear in anatomy).
_TOO_GENERIC = {"no", "n/a", "even", "lumen", "wall", "moderate", "hollow", "protruding", "isolated", "invasive"}

# Words that negate the findings after them in the same clause ("no calcification or haemorrhage",
# "without evidence of invasion", "not hyperdense").
_NEGATION = re.compile(
    r"\b(?:no|not|without|absence of|absent|negative for|free of|neither|nor|lack of)\b", re.IGNORECASE
)
# A clause ends at these; a negation cue never reaches past one.
_CLAUSE_BREAK = re.compile(r"[.;,:()]|\b(?:but|with|and|however|whereas)\b", re.IGNORECASE)

_NUM = r"(\d+(?:[.,]\d+)?)"
_UNIT = r"(?:\s*(mm|millimet(?:er|re)s?|cm|centimet(?:er|re)s?)\b)?"
# "3.2 x 2.8 cm", "32 x 28 x 25 mm", "2.1 cm x 1.8 cm", "15mm", "2 by 3 cm"
_SIZE = re.compile(
    rf"(?<![\w.]){_NUM}{_UNIT}(?:\s*(?:x|×|\*|by)\s*{_NUM}{_UNIT})?(?:\s*(?:x|×|\*|by)\s*{_NUM}{_UNIT})?",
    re.IGNORECASE,
)

# Lesion-type words -> catalog name suffix; the organ picks the prefix (liver_cyst, kidney_stone, ...).
_TYPE_WORDS: tuple[tuple[str, str], ...] = (
    (r"\b(?:haemorrhage|hemorrhage|hematoma|haematoma|bleed(?:ing)?|hematencephalon)\b", "hematencephalon"),
    (r"\b(?:cysts?|cystic)\b", "cyst"),
    (r"\b(?:stones?|calculus|calculi|lithiasis)\b", "stone"),
    (r"\b(?:cancer|carcinoma|malignan\w*|adenocarcinoma)\b", "cancer"),
    (r"\b(?:tumou?r|mass|neoplasm|nodule|lesion)\b", "tumor"),
)


@dataclass
class Finding:
    """One attribute value read from the text, with the words it came from."""

    attribute: str
    value: str
    source: str


@dataclass
class ParsedReport:
    """A structured report read from free text; ``values[a]`` is canonical or ``"unspecified"``."""

    text: str
    values: dict[str, str]
    sources: dict[str, str] = field(default_factory=dict)
    size_mm: tuple[float, float, float] | None = None
    lesion_type: str = UNSPECIFIED
    negated: list[Finding] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    parser: str = "offline"

    @property
    def specified(self) -> dict[str, str]:
        return {a: v for a, v in self.values.items() if v != UNSPECIFIED}

    def to_dict(self) -> dict[str, Any]:
        return {
            "parser": self.parser,
            "text": self.text,
            "lesion_type": self.lesion_type,
            "attributes": {
                a: ({"value": v, "source": self.sources[a]} if a in self.sources else {"value": v})
                for a, v in self.values.items()
            },
            "size_mm": None if self.size_mm is None else [round(v, 2) for v in self.size_mm],
            "negated": [{"attribute": f.attribute, "value": f.value, "source": f.source} for f in self.negated],
            "notes": list(self.notes),
        }

    def to_report(self, catalog: Any, seed: int | np.random.Generator = 0) -> LesionReport:
        """A complete report: the parsed values fixed, every unspecified attribute drawn from ``catalog``.

        A parsed value the catalog does not allow raises ``CatalogError`` naming it (never silently dropped).
        """
        fixed: dict[str, Any] = dict(self.specified)
        if self.size_mm is not None:
            fixed["size_mm"] = list(self.size_mm)
            fixed.pop("size", None)
        return catalog.sample(seed, fixed)


# --------------------------------------------------------------------------------------------------
# offline parser
# --------------------------------------------------------------------------------------------------


def _alias_pattern(alias: str) -> re.Pattern[str]:
    # words may be joined by spaces, hyphens or underscores in either the vocabulary or the text
    words = [re.escape(w) for w in re.split(r"[\s\-_]+", alias.strip()) if w]
    body = r"[\s\-_]+".join(words)
    # plural/adjective endings on the last word ("margins", "calcifications"); a bare +s is enough here
    return re.compile(rf"(?<![\w-]){body}s?(?![\w])", re.IGNORECASE)


def _build_patterns() -> list[tuple[str, str, str, re.Pattern[str]]]:
    out = []
    for attribute, values in VOCABULARY.items():
        for canonical, synonyms in values.items():
            for alias in (canonical, *synonyms):
                if alias.lower() in _TOO_GENERIC or re.fullmatch(r"[<>]?\s*[\d\-]+\s*cm", alias.strip()):
                    continue  # numeric category names are read by the size patterns instead
                out.append((attribute, canonical, alias, _alias_pattern(alias)))
    return out


_PATTERNS = _build_patterns()

# Phrasings outside the vocabulary's synonym lists that radiologists use for the same values.
_EXTRA: tuple[tuple[str, str, str], ...] = (
    ("surface", "ill-defined margin", r"\b(?:ill|poorly)[\s\-]*(?:defined|demarcated|circumscribed)(?:\s+(?:margins?|borders?|edges?))?"),
    ("surface", "well-defined margin", r"\b(?:well|sharply)[\s\-]*(?:defined|demarcated|circumscribed|marginated)(?:\s+(?:margins?|borders?|edges?))?"),
    ("surface", "ill-defined margin", r"\b(?:indistinct|infiltrative|infiltrating|blurred|fuzzy)\s+(?:margins?|borders?|boundar(?:y|ies))"),
    ("surface", "well-defined margin", r"\b(?:sharp|smooth|clear|distinct)\s+(?:margins?|borders?|boundar(?:y|ies))"),
    ("shape", "round-like", r"\bround(?:ed|ish)?\b"),
    ("shape", "oval", r"\b(?:oval|ovoid|elliptical)\b"),
    ("shape", "lobulated", r"\blobulated\s+(?:mass|lesion|tumou?r|nodule)"),
    ("density", "hypodense", r"\b(?:hypo[\s\-]?dense|hypo[\s\-]?attenuating|low[\s\-]attenuation)\b"),
    ("density", "hyperdense", r"\b(?:hyper[\s\-]?dense|hyper[\s\-]?attenuating|high[\s\-]attenuation)\b"),
    ("density", "isodense", r"\b(?:iso[\s\-]?dense|iso[\s\-]?attenuating)\b"),
    ("density_variations", "heterogeneous", r"\b(?:heterogene?ous(?:ly)?|inhomogene?ous(?:ly)?)\b"),
    ("density_variations", "homogeneous", r"\bhomogene?ous(?:ly)?\b"),
    ("enhancement", "enhanced CT", r"\b(?:portal[\s\-]venous|arterial|venous|delayed)\s+phase\b"),
    ("enhancement", "non-contrast CT", r"\b(?:without|no)\s+(?:iv\s+|intravenous\s+)?contrast\b|\bnon[\s\-]?contrast\b"),
    # a lesion's (lack of) enhancement can only be judged on a contrast scan
    ("enhancement", "enhanced CT", r"\b(?:no|without|lack of|absent)\s+(?:\w+\s+)?enhancement\b|\bnon[\s\-]?enhancing\b|\benhancing\b"),
    ("relationship", "invasion of adjacent organs", r"\b(?:invad(?:es|ing)|infiltrat(?:es|ing))\s+(?:the\s+)?(?:adjacent|surrounding|neighbouring|neighboring)\b"),
    # "invasion of the pancreas", "invades the duodenum", "infiltration into the psoas": a named neighbour
    ("relationship", "invasion of adjacent organs", r"\b(?:invasion|infiltration|extension)\s+(?:of|into)\s+(?:the\s+)?(?!margins?\b|borders?\b)[a-z]\w+"),
    ("relationship", "invasion of adjacent organs", r"\b(?:invad(?:es|ing)|infiltrat(?:es|ing))\s+(?:into\s+)?(?:the\s+)?(?!margins?\b|borders?\b|edges?\b)[a-z]\w+"),
    # encasement (> 180 degrees around a vessel or organ) is how staging reads involvement, abutment is contact
    ("relationship", "invasion of adjacent organs", r"\bencas(?:es|ed|ement|ing)\b"),
    ("relationship", "close relationship with adjacent organs", r"\b(?:abuts|abutting|contacts|in contact with)\s+(?:the\s+)?(?:adjacent|surrounding)?\b"),
    ("lesion_location", "protruding from the parenchymal organ", r"\bexophytic(?:ally)?\b"),
    ("specific_features", "perilesional edema", r"\b(?:o?edema|oedema)\b"),
    ("lesion_location", "within the lumen of a hollow organ", r"\bintraluminal\b"),
    ("lesion_location", "wall thickening", r"\b(?:arising|originating)\s+from\s+the\s+(?:\w+\s+)?wall\b"),
    # a cyst is cystic: the noun states the shape value the cyst catalogs use
    ("shape", "cystic", r"\bcysts?\b"),
    ("organ", "right lung", r"\bright\s+(?:upper|middle|lower)\s+lobe\b|\b(?:RUL|RML|RLL)\b"),
    ("organ", "left lung", r"\bleft\s+(?:upper|lower)\s+lobe\b|\b(?:LUL|LLL)\b|\blingula\w*"),
    ("organ", "liver", r"\b(?:segment\s+(?:[ivx]+|\d)\b(?:\s+of\s+the\s+liver)?|hepatic|liver)\b"),
    ("organ", "brain", r"\b(?:brain|cerebral|intracerebral|(?<=intraparenchymal )(?:haem|hem)\w+|basal\s+ganglia|frontal\s+lobe|parietal\s+lobe|temporal\s+lobe|occipital\s+lobe|thalam\w*)\b"),
)
_EXTRA_PATTERNS = [(a, v, re.compile(p, re.IGNORECASE)) for a, v, p in _EXTRA]

# The vocabulary lists "nodule" under shape "nodular" (punctate, dot-like), but in running text the noun
# names the lesion whatever its shape ("2 cm nodule", "adrenal nodule"); "nodular" and "nodule-like" still
# state the shape.
_LESION_NOUNS = re.compile(r"nodules?", re.IGNORECASE)


def _catalog_organ_patterns() -> list[tuple[str, str, str, re.Pattern[str]]]:
    """Patterns of the organs declared by the catalogs on the catalog path (display names and synonyms),
    built per call: the catalog path may change between calls."""
    from .catalog import declare_catalog_organs

    declare_catalog_organs()
    out = []
    for display, others in declared_organs().items():
        for alias in (display, *others):
            out.append(("organ", display, alias, _alias_pattern(alias)))
    return out


def _negated(text: str, start: int) -> bool:
    """Is the finding starting at ``start`` negated by a cue earlier in its clause?"""
    before = text[max(0, start - 60):start]
    breaks = list(_CLAUSE_BREAK.finditer(before))
    clause = before[breaks[-1].end():] if breaks else before
    # the clause break words themselves ("with") end the look-back, so "with no X" still reads "no X"
    return bool(_NEGATION.search(clause))


def _negation_source(text: str, start: int, end: int) -> str:
    """The words of a negated finding, from its negation cue on ("no calcification or septations")."""
    before = text[max(0, start - 60):start]
    breaks = list(_CLAUSE_BREAK.finditer(before))
    offset = max(0, start - 60) + (breaks[-1].end() if breaks else 0)
    cue = _NEGATION.search(text, offset, start)
    return text[cue.start() if cue else start:end].strip()


def _parse_sizes(text: str) -> tuple[tuple[float, float, float] | None, str | None, list[tuple[int, int]]]:
    """The first measurement with a unit: (size_mm x, y, z), its source words, spans to exclude."""
    spans = []
    for m in _SIZE.finditer(text):
        numbers = [m.group(i) for i in (1, 3, 5) if m.group(i)]
        units = [m.group(i) for i in (2, 4, 6) if m.group(i)]
        if not units:
            continue
        unit = units[-1].lower()
        scale = 10.0 if unit.startswith(("cm", "centi")) else 1.0
        values = [float(n.replace(",", ".")) * scale for n in numbers]
        if not all(v > 0 for v in values):
            continue
        spans.append((m.start(), m.end()))
        # a missing third (or second) extent gets the smallest one given: the report's size category
        # follows the largest extent, and the catalog's shapes are not flatter than the smallest stated axis
        while len(values) < 3:
            values.append(min(values))
        return (values[0], values[1], values[2]), text[m.start():m.end()].strip(), spans
    return None, None, spans


def _prefix(organ_word: str) -> str:
    """Catalog-name prefix of an organ's lesion types (stomach -> gastric_cancer)."""
    return {"stomach": "gastric", "esophagus": "esophageal", "pancreas": "pancreatic"}.get(organ_word, organ_word)


def _infer_type(text: str, organ: str) -> tuple[str, str | None]:
    from .catalog import list_catalogs

    names = list_catalogs()
    organ_key = organ.split()[-1] if organ != UNSPECIFIED else ""
    for pattern, kind in _TYPE_WORDS:
        m = re.search(pattern, text, re.IGNORECASE)
        if not m:
            continue
        if kind == "hematencephalon" and organ in ("brain", UNSPECIFIED) and "hematencephalon" in names:
            return "hematencephalon", m.group(0)
        if not organ_key:
            continue
        prefix = _prefix(organ_key)
        candidates = [f"{prefix}_{kind}", f"{prefix}_tumor", f"{prefix}_cancer"]
        if kind == "stone" and organ_key == "gallbladder":
            candidates.insert(0, "gallstone")
        for name in candidates:
            if name in names:
                return name, m.group(0)
    if organ_key:  # "wall thickening of the bladder": no lesion noun, the organ's tumour type
        for name in (f"{_prefix(organ_key)}_tumor", f"{_prefix(organ_key)}_cancer"):
            if name in names:
                return name, None
    if organ != UNSPECIFIED:
        # an organ no catalog name spells (declared by a catalog: "adrenal gland", "muscle"): the catalogs
        # that target it, the one whose name has the lesion word first
        from .catalog import load_catalog

        targets = []
        for name in names:
            try:
                if organ in load_catalog(name).domain("organ"):
                    targets.append(name)
            except CatalogError:
                continue
        if targets:
            found = [(m.group(0), kind) for pattern, kind in _TYPE_WORDS if (m := re.search(pattern, text, re.IGNORECASE))]
            for words, kind in found:
                match = next((t for t in targets if kind in t), None)
                if match:
                    return match, words
            return targets[0], found[0][0] if found else None
    return UNSPECIFIED, None


def parse_text(text: str, lesion_type: str | None = None) -> ParsedReport:
    """Read a structured report from free-text radiology wording, offline.

    Every vocabulary value and synonym is searched in the text (words joined by spaces or hyphens,
    case ignored); overlapping matches go to the longest one ("hyperdense areas" is a specific feature,
    not the density); a match preceded in its clause by a negation cue ("no", "without", "not", "absence
    of") is recorded in ``negated`` and sets nothing, except that negated specific features with no
    positive one mean ``specific_features: none``. The first measurement with a unit gives ``size_mm``.
    """
    if not isinstance(text, str) or not text.strip():
        raise ReportError("report text is empty; pass the radiology wording, e.g. "
                          "lesiondiffusion report parse \"2 cm hypodense lesion in the liver\".")
    size_mm, size_source, size_spans = _parse_sizes(text)
    candidates: list[tuple[int, int, str, str]] = []  # start, end, attribute, canonical
    for attribute, canonical, _alias, pattern in _PATTERNS + _catalog_organ_patterns():
        for m in pattern.finditer(text):
            if attribute == "shape" and _LESION_NOUNS.fullmatch(m.group(0)):
                continue
            candidates.append((m.start(), m.end(), attribute, canonical))
    for attribute, canonical, pattern in _EXTRA_PATTERNS:
        for m in pattern.finditer(text):
            candidates.append((m.start(), m.end(), attribute, canonical))
    # longest first, then leftmost: a longer phrase owns its words
    candidates.sort(key=lambda c: (-(c[1] - c[0]), c[0]))
    taken: list[tuple[int, int]] = list(size_spans)
    accepted: list[tuple[int, int, str, str]] = []
    for start, end, attribute, canonical in candidates:
        # the same words may state two attributes ("wall thickening": shape and location), never overlap
        same = [a for s, e, a, _c in accepted if (s, e) == (start, end)]
        if same and attribute not in same:
            accepted.append((start, end, attribute, canonical))
            continue
        if any(start < e and s < end for s, e in taken):
            continue
        taken.append((start, end))
        accepted.append((start, end, attribute, canonical))
    accepted.sort()
    if lesion_type:
        kind, type_words = lesion_type, None
    else:
        organ = next((c for _s, _e, a, c in accepted if a == "organ" and not _negated(text, _s)), UNSPECIFIED)
        kind, type_words = _infer_type(text, organ)
    if kind == "hematencephalon":
        # "haemorrhage" names the lesion itself here, not an area of increased density inside it
        accepted = [c for c in accepted if not (c[2] == "specific_features" and re.fullmatch(
            _TYPE_WORDS[0][0], text[c[0]:c[1]], re.IGNORECASE))]

    values = {a: UNSPECIFIED for a in ATTRIBUTES}
    sources: dict[str, str] = {}
    negated: list[Finding] = []
    notes: list[str] = []
    for start, end, attribute, canonical in accepted:
        words = text[start:end]
        if _negated(text, start) and not (attribute == "enhancement" and canonical == "enhanced CT"):
            negated.append(Finding(attribute, canonical, _negation_source(text, start, end)))
            continue
        if values[attribute] == UNSPECIFIED:
            values[attribute], sources[attribute] = canonical, words
        elif values[attribute] != canonical:
            notes.append(f"{attribute}: also read {canonical!r} from {words!r}; kept the first, "
                         f"{values[attribute]!r} from {sources[attribute]!r}")
    if values["specific_features"] == UNSPECIFIED:
        absent = [f.source for f in negated if f.attribute == "specific_features"]
        if absent:
            # pertinent negatives ("no calcification") are how reports say a lesion has no special feature
            values["specific_features"] = "none"
            sources["specific_features"] = "; ".join(w for w in dict.fromkeys(absent)
                                                     if not any(w != o and w in o for o in absent))
    if size_mm is not None:
        category = size_category(size_mm)
        if values["size"] not in (UNSPECIFIED, category):
            notes.append(f"size: the words {sources['size']!r} say {values['size']!r} but the measurement "
                         f"{size_source!r} is {category!r}; kept the measurement")
        values["size"], sources["size"] = category, size_source or ""
    if kind == UNSPECIFIED:
        notes.append("lesion type not recognised; pass --type NAME (see `lesiondiffusion catalogs list`)")
    elif type_words:
        notes.append(f"lesion type {kind!r} from the words {type_words!r} and the organ")
    return ParsedReport(text=text, values=values, sources=sources, size_mm=size_mm, lesion_type=kind,
                        negated=negated, notes=notes)


# --------------------------------------------------------------------------------------------------
# optional LLM parser (any OpenAI-compatible chat endpoint)
# --------------------------------------------------------------------------------------------------


def llm_prompt(text: str) -> list[dict[str, str]]:
    """The chat messages sent to the endpoint: the allowed values of every attribute, then the text."""
    lines = [f"- {a}: " + " | ".join(VOCABULARY[a]) for a in ATTRIBUTES]
    system = (
        "You turn radiology text about one lesion into a structured report. Answer with one JSON object "
        "and nothing else, with keys: " + ", ".join(ATTRIBUTES) + ", size_mm, sources. Each attribute "
        "value must be exactly one of the allowed values below, or \"unspecified\" when the text does "
        "not say it. size_mm is a list of up to three extents in millimetres, or null. sources maps each "
        "specified attribute to the exact words of the text it came from.\nAllowed values:\n" + "\n".join(lines)
    )
    return [{"role": "system", "content": system}, {"role": "user", "content": text}]


def _chat_url(url: str) -> str:
    url = url.rstrip("/")
    return url if url.endswith("/chat/completions") else url + "/chat/completions"


# An answer is a few KB of JSON; anything far larger is a wrong or hostile server, not a report.
MAX_LLM_RESPONSE_BYTES = 4 * 2**20


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Follow no redirect: urllib would resend the request, Authorization header included, to whatever host
    the Location names, handing the API key to a server the user never chose."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: D102 - urllib hook
        raise urllib.error.HTTPError(req.full_url, code, f"redirect to {_redact(newurl)} not followed", headers, fp)


def _redact(url: str) -> str:
    """The URL without user:password@ (never echoed into messages or logs)."""
    parts = urllib.parse.urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = host + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def _read_bounded(response: Any, endpoint: str, deadline: float, limit: int) -> bytes:
    chunks, total = [], 0
    while True:
        if time.monotonic() > deadline:
            raise ReportError(f"--llm {endpoint} was still sending after the time limit; stopped reading. Check "
                              "the URL, or drop --llm to use the offline parser.")
        # read1: what has arrived, so a server trickling bytes cannot hold a read past the deadline
        chunk = response.read1(min(65536, limit + 1 - total))
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        total += len(chunk)
        if total > limit:
            raise ReportError(f"--llm {endpoint} sent more than {limit // 2**20} MiB (a chat answer is a few KB); "
                              "stopped reading. Check that the URL is an OpenAI-compatible chat endpoint.")


def parse_with_llm(text: str, url: str, model: str = "gpt-4o-mini", api_key: str | None = None,
                   lesion_type: str | None = None, timeout: float = 60.0,
                   max_bytes: int = MAX_LLM_RESPONSE_BYTES) -> ParsedReport:
    """Ask an OpenAI-compatible chat endpoint (``URL/chat/completions``) and validate the answer.

    Written on urllib (standard library) so the optional path adds no dependency. Only http(s) URLs; no
    redirect is followed (the API key goes to the host the user named and nowhere else); the answer is
    read up to ``max_bytes`` within ``timeout`` seconds in all. Every value must be in the report
    vocabulary (synonyms accepted) or "unspecified"; anything else is a ``ReportError`` that names the
    endpoint, the attribute and the value.
    """
    if not isinstance(text, str) or not text.strip():
        raise ReportError("report text is empty; pass the radiology wording to parse.")
    endpoint = _redact(_chat_url(url))
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme not in ("http", "https") or not urllib.parse.urlsplit(url).hostname:
        raise ReportError(f"--llm {_redact(url)}: only http:// or https:// endpoint URLs are used, e.g. "
                          "http://127.0.0.1:8000/v1 or https://api.openai.com/v1.")
    body = json.dumps({"model": model, "messages": llm_prompt(text), "temperature": 0}).encode()
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(_chat_url(url), data=body, headers=headers, method="POST")
    opener = urllib.request.build_opener(_NoRedirect)
    deadline = time.monotonic() + timeout
    try:
        with opener.open(request, timeout=timeout) as response:
            payload = json.loads(_read_bounded(response, endpoint, deadline, max_bytes).decode("utf-8"))
    except urllib.error.HTTPError as exc:
        if 300 <= exc.code < 400:
            raise ReportError(f"--llm {endpoint} answered HTTP {exc.code} ({exc.reason}). Redirects are never "
                              "followed, so the API key only goes to the host you named; pass the final "
                              "endpoint URL to --llm.") from None
        raise ReportError(f"--llm {endpoint} answered HTTP {exc.code} ({exc.reason}); check the URL, the model "
                          f"name {model!r} and the API key ($OPENAI_API_KEY), or drop --llm to use the offline "
                          "parser.") from None
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        raise ReportError(f"--llm {endpoint} cannot be reached ({exc}); check the URL or drop --llm to use the "
                          "offline parser.") from None
    except ValueError as exc:
        raise ReportError(f"--llm {endpoint} did not return JSON ({exc}); is it an OpenAI-compatible chat "
                          "endpoint?") from None
    try:
        content = payload["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise ReportError(f"--llm {endpoint}: the answer has no choices[0].message.content; is it an "
                          "OpenAI-compatible chat endpoint?") from None
    return llm_answer_to_report(text, content, endpoint, lesion_type)


def llm_answer_to_report(text: str, content: str, endpoint: str = "the LLM",
                         lesion_type: str | None = None) -> ParsedReport:
    """Validate an LLM's JSON answer against the report vocabulary."""
    stripped = re.sub(r"^```(?:json)?\s*|\s*```$", "", str(content).strip())
    try:
        answer = json.loads(stripped)
    except ValueError:
        raise ReportError(f"{endpoint} answered text that is not one JSON object: {content[:200]!r}. "
                          "Use a model that follows the JSON instruction, or drop --llm.") from None
    if not isinstance(answer, Mapping):
        raise ReportError(f"{endpoint} answered {type(answer).__name__}, not a JSON object of attributes.")
    values, sources, notes = {}, {}, []
    raw_sources = answer.get("sources") if isinstance(answer.get("sources"), Mapping) else {}
    for attribute in ATTRIBUTES:
        value = answer.get(attribute, UNSPECIFIED)
        if value is None or (isinstance(value, str) and value.strip().lower() in ("", UNSPECIFIED)):
            values[attribute] = UNSPECIFIED
            continue
        try:
            values[attribute] = normalize_value(attribute, str(value))
        except ReportError as exc:
            raise ReportError(f"{endpoint} gave {attribute}={value!r}, which is outside the report "
                              f"vocabulary: {exc}") from None
        words = raw_sources.get(attribute)
        if isinstance(words, str) and words.strip():
            sources[attribute] = words
            if words.lower() not in text.lower():
                notes.append(f"{attribute}: source words {words!r} do not occur in the text")
    size_mm = None
    raw_size = answer.get("size_mm")
    if raw_size not in (None, [], UNSPECIFIED):
        try:
            extents = [float(v) for v in (raw_size if isinstance(raw_size, list) else [raw_size])]
        except (TypeError, ValueError):
            raise ReportError(f"{endpoint} gave size_mm={raw_size!r}; expected up to three numbers in mm.") from None
        if not 1 <= len(extents) <= 3 or not all(v > 0 for v in extents):
            raise ReportError(f"{endpoint} gave size_mm={raw_size!r}; expected one to three positive numbers in mm.")
        while len(extents) < 3:
            extents.append(min(extents))
        size_mm = (extents[0], extents[1], extents[2])
        values["size"] = size_category(size_mm)
    kind = lesion_type or _infer_type(text, values["organ"])[0]
    return ParsedReport(text=text, values=values, sources=sources, size_mm=size_mm, lesion_type=kind,
                        notes=notes, parser=f"llm:{endpoint}")
