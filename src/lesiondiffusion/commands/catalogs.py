"""``lesiondiffusion catalogs``: list the lesion types, validate catalog files, print the vocabulary."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import CatalogError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("catalogs", help="list, validate and inspect lesion attribute catalogs")
    sub = p.add_subparsers(dest="catalogs_command", metavar="ACTION")
    sub.required = True
    ls = sub.add_parser("list", help="list the available lesion types with their organs")
    ls.add_argument("--paths", action="store_true", help="also print each catalog's file path")
    ls.set_defaults(func=_list)
    va = sub.add_parser("validate", help="check catalog files; errors name file, line and key")
    va.add_argument("files", nargs="+", type=Path, metavar="FILE")
    va.set_defaults(func=_validate)
    vo = sub.add_parser("vocabulary", help="print the allowed values (and synonyms) of every attribute")
    vo.add_argument("--synonyms", action="store_true", help="also print the synonyms")
    vo.set_defaults(func=_vocabulary)
    sh = sub.add_parser("show", help="print one catalog's allowed values, sizes, HU ranges and rules")
    sh.add_argument("name", help="lesion type or path to a catalog file")
    sh.set_defaults(func=_show)


def _list(args: argparse.Namespace) -> int:
    from ..catalog import catalog_files, load_catalog

    files = catalog_files()
    width = max(len(n) for n in files) if files else 10
    broken = 0
    for name, path in sorted(files.items()):
        # one broken user catalog must not hide the others: it is listed with its error instead
        try:
            c = load_catalog(path)
        except CatalogError as exc:
            broken += 1
            first = str(exc).splitlines()
            detail = " ".join(line.strip() for line in first[1:3]) or first[0]
            print(f"{name:<{width}}  BROKEN  {detail}" + ("  (more: `lesiondiffusion catalogs validate "
                                                         f"{path}`)" if len(first) > 3 else "")
                  + (f"  [{path}]" if args.paths else ""))
            continue
        organs = ", ".join(f"{o} ({'/'.join(c.organ_names(o))})" for o, w in c.organ_weights.items() if w > 0)
        line = f"{name:<{width}}  {c.organ_type:<17}  {organs}"
        if args.paths:
            line += f"  [{c.path}]"
        print(line)
    if broken:
        print(f"{broken} of {len(files)} catalog(s) are broken and cannot be used until fixed "
              "(`lesiondiffusion catalogs validate FILE` lists every problem).")
    return 0


def _validate(args: argparse.Namespace) -> int:
    from ..catalog import validate_catalog_file

    failed = []
    for f in args.files:
        try:
            validate_catalog_file(f)
            print(f"{f}: OK")
        except CatalogError as exc:
            failed.append(str(exc))
    if failed:
        raise CatalogError("\n".join(failed))
    return 0


def _vocabulary(args: argparse.Namespace) -> int:
    from ..report import ATTRIBUTES, VOCABULARY

    from ..catalog import declare_catalog_organs
    from ..report import declared_organs

    declare_catalog_organs()
    for attribute in ATTRIBUTES:
        print(f"{attribute}:")
        for value, synonyms in VOCABULARY[attribute].items():
            extra = f"   (also: {', '.join(synonyms)})" if args.synonyms and synonyms else ""
            print(f"  - {value}{extra}")
        if attribute == "organ":
            for value, synonyms in declared_organs().items():
                extra = f"   (also: {', '.join(synonyms)})" if args.synonyms and synonyms else ""
                print(f"  - {value}   [declared by a catalog]{extra}")
    return 0


def _show(args: argparse.Namespace) -> int:
    from ..catalog import load_catalog
    from ..report import ATTRIBUTES

    c = load_catalog(args.name)
    print(f"{c.name}  ({c.path})\n  label: {c.label_name}; organ type: {c.organ_type}")
    if c.description:
        print(f"  {c.description}")
    for a in ATTRIBUTES:
        dom = c.domain(a)
        total = sum(dom.values()) or 1.0
        print(f"  {a}: " + ", ".join(f"{v} ({w / total:.2f})" for v, w in dom.items()))
    s = c.size
    print(f"  size_mm: {s.distribution} min {s.min:g} max {s.max:g}"
          + (f" median {s.median:g} sigma {s.sigma:g}" if s.distribution == "lognormal" else "")
          + f" aspect {list(s.aspect)}")
    for e, ds in c.hu.items():
        print(f"  HU {e}: " + ", ".join(f"{d} [{lo:g}, {hi:g}]" for d, (lo, hi) in ds.items()))
    for r in c.constraints:
        print(f"  {r.describe()}")
    return 0
