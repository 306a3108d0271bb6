"""``lesiondiffusion report``: sample a structured lesion report from a catalog, or check one."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("report", help="sample or check structured lesion reports")
    sub = p.add_subparsers(dest="report_command", metavar="ACTION")
    sub.required = True
    s = sub.add_parser("sample", help="draw a report from a lesion type's catalog")
    s.add_argument("lesion_type", metavar="TYPE", help="catalog name (see `catalogs list`) or path to a catalog YAML")
    s.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    s.add_argument("--set", dest="fixed", action="append", default=[], metavar="KEY=VALUE",
                   help="fix an attribute, e.g. --set density=hyperdense or --set size_mm=20,15,18 (repeatable)")
    s.add_argument("-o", "--output", type=Path, help="write the report here (.yaml or .json); default: print YAML")
    s.set_defaults(func=_sample)
    c = sub.add_parser("check", help="validate a report file against its catalog and print its phrases")
    c.add_argument("file", type=Path, metavar="FILE")
    c.add_argument("--catalog", help="catalog name or path (default: the report's lesion_type)")
    c.set_defaults(func=_check)


def parse_fixed(items: list[str]) -> dict[str, str]:
    from ..errors import CatalogError

    fixed: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key or not value:
            raise CatalogError(
                f"--set {item!r}: expected KEY=VALUE, e.g. --set density=hyperdense or --set \"shape=round-like\"."
            )
        if key in fixed:
            raise CatalogError(f"--set {key} given twice ({fixed[key]!r} and {value!r}); give it once.")
        fixed[key] = value
    return fixed


def _sample(args: argparse.Namespace) -> int:
    import yaml

    from ..catalog import load_catalog

    catalog = load_catalog(args.lesion_type)
    report = catalog.sample(args.seed, parse_fixed(args.fixed))
    if args.output is None:
        sys.stdout.write(yaml.safe_dump(report.to_dict(), sort_keys=False))
    elif args.output.suffix.lower() == ".json":
        report.to_json(args.output)
        print(f"wrote {args.output}")
    else:
        report.to_yaml(args.output)
        print(f"wrote {args.output}")
    return 0


def _check(args: argparse.Namespace) -> int:
    from ..catalog import load_catalog
    from ..errors import ReportError
    from ..report import LesionReport

    report = LesionReport.from_yaml(args.file)
    catalog = load_catalog(args.catalog or report.lesion_type)
    problems = catalog.check_report(report)
    if problems:
        raise ReportError(
            f"{args.file}: report does not fit catalog {catalog.name} ({catalog.path}):\n  " + "\n  ".join(problems)
        )
    print(f"{args.file}: OK ({catalog.name})")
    for line in report.mask_phrases() + [p for p in report.image_phrases() if p not in report.mask_phrases()]:
        print(f"  {line}")
    return 0
