"""``lesiondiffusion synthesize``: inpaint N text-controlled lesions into one CT with a model bundle.

Writes OUT/sample_000/{image.nii.gz, lesion.nii.gz, report.yaml, preview.png} per sample; each sample
folder appears complete or not at all (built under a temporary name, then renamed). Inputs are only read.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import tempfile
from pathlib import Path

from ..errors import LesionDiffusionError, OrganMapError, ReportError
from ._args import finite_float
from .report import load_reports, parse_fixed

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("synthesize", help="inpaint text-controlled lesions into a CT with a model bundle")
    p.add_argument("--bundle", type=Path, required=True, metavar="DIR", help="model bundle folder (see `bundle init`)")
    p.add_argument("--ct", type=Path, required=True, help="CT volume in HU (NIfTI)")
    p.add_argument("--organs", type=Path, required=True, metavar="SEG", help="TotalSegmentator label map of that CT")
    p.add_argument("--catalog", required=True, metavar="TYPE", help="lesion type (catalog name or YAML path)")
    p.add_argument("--report", type=Path, help="a fixed report YAML/JSON (default: sample reports from the catalog); a "
                                               "file of several (`report derive` output, `lesions:`) gives sample i "
                                               "lesion i modulo their number")
    p.add_argument("--set", dest="fixed", action="append", default=[], metavar="KEY=VALUE",
                   help="fix a sampled attribute, e.g. --set density=hypodense --set size_mm=20,18,16 (repeatable)")
    p.add_argument("-n", type=int, default=1, help="number of samples (default 1)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0); same seed, -n and --batch-size = same output")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    p.add_argument("--ddim-steps", type=int, help="sampling steps (default: the bundle's schedule.ddim_steps)")
    p.add_argument("--sampler", choices=("ddim", "pndm"), default=None,
                   help="ddim (default, the method's) or pndm (MONAI's PLMS multistep sampler)")
    p.add_argument("--guidance", type=finite_float, help="classifier-free guidance scale (default: the bundle's; 1 = off)")
    p.add_argument("--min-mask-in-organ", type=finite_float, default=None, metavar="FRACTION",
                   help="redraw a generated mask with less than this share in its organ (default: the pipeline's, 0.5; "
                        "0 turns the rule off, e.g. for untrained bundles)")
    p.add_argument("--batch-size", type=int, default=4, help="lesions per network batch (default 4)")
    p.add_argument("--mapping", default="auto", help="organ label ids: v1, v2, auto (default) or a JSON name->id file")
    p.add_argument("--hu-correction", choices=("off", "shift", "clip"), default="off",
                   help="off (default): keep the model's own intensities, as in the method; shift: move the generated "
                        "patch so the lesion mean reaches the catalog's HU range for its density; clip: clip lesion "
                        "voxels into it. A correction that acts is printed and kept in report.yaml and the preview "
                        "title (mean before and after, shift, voxels clipped)")
    p.add_argument("--max-tries", type=int, default=5, metavar="N",
                   help="draws per sample before it counts as failed: a new report when reports are sampled, a "
                        "new placement and noise otherwise (default 5)")
    p.add_argument("--no-preview", action="store_true", help="skip preview.png")
    p.add_argument("--allow-non-hu", action="store_true",
                   help="accept a CT whose values do not look like Hounsfield units (no air near -1000)")
    p.add_argument("--overwrite", action="store_true", help="replace existing sample folders in OUT")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="OUT", help="output folder")
    p.set_defaults(func=_synthesize)


# temporary sample folders (see _write_sample): .sample_000.<tag> and .sample_000.old.<tag>
_TMP_PATTERN = r"\.(sample_\d{3,}|failures\.yaml)\..+"


def _sample_dir(out: Path, i: int) -> Path:
    return out / f"sample_{i:03d}"


def _synthesize(args: argparse.Namespace) -> int:
    from ..catalog import load_catalog
    from ..io import claim_folder, ensure_output_dir, remove_stale_temporaries, write_yaml
    from ..pipeline import LesionSynthesizer

    _check_args(args)
    out: Path = args.output
    catalog = load_catalog(args.catalog)
    fixed = parse_fixed(args.fixed)
    reports = _reports(args, catalog, fixed)
    ct, affine, header, organs = _load_ct_and_organs(args)
    synth = LesionSynthesizer.from_bundle(args.bundle, device=args.device, **_pipeline_options(args))

    ensure_output_dir(out, "-o")
    # claimed before anything is written: the existence check above ran before the model loaded, and a
    # second run into the same folder would otherwise interleave its samples with ours
    with claim_folder(out, "synthesize"):
        existing = [_sample_dir(out, i) for i in range(args.n) if _sample_dir(out, i).exists()]
        if existing and not args.overwrite:
            raise LesionDiffusionError(f"{existing[0]} already exists ({len(existing)} sample folder(s) in {out}); "
                                       "choose another -o or pass --overwrite.")
        remove_stale_temporaries(out, _TMP_PATTERN)
        written, failed, tries = _run_samples(args, synth, catalog, reports, fixed, (ct, affine, header, organs))
        if failed:
            write_yaml(out / "failures.yaml", [{"sample": i, "tries": tries[i], "reason": r} for i, r in failed])
        what = "report and placement" if args.report is None else "placement"
        print("tries per sample (a try draws a new " + what + "): "
              + ", ".join(f"{i:03d}: {tries[i]}" for i in sorted(tries)))
        print(f"wrote {written} sample(s) to {out}" + (f"; {len(failed)} failed after {args.max_tries} tries "
                                                     f"(see {out / 'failures.yaml'})" if failed else ""))
        return 0 if not failed else 1


def _check_args(args: argparse.Namespace) -> None:
    """Refuse bad numbers, --report with --set, an output that holds an input, existing samples."""
    from ..io import refuse_overwrite_input

    if args.n < 1:
        raise LesionDiffusionError(f"-n {args.n}: the number of samples must be >= 1.")
    if args.batch_size < 1:
        raise LesionDiffusionError(f"--batch-size {args.batch_size}: must be >= 1.")
    if args.max_tries < 1:
        raise LesionDiffusionError(f"--max-tries {args.max_tries}: must be >= 1.")
    if args.ddim_steps is not None and args.ddim_steps < 1:
        raise LesionDiffusionError(f"--ddim-steps {args.ddim_steps}: must be >= 1.")
    if args.report is not None and args.fixed:
        raise LesionDiffusionError("--report and --set both fix attributes; edit the report file instead of passing --set.")
    out: Path = args.output
    inputs = {"--ct": args.ct, "--organs": args.organs, "--report": args.report, "--bundle": args.bundle}
    if Path(args.catalog).suffix in (".yaml", ".yml") or Path(args.catalog).exists():
        inputs["--catalog"] = Path(args.catalog)
    if Path(args.mapping).suffix == ".json":
        inputs["--mapping"] = Path(args.mapping)
    refuse_overwrite_input(out, names=inputs, may_contain=True)
    # every folder this run may create or replace must hold no input (--overwrite deletes the old one)
    for i in range(args.n):
        refuse_overwrite_input(_sample_dir(out, i), names=inputs)
    refuse_overwrite_input(out / "failures.yaml", names=inputs)
    existing = [_sample_dir(out, i) for i in range(args.n) if _sample_dir(out, i).exists()]
    if existing and not args.overwrite:
        raise LesionDiffusionError(
            f"{existing[0]} already exists ({len(existing)} sample folder(s) in {out}); choose another -o or pass --overwrite."
        )


def _reports(args: argparse.Namespace, catalog, fixed):  # noqa: ANN001, ANN202 - one report per sample
    """The given reports (each checked against the catalog; sample i takes lesion i modulo their number),
    or reports sampled from the catalog."""
    if args.report is None:
        return [catalog.sample(args.seed + i, fixed or None) for i in range(args.n)]
    given = load_reports(args.report)
    for where, report in given:
        problems = catalog.check_report(report)
        if problems:
            raise ReportError(f"--report {where} does not fit --catalog {args.catalog} ({catalog.path}):\n  "
                              + "\n  ".join(problems))
    if len(given) > 1:
        print(f"--report {args.report} holds {len(given)} lesions: sample i uses lesion i modulo {len(given)}")
    return [given[i % len(given)][1] for i in range(args.n)]


def _load_ct_and_organs(args: argparse.Namespace):  # noqa: ANN202 - (ct, affine, header, organ map)
    """The CT (in HU, finite) and its organ map on the same grid, or an error naming the fix."""
    import numpy as np

    from ..io import hu_problem, load_nifti, non_finite_fix
    from ..organs import load_organ_map, looks_like_label_map

    ct, affine, header = load_nifti(args.ct)
    try:
        organs = load_organ_map(args.organs, args.mapping)
    except OrganMapError as exc:
        if "looks like a CT" in str(exc) and looks_like_label_map(ct):
            raise OrganMapError(
                f"--ct {args.ct} and --organs {args.organs} look swapped: --ct holds {len(np.unique(ct))} integer "
                f"values from {ct.min():g} to {ct.max():g} (a label map) and --organs looks like a CT image. Pass "
                "the CT as --ct and its TotalSegmentator map as --organs."
            ) from None
        raise
    problem = hu_problem(ct)
    if problem is not None and "NaN" in problem:
        # --allow-non-hu cannot help here: no scale makes NaN a CT value, so the advice is a working repair
        command, fixed_ct = non_finite_fix(args.ct)
        raise LesionDiffusionError(
            f"--ct {args.ct} {problem}; a CT needs a finite value in every voxel (NaN often marks voxels outside "
            f"the scanner's field of view). Write a copy with them set to air (-1024 HU):\n  {command}\nthen pass "
            f"--ct {fixed_ct}. (--allow-non-hu does not apply: it accepts other intensity scales, not NaN.)")
    if problem is not None and not args.allow_non_hu:
        label_like = " It looks like a label map: is it the organ map?" if looks_like_label_map(ct) else ""
        raise LesionDiffusionError(
            f"--ct {args.ct} {problem}.{label_like} Lesion intensities come from the catalog in HU, so a CT "
            "in another scale gets wrong lesions: convert it to HU (apply the scanner's rescale slope and "
            "intercept), or pass --allow-non-hu if you know the intensities are what you want."
        )
    if ct.shape != organs.shape:
        raise LesionDiffusionError(
            f"--organs {args.organs} has shape {organs.shape} but --ct {args.ct} has {ct.shape}; the label map must be "
            "the segmentation of this CT on the same voxel grid (run TotalSegmentator on this file)."
        )
    if not np.allclose(affine, organs.affine, atol=1e-3):
        raise LesionDiffusionError(
            f"--organs {args.organs} and --ct {args.ct} have different affines; they must share one voxel grid "
            "(resample the label map to the CT with nearest-neighbour interpolation)."
        )
    return ct, affine, header, organs


def _pipeline_options(args: argparse.Namespace) -> dict:
    overrides = {"batch_size": args.batch_size, "hu_correction": args.hu_correction}
    if args.ddim_steps is not None:
        overrides["ddim_steps"] = args.ddim_steps
    if args.guidance is not None:
        overrides["guidance_scale"] = args.guidance
    if args.sampler is not None:
        overrides["sampler"] = args.sampler
    if args.min_mask_in_organ is not None:
        overrides["min_mask_in_organ"] = args.min_mask_in_organ
    return overrides


def _run_samples(args: argparse.Namespace, synth, catalog, reports, fixed, inputs):  # noqa: ANN001, ANN202
    """Synthesise and write every sample, ``--batch-size`` at a time, a failed one drawn again up to
    ``--max-tries`` times; returns (samples written, [(sample, last failure)], tries per sample)."""
    import numpy as np
    from tqdm import tqdm

    ct, affine, header, organs = inputs
    sampled = args.report is None

    def redraw(i: int, attempt: int):  # noqa: ANN202 - the report of sample i at try `attempt` (0-based)
        if not sampled or attempt == 0:
            return reports[i]
        # a sampled report that cannot be synthesised (e.g. too large for a thin organ) is replaced,
        # seeded by (seed, sample, try) so reruns give the same samples
        return catalog.sample(np.random.default_rng([args.seed, i, attempt]), fixed or None)

    written, failed, tries = 0, [], {}
    with tqdm(total=args.n, desc="synthesize", unit="lesion", disable=None) as bar:
        for start in range(0, args.n, args.batch_size):
            pending = list(range(start, min(start + args.batch_size, args.n)))
            for attempt in range(args.max_tries):
                chunk = [redraw(i, attempt) for i in pending]
                # try 0 keeps the seed of a plain run; later tries get new placements and noise
                seed = args.seed + start if attempt == 0 else int(
                    np.random.SeedSequence([args.seed, start, attempt]).generate_state(1)[0])
                results = synth(ct, organs, chunk, catalog, seed=seed)
                retry = []
                for i, result in zip(pending, results):
                    tries[i] = attempt + 1
                    if result.ok:
                        result.info["tries"] = attempt + 1
                        _say_hu_correction(i, result)
                        _write_sample(args.output, i, ct, affine, header, organs.spacing, result, args)
                        written += 1
                        bar.update(1)
                    elif attempt + 1 < args.max_tries:
                        log.info("sample %03d try %d failed (%s); drawing again", i, attempt + 1, result.failure)
                        retry.append(i)
                    else:
                        failed.append((i, result.failure))
                        log.warning("sample %03d failed after %d tries: %s", i, attempt + 1, result.failure)
                        bar.update(1)
                pending = retry
                if not pending:
                    break
    return written, failed, tries


def _say_hu_correction(i: int, result) -> None:  # noqa: ANN001
    """One line when the HU correction changed what the model made (report.yaml keeps the figures)."""
    from ..blending import hu_correction_note

    note = hu_correction_note(result.info)
    if note is None:
        return
    r = result.report
    print(f"sample {i:03d}: {note} for {r.density!r} under {r.enhancement!r}. "
          "Use --hu-correction off to keep the model's intensities.")


def _write_sample(out: Path, i: int, ct, affine, header, spacing, result, args) -> None:  # noqa: ANN001
    import numpy as np
    import yaml

    from ..io import atomic_write_text, save_nifti, temp_tag
    from ..preview import save_preview

    final = _sample_dir(out, i)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.{temp_tag()}", dir=out))
    try:
        save_nifti(tmp / "image.nii.gz", result.image, affine, header)
        mask_header = header.copy() if header is not None else None
        if mask_header is not None:
            mask_header.set_slope_inter(1.0, 0.0)
        save_nifti(tmp / "lesion.nii.gz", result.lesion_mask.astype(np.uint8), affine, mask_header)
        info = {k: (float(v) if isinstance(v, (np.floating, float)) else v) for k, v in result.info.items()}
        box = result.box.to_dict() if hasattr(result.box, "to_dict") else None
        if isinstance(box, dict):
            box.pop("report", None)  # the (possibly shrunk) report is written once, at the top
        doc = {
            "report": result.report.to_dict(),
            "box": box,
            "synthesis": {"bundle": str(args.bundle), "seed": args.seed, "sample": i, **info},
        }
        atomic_write_text(tmp / "report.yaml", yaml.safe_dump(_plain(doc), sort_keys=False, allow_unicode=True))
        if not args.no_preview:
            from ..blending import hu_correction_note

            r = result.report
            note = hu_correction_note(result.info)
            save_preview(tmp / "preview.png", ct, result.image, result.lesion_mask, spacing,
                         title=f"sample {i:03d}: {r.lesion_type}, {r.density}, {r.shape}, {r.size}"
                         + (f"\n{note}" if note else ""))
        # mkdtemp/mkstemp create owner-only files; give outputs the user's normal permissions
        umask = os.umask(0)
        os.umask(umask)
        for f in tmp.iterdir():
            f.chmod(0o666 & ~umask)
        tmp.chmod(0o777 & ~umask)
        if final.exists():  # --overwrite: swap the folders so a crash never leaves neither
            trash = Path(tempfile.mkdtemp(prefix=f".{final.name}.old.{temp_tag()}", dir=out))
            os.replace(final, trash / final.name)
            os.replace(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _plain(obj):  # noqa: ANN001, ANN202 - YAML-safe copy of numpy scalars/arrays/tuples
    import numpy as np

    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    return obj
