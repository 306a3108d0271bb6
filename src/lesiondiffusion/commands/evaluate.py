"""``lesiondiffusion evaluate {alignment,segmentation}``: the method's two evaluations."""

from __future__ import annotations

import argparse
from pathlib import Path

from lesiondiffusion.errors import LesionDiffusionError
from lesiondiffusion.generator import LESION_BACKENDS


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="prompt alignment of generated lesions; nnU-Net Dice per training setting and generator")
    ev = p.add_subparsers(dest="evaluate_command", metavar="WHAT")
    ev.required = True

    a = ev.add_parser(
        "alignment",
        help="shape and density of generated lesions per prompt value",
        description=(
            "Generates N lesions per value of the shape and density attributes (every other attribute "
            "sampled from the catalog) and reports sphericity and convexity (volume / convex hull) per "
            "shape prompt and lesion vs surrounding-organ HU per density prompt: CSV, table and scatter PNG."
        ),
    )
    a.add_argument("--bundle", type=Path, help="model bundle folder (required unless --backend rule_based)")
    a.add_argument("--ct", type=Path, required=True, help="CT volume in HU (NIfTI)")
    a.add_argument("--organs", type=Path, required=True, help="TotalSegmentator organ labels on the CT grid")
    a.add_argument("--organ-mapping", default="auto", help="v1 | v2 | auto | name->id JSON file (default auto)")
    a.add_argument("--catalog", required=True, help="lesion type (catalog name or YAML path)")
    a.add_argument("-n", type=int, default=8, help="lesions per prompt value (default 8)")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--groups", default="shape,density",
                   help="prompt groups to evaluate: shape, density or both (default shape,density)")
    a.add_argument("--ddim-steps", type=int, help="DDIM steps (default: the bundle's schedule)")
    a.add_argument("--device", default="cpu")
    a.add_argument("--backend", choices=LESION_BACKENDS, default="lesiondiffusion",
                   help="generator to evaluate (rule_based: the weight-free baseline)")
    a.add_argument("-o", "--out", type=Path, default=Path("alignment"), help="output folder (default ./alignment)")
    a.add_argument("--no-progress", action="store_true")
    a.set_defaults(func=run_alignment)

    s = ev.add_parser(
        "segmentation",
        help="nnU-Net Dice per lesion type: real only / synthetic only / synthetic then real, per generator",
        description=(
            "The method's protocol with the real nnU-Net commands (plan and preprocess if needed, train, predict): "
            "real only; synthetic only and synthetic pretraining then real fine-tuning for each generator "
            "(lesiondiffusion, rule_based, lesiondiffusion_notext = null prompts for both networks) and source "
            "(an offline cache of --synthetic-cases cases, or on-the-fly), each for every seed. Per-case Dice with "
            "nnU-Net's metric code; mean ± sd over seeds per lesion type as CSV, Markdown and a bar chart PNG. "
            "Needs nnUNet_raw, nnUNet_preprocessed and nnUNet_results. Finished runs are reused; an interrupted "
            "training continues with --c."
        ),
    )
    s.add_argument("--dataset", required=True, help="nnU-Net dataset id (e.g. 900) or folder name")
    s.add_argument("--config", type=Path, help="base lesiondiffusion.yaml for the LesionDiffusion trainers (catalogs, "
                   "templates, store, schedule; generator.bundle). Default: the dataset's label names as catalogs, "
                   "healthy training cases as templates")
    s.add_argument("--bundle", type=Path, help="model bundle for the lesiondiffusion generators "
                   "(overrides generator.bundle of --config)")
    s.add_argument("--settings", default="real,synthetic,synthetic_real",
                   help="comma-separated subset of real,synthetic,synthetic_real")
    s.add_argument("--generators", default="lesiondiffusion,rule_based,lesiondiffusion_notext",
                   help="comma-separated subset of lesiondiffusion,rule_based,lesiondiffusion_notext,no_lesion (synthetic "
                        "settings; no_lesion: the control, same crops with nothing inpainted)")
    s.add_argument("--synthetic-source", default="offline,online",
                   help="offline (a cache of --synthetic-cases cases per generator), online (on-the-fly) or both")
    s.add_argument("--synthetic-cases", type=int, default=1000, help="cases in each offline cache (default 1000, "
                   "the method's number)")
    s.add_argument("--seeds", default="3", help="a count (3 = seeds 0,1,2) or a comma-separated list (default 3)")
    s.add_argument("--fold", default="all", help="nnU-Net fold (all or 0-4; default all: train on every training "
                   "case, test on imagesTs)")
    s.add_argument("-c", "--configuration", default="3d_fullres", help="nnU-Net configuration (2d, 3d_lowres, 3d_fullres)")
    s.add_argument("-p", "--plans", default="nnUNetPlans")
    s.add_argument("--trainer-suffix", default="",
                   help="variant suffix appended to every trainer, e.g. _5epochs or _tinynet_2epochs_3iters")
    s.add_argument("--trainer-real", help="trainer for 'real' (default nnUNetTrainer + suffix)")
    s.add_argument("--trainer-synthetic", help="trainer for 'synthetic' (default nnUNetTrainerLesionDiffusionSynthOnly + suffix)")
    s.add_argument("--trainer-synthetic-real", help="trainer for 'synthetic_real' (default nnUNetTrainerLesionDiffusion + suffix)")
    s.add_argument("--test-images", type=Path, help="held-out images (default: the raw dataset's imagesTs)")
    s.add_argument("--test-labels", type=Path, help="their labels (default: the raw dataset's labelsTs)")
    s.add_argument("--device", default="cpu", help="cpu | cuda | mps (nnU-Net and the generator)")
    s.add_argument("--parallel", type=int, default=1, help="nnU-Net runs at once, each in its own results folder; "
                   "offline caches are built first, side by side (default 1; mind GPU memory and CPU cores)")
    s.add_argument("--no-plan", action="store_true", help="fail instead of running plan_and_preprocess")
    s.add_argument("-o", "--out", type=Path, default=Path("segmentation_eval"))
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=run_segmentation)


def run_alignment(args: argparse.Namespace) -> int:
    import numpy as np

    from lesiondiffusion.catalog import load_catalog
    from lesiondiffusion.evaluation.alignment import format_alignment_table, run_alignment as study, write_alignment
    from lesiondiffusion.generators import build_generator
    from lesiondiffusion.io import load_nifti
    from lesiondiffusion.organs import load_organ_map

    if args.n < 1:
        raise LesionDiffusionError(f"-n {args.n}: give at least 1 lesion per prompt value.")
    catalog = load_catalog(args.catalog)
    ct, _, _ = load_nifti(args.ct, np.float32)
    organs = load_organ_map(args.organs, args.organ_mapping)
    if ct.shape != organs.labels.shape:
        raise LesionDiffusionError(
            f"{args.ct} has shape {ct.shape} but {args.organs} has {organs.labels.shape}; the organ map must be "
            "on the CT grid (TotalSegmentator writes it that way; resample it with nearest neighbour otherwise)."
        )
    if args.backend == "lesiondiffusion" and args.bundle is None:
        raise LesionDiffusionError("--bundle DIR is required for the lesiondiffusion backend.")
    options = {"ddim_steps": args.ddim_steps} if args.ddim_steps and args.backend == "lesiondiffusion" else {}
    # the density half measures what the model makes: a catalog HU correction would move every
    # lesion into the prompt's range and measure the catalog instead
    generator = build_generator(args.backend, bundle=args.bundle, device=args.device, options=options,
                                hu_correction="off")
    groups = tuple(g.strip() for g in args.groups.split(",") if g.strip())
    bad = [g for g in groups if g not in ("shape", "density")]
    if bad or not groups:
        raise LesionDiffusionError(f"--groups {args.groups!r}: use shape, density or shape,density.")
    result = study(generator, ct, organs, catalog, args.n, seed=args.seed, groups=groups,
                   progress=not args.no_progress)
    paths = write_alignment(result, args.out, title=f"{catalog.name}: {args.backend}")
    print(format_alignment_table(result.summary()))
    print(f"\nwritten: {paths['summary']}, {paths['samples']}, {paths['plot']}")
    return 0


def run_segmentation(args: argparse.Namespace) -> int:
    from lesiondiffusion.evaluation.segmentation import run_segmentation_study
    from lesiondiffusion.nnunet_integration.discovery import with_ext_trainer

    def items(text: str) -> tuple[str, ...]:
        return tuple(x.strip() for x in text.split(",") if x.strip())

    trainers = {k: v for k, v in (("real", args.trainer_real), ("synthetic", args.trainer_synthetic),
                                  ("synthetic_real", args.trainer_synthetic_real)) if v}
    result = run_segmentation_study(
        args.dataset, args.out, settings=items(args.settings), generators=items(args.generators),
        sources=items(args.synthetic_source), synthetic_cases=args.synthetic_cases, seeds=args.seeds,
        configuration=args.configuration, fold=args.fold, plans=args.plans, trainer_suffix=args.trainer_suffix,
        trainers=trainers, config=args.config, bundle=args.bundle, test_images=args.test_images,
        test_labels=args.test_labels, device=args.device, parallel=args.parallel, plan=not args.no_plan,
        progress=not args.no_progress, echo=print, env=with_ext_trainer(),
    )
    print()
    print(result.paths["markdown"].read_text())
    print("written: " + ", ".join(str(p) for p in result.paths.values()))
    return 0
