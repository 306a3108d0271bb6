"""``lesiondiffusion report``: sample a structured lesion report from a catalog, check one, or read one
from free-text radiology wording (``report parse``)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ..errors import CatalogError, LesionDiffusionError, ReportError


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
    c = sub.add_parser("check", help="validate a report file against its catalog and print its phrases",
                       description="FILE is one report (`report sample -o`, a sample's report.yaml) or a file of "
                                   "several (`lesions: - report: ...`, as `report derive` and reportsTr write); "
                                   "every lesion is checked.")
    c.add_argument("file", type=Path, metavar="FILE")
    c.add_argument("--catalog", help="catalog name or path (default: the report's lesion_type)")
    c.set_defaults(func=_check)
    _register_parse(sub)
    _register_derive(sub)


def parse_fixed(items: list[str]) -> dict[str, str]:
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


def load_reports(path: Path) -> list[tuple[str, "LesionReport"]]:  # noqa: F821 - imported lazily
    """The reports of a report file, each with where it sits: one report (a mapping of the attributes, or
    ``{report: {...}}`` as a sample's report.yaml), or several under ``lesions:`` (``- report: {...}``, with
    optional label/component/derived/notes), the file `report derive` and pretraining's reportsTr use."""
    from ..io import read_text_input
    from ..report import LesionReport
    from ..safeyaml import read_yaml

    path = Path(path)
    if not path.exists():
        raise ReportError(f"Report file not found: {path}. Create one with `lesiondiffusion report sample TYPE -o {path}`.")
    if path.suffix.lower() == ".json":
        try:
            doc = json.loads(read_text_input(path, "report", ReportError))
        except json.JSONDecodeError as exc:
            raise ReportError(f"{path}: not valid JSON ({exc}). Fix the syntax at the position shown.") from None
    else:
        doc = read_yaml(path, "report", ReportError)
    if not (isinstance(doc, dict) and "lesions" in doc):
        return [(str(path), LesionReport.from_yaml(path))]
    items = doc["lesions"]
    if not isinstance(items, list) or not items:
        raise ReportError(f"{path}: 'lesions' must be a non-empty list of entries with a 'report' mapping "
                          f"(as `lesiondiffusion report derive` writes), got {items!r}.")
    out = []
    for i, item in enumerate(items):
        where = f"{path}: lesions[{i}]"
        if not isinstance(item, dict) or not isinstance(item.get("report"), dict):
            raise ReportError(f"{where} must be a mapping with a 'report' mapping (label, component optional).")
        if "label" in item:
            where += f" (label {item['label']}" + (f" component {item['component']})" if "component" in item else ")")
        out.append((where, LesionReport.from_dict(item["report"], source=f"{where}.report")))
    return out


def _check(args: argparse.Namespace) -> int:
    from ..catalog import load_catalog

    for where, report in load_reports(args.file):
        catalog = load_catalog(args.catalog or report.lesion_type)
        problems = catalog.check_report(report)
        if problems:
            raise ReportError(
                f"{where}: report does not fit catalog {catalog.name} ({catalog.path}):\n  " + "\n  ".join(problems)
            )
        print(f"{where}: OK ({catalog.name})")
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
                                                "the API key is read from $OPENAI_API_KEY and sent only to this host "
                                                "(redirects are not followed). Never required.")
    p.add_argument("--llm-model", default="gpt-4o-mini", help="model name sent to --llm (default gpt-4o-mini)")
    p.add_argument("--seed", type=int, default=0, help="seed for the attributes drawn from the catalog with -o")
    p.add_argument("-o", "--output", type=Path, help="write the complete report here (.yaml or .json)")
    p.set_defaults(func=_parse)


def _parse(args: argparse.Namespace) -> int:
    import yaml

    from ..catalog import load_catalog
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


def _register_derive(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser("derive", help="derive reports from a CT, its lesion mask and organ map (one per lesion)",
                       description="Measure each connected lesion component and choose every attribute by the "
                                   "thresholds of docs/catalogs.md ('Reports derived from images'); each attribute "
                                   "records the measured value that chose it under `derived`.")
    d.add_argument("--ct", type=Path, required=True, help="CT volume in HU (NIfTI)")
    d.add_argument("--mask", type=Path, required=True, help="lesion label map on the CT grid (NIfTI)")
    d.add_argument("--organs", type=Path, required=True, metavar="SEG", help="organ label map (TotalSegmentator or yours)")
    d.add_argument("--label", type=int, help="only this lesion label (default: every label)")
    d.add_argument("--mapping", default="auto", help="organ label ids: v1, v2, auto (default) or a JSON name->id file")
    d.add_argument("--enhancement", default="non-contrast CT", help="the scan's contrast phase (default non-contrast CT)")
    d.add_argument("--lesion-type", help="catalog name for lesion_type and catalog HU ranges (default: the host organ's "
                                         "first catalog)")
    d.add_argument("-o", "--output", type=Path, help="write a reportsTr-style YAML here (default: print it)")
    d.set_defaults(func=_derive)


def _derive(args: argparse.Namespace) -> int:
    import numpy as np
    import yaml

    from ..derive import derive_reports
    from ..io import load_nifti, refuse_overwrite_input, write_yaml
    from ..organs import load_organ_map

    ct, affine, _ = load_nifti(args.ct, np.float32)
    mask, mask_affine, _ = load_nifti(args.mask)
    organs = load_organ_map(args.organs, args.mapping)
    for name, aff in (("--mask", mask_affine), ("--organs", organs.affine)):
        if not np.allclose(aff, affine, atol=1e-3):
            raise LesionDiffusionError(f"{name} and --ct {args.ct} have different affines; they must share one voxel grid.")
    entries = derive_reports(ct, mask, organs, label=args.label, enhancement=args.enhancement,
                             lesion_type=args.lesion_type)
    # one format: the file is a reportsTr file for pretraining and a --report for `synthesize`/`report check`
    doc = {"lesions": entries}
    if args.output is None:
        sys.stdout.write(yaml.safe_dump(doc, sort_keys=False, allow_unicode=True))
    else:
        for path in (args.ct, args.mask, args.organs):
            refuse_overwrite_input(args.output, path)
        write_yaml(args.output, doc)
        changed = sum(bool(e.get("notes")) for e in entries)
        print(f"derived {len(entries)} report(s) -> {args.output}"
              + (f"; {changed} changed to fit their catalog (see `notes:` and the warnings above)" if changed else ""))
    return 0
