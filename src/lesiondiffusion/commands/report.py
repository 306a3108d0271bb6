"""``lesiondiffusion report``: sample a structured lesion report from a catalog, check one, or read one
from free-text radiology wording (``report parse``)."""

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
    _register_parse(sub)


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

    from ..io import refuse_overwrite_input

    catalog = load_catalog(args.lesion_type)
    if args.output is not None:
        refuse_overwrite_input(args.output, names={"catalog": catalog.path})
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


def _register_parse(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "parse", help="read a structured report from free-text radiology wording (offline, or --llm URL)",
        description="Prints every attribute with the words it came from ('unspecified' where the text is "
                    "silent). With -o, writes a complete report: unspecified attributes are drawn from the "
                    "lesion type's catalog (--seed).")
    p.add_argument("text", nargs="?", help='the wording, e.g. "3.2 x 2.8 cm hypodense lesion in segment VI of the liver"')
    p.add_argument("--file", type=Path, help="read the wording from this text file instead")
    p.add_argument("--type", dest="lesion_type", help="lesion type (catalog name); default: guessed from the text")
    p.add_argument("--llm", metavar="URL", help="OpenAI-compatible endpoint (e.g. http://127.0.0.1:8000/v1); "
                                                "the API key is read from $OPENAI_API_KEY. Never required.")
    p.add_argument("--llm-model", default="gpt-4o-mini", help="model name sent to --llm (default gpt-4o-mini)")
    p.add_argument("--seed", type=int, default=0, help="seed for the attributes drawn from the catalog with -o")
    p.add_argument("-o", "--output", type=Path, help="write the complete report here (.yaml or .json)")
    p.set_defaults(func=_parse)


def _parse(args: argparse.Namespace) -> int:
    import os

    import yaml

    from ..catalog import load_catalog
    from ..errors import ReportError
    from ..report_text import UNSPECIFIED, parse_text, parse_with_llm

    if (args.text is None) == (args.file is None):
        raise ReportError('report parse needs the wording as one argument or --file FILE (not both), e.g. '
                          'lesiondiffusion report parse "2 cm hypodense lesion in the liver".')
    if args.file is not None:
        if not args.file.is_file():
            raise ReportError(f"--file {args.file} does not exist; pass a text file with the radiology wording.")
        text = args.file.read_text(encoding="utf-8")
    else:
        text = args.text
    if args.llm:
        parsed = parse_with_llm(text, args.llm, model=args.llm_model, api_key=os.environ.get("OPENAI_API_KEY"),
                                lesion_type=args.lesion_type)
    else:
        parsed = parse_text(text, lesion_type=args.lesion_type)
    sys.stdout.write(yaml.safe_dump(parsed.to_dict(), sort_keys=False, allow_unicode=True))
    if args.output is not None:
        if parsed.lesion_type == UNSPECIFIED:
            raise ReportError("the lesion type could not be read from the text; pass --type NAME "
                              "(see `lesiondiffusion catalogs list`) to write a complete report.")
        report = parsed.to_report(load_catalog(parsed.lesion_type), seed=args.seed)
        if args.output.suffix.lower() == ".json":
            report.to_json(args.output)
        else:
            report.to_yaml(args.output)
        print(f"wrote {args.output} (unspecified attributes drawn from catalog {parsed.lesion_type}, seed {args.seed})")
    return 0
