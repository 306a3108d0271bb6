"""Accuracy of the offline free-text report parser (`lesiondiffusion report parse`) on labelled phrasings.

Prints, per phrasing, the attributes it got wrong, then attribute agreement (every attribute the text
states or the parser reads), exact phrasings (all values, size_mm, negations and lesion type right) and
the time per phrasing. Usage: python benchmarks/bench_report_parse.py [PHRASINGS.yaml]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import yaml

from lesiondiffusion.report_text import UNSPECIFIED, parse_text

DEFAULT = Path(__file__).resolve().parents[1] / "tests" / "data" / "report_phrasings.yaml"


def score(case: dict) -> tuple[int, int, list[tuple]]:
    """(attributes right, attributes judged, errors) of one labelled phrasing."""
    parsed = parse_text(case["text"])
    got, want = parsed.specified, case["expect"]
    judged = set(got) | set(want)
    errors = [(a, want.get(a, UNSPECIFIED), got.get(a, UNSPECIFIED)) for a in sorted(judged) if got.get(a) != want.get(a)]
    if parsed.lesion_type != (case.get("type") or UNSPECIFIED):
        errors.append(("lesion_type", case.get("type"), parsed.lesion_type))
    if case.get("size_mm") is not None:
        found = None if parsed.size_mm is None else [round(v, 1) for v in parsed.size_mm]
        if found != [float(v) for v in case["size_mm"]]:
            errors.append(("size_mm", case["size_mm"], found))
    negated = sorted(f.value for f in parsed.negated)
    if negated != sorted(case.get("negated") or []):
        errors.append(("negated", sorted(case.get("negated") or []), negated))
    right = sum(got.get(a) == want.get(a) for a in judged)
    return right, len(judged), errors


def main(path: Path = DEFAULT) -> None:
    cases = yaml.safe_load(path.read_text(encoding="utf-8"))
    right = judged = exact = 0
    start = time.perf_counter()
    for case in cases:
        r, j, errors = score(case)
        right, judged, exact = right + r, judged + j, exact + (not errors)
        if errors:
            print(f"{case['text'][:80]!r}: {errors}")
    per = (time.perf_counter() - start) / len(cases)
    print(f"attribute agreement {right}/{judged} ({100 * right / judged:.1f}%), exact phrasings {exact}/{len(cases)}, "
          f"{1000 * per:.1f} ms per phrasing")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT)
