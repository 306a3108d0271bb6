"""`lesiondiffusion dataset import` and `lesiondiffusion tissue-map`: a user's CT + mask folders in, the
dataset layout of every other command out (``lesiondiffusion.dataset_import``, ``lesiondiffusion.tissue``)."""

from __future__ import annotations

import argparse
from pathlib import Path


def _import(args: argparse.Namespace) -> int:
    from ..dataset_import import import_mask_dataset

    res = import_mask_dataset(args.source, args.output, args.lesion_type, image=args.image, mask=args.mask,
                              organs=args.organs, cases=args.cases, catalog_path=args.catalog_path,
                              overwrite=args.overwrite)
    for case, why in res.skipped:
        print(f"skipped {case}: {why}")
    organs = "organ maps copied" if args.organs else "tissue maps built from HU (muscle 1, fat 2, bone 3, air 4)"
    print(f"{res.out_dir}: {len(res.cases)} case(s) imported ({organs}); next: "
          f"lesiondiffusion pretrain prepare {res.out_dir} --derive-reports")
    return 0


def _tissue(args: argparse.Namespace) -> int:
    from ..tissue import TissueRules, write_tissue_map

    rules = TissueRules(air_below=args.air_below, fat_below=args.fat_below, bone_above=args.bone_above)
    info = write_tissue_map(args.ct, args.output, rules, args.mapping_out)
    share = ", ".join(f"{k} {100 * v:.1f} %" for k, v in info["share"].items())
    print(f"{info['map']}: {share}; label names in {info['mapping']} (use it as --mapping)")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("dataset", help="import your own folder of CT + lesion masks",
                              description="Write imagesTr/labelsTr/organsTr/dataset.json from a folder of CT and "
                                          "lesion masks (one folder per case, or matching file names).")
    sub = p.add_subparsers(dest="dataset_command", metavar="ACTION")
    sub.required = True
    im = sub.add_parser("import", help="import a mask-only dataset (organ maps: tissue maps from HU unless --organs)")
    im.add_argument("source", type=Path, help="folder holding the cases (never written to)")
    im.add_argument("-o", "--output", type=Path, required=True, help="dataset folder to write")
    im.add_argument("--lesion-type", required=True, help="catalog name of the lesions, e.g. soft_tissue_sarcoma")
    im.add_argument("--image", default="{case}/ct.nii.gz", help="CT path pattern under SOURCE (default {case}/ct.nii.gz)")
    im.add_argument("--mask", default="{case}/mask.nii.gz", help="lesion mask pattern (default {case}/mask.nii.gz)")
    im.add_argument("--organs", default=None, help="organ map pattern (e.g. TotalSegmentator output); "
                                                   "default: build a tissue map from HU")
    im.add_argument("--cases", nargs="+", default=None, help="import only these case ids")
    im.add_argument("--catalog-path", nargs="+", default=None, metavar="DIR",
                    help="folders with your own catalogs, stored in dataset.json so later commands find them")
    im.add_argument("--overwrite", action="store_true", help="rewrite an existing dataset folder")
    im.set_defaults(func=_import)
    t = subparsers.add_parser("tissue-map", help="muscle / fat / bone / air labels of a CT from HU rules",
                              description="Tissue map for lesions outside TotalSegmentator's organs (rules: "
                                          "lesiondiffusion.tissue). Writes the map and tissue_labels.json beside it.")
    t.add_argument("ct", type=Path, help="CT NIfTI in HU")
    t.add_argument("-o", "--output", type=Path, required=True, help="label map to write (.nii.gz)")
    t.add_argument("--mapping-out", type=Path, default=None, help="JSON label names (default: tissue_labels.json beside -o)")
    t.add_argument("--air-below", type=float, default=-400.0, help="HU below which a voxel is air (default -400)")
    t.add_argument("--fat-below", type=float, default=-30.0, help="HU below which a voxel is fat (default -30)")
    t.add_argument("--bone-above", type=float, default=180.0, help="HU from which a voxel is bone (default 180)")
    t.set_defaults(func=_tissue)
