"""``lesiondiffusion place``: put a report's lesion into an organ label map and write its box."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..errors import LesionDiffusionError, ReportError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("place", help="rule-based lesion box from an organ label map and a report")
    p.add_argument("--organs", type=Path, required=True, metavar="SEG", help="TotalSegmentator label map (NIfTI)")
    p.add_argument("--report", type=Path, required=True, metavar="REPORT", help="report YAML/JSON (see `report sample`)")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="BBOX_JSON", help="box in voxel and world coordinates")
    p.add_argument("--mask-out", type=Path, metavar="BOX_NII", help="also write the box as a uint8 NIfTI (input affine kept)")
    p.add_argument("--ellipsoid", action="store_true", help="--mask-out holds the box's inscribed ellipsoid instead of the box")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --mask-out file")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--mapping", default="auto", help="label ids: v1, v2, auto (default) or a JSON file name->id")
    p.add_argument("--catalog", help="catalog name or path (default: the report's lesion_type)")
    p.set_defaults(func=_place)


def _place(args: argparse.Namespace) -> int:
    from ..catalog import load_catalog
    from ..io import refuse_overwrite_input, save_nifti, write_json
    from ..organs import load_organ_map
    from ..geometry import place_canonical
    from ..placement import box_mask
    from ..report import LesionReport

    inputs = {"--organs": args.organs, "--report": args.report}
    if Path(args.mapping).suffix == ".json":
        inputs["--mapping"] = Path(args.mapping)
    if args.catalog is not None and (Path(args.catalog).suffix in (".yaml", ".yml") or Path(args.catalog).exists()):
        inputs["--catalog"] = Path(args.catalog)
    refuse_overwrite_input(args.output, names=inputs)
    if args.mask_out is not None:
        refuse_overwrite_input(args.mask_out, names=inputs)
        refuse_overwrite_input(args.mask_out, names={"-o": args.output})
        if args.mask_out.exists() and not args.overwrite:
            raise LesionDiffusionError(
                f"--mask-out {args.mask_out} already exists; pass --overwrite to replace it or choose another path.")
    report = LesionReport.from_yaml(args.report)
    catalog = load_catalog(args.catalog or report.lesion_type)
    problems = catalog.check_report(report)
    if problems:
        raise ReportError(f"--report {args.report} does not fit catalog {catalog.name} ({catalog.path}):\n  "
                          + "\n  ".join(problems))
    organs = load_organ_map(args.organs, args.mapping)
    t0 = time.perf_counter()
    box = place_canonical(organs, report, catalog, args.seed)
    ms = (time.perf_counter() - t0) * 1000
    out = box.to_dict()
    out["organs_file"] = str(args.organs)
    out["mapping"] = organs.source
    out["seed"] = args.seed
    write_json(args.output, out)
    if args.mask_out is not None:
        save_nifti(args.mask_out, box_mask(organs.shape, box, ellipsoid=args.ellipsoid), organs.affine, organs.header)
    shrunk = "" if box.measures.get("shrink", 1.0) == 1.0 else f", shrunk x{box.measures['shrink']:.2f} to fit"
    print(
        f"{report.lesion_type} ({box.category}) in {', '.join(box.organ_names)}: voxels {list(box.lo)}..{list(box.hi)} "
        f"centre {out['world_mm']['center']} mm{shrunk}; {ms:.1f} ms -> {args.output}"
        + (f", {args.mask_out}" if args.mask_out else "")
    )
    return 0
