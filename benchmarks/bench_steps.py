"""Prompt alignment against sampling steps and sampler, HU correction off (issue 19, item 4).

    python benchmarks/bench_steps.py [--bundle B] [--n 6] [--settings ddim:5,ddim:10,ddim:20,ddim:50,pndm:10]

For each setting (sampler and number of steps, for LMNet and LINet alike) and each scene, ``n`` paired
lesions per prompt: the same report, placement seed and noise seed synthesised twice with one attribute
changed, ``shape`` round-like vs irregular (sphericity of the mask) and ``density`` hyperdense vs
hypodense (lesion mean HU minus the organ's, ``evaluation.hu_stats``: organ voxels 2-15 mm around the
lesion). Scenes: unseen healthy phantoms (the demo bundle's recipe, seeds the bundle never saw) and the
real abdominal CT of ../shared (TotalSegmentator v2 labels). Prints, per setting and scene: pairs that
passed the pipeline's checks, round-like minus irregular sphericity (mean, sd, pairs >= +0.10),
hyperdense lesions >= 15 HU brighter than their organ and hypodense ones >= 15 HU darker (counts), the
paired hyper - hypo contrast, and CPU seconds per lesion (one process, torch threads as set). The
samplers are MONAI's: ``DDIMScheduler`` (the method's, x0 clamped) and ``PNDMScheduler`` in its PLMS form.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED_CT = REPO.parent / "shared" / "data" / "ct" / "totalsegmentator_example"
sys.path.insert(0, str(REPO / "benchmarks"))


def phantom_scene(n: int, seed: int) -> list:
    """[(ct, organs)] * n: one healthy phantom of the demo bundle's recipe per pair, at seeds it never saw."""
    from demo_bundle import RECIPE

    from lesiondiffusion.organs import TOTALSEG_V2, OrganMap
    from lesiondiffusion.phantoms import make_phantom

    out = []
    for i in range(n):
        p = make_phantom(RECIPE["shape"], RECIPE["spacing"], seed=seed + 1000 * i)
        out.append((p.ct, OrganMap(labels=p.organs, affine=p.affine, names=dict(TOTALSEG_V2))))
    return out


def scenes(n: int, seed: int, real: bool) -> list[tuple[str, list]]:
    """(name, [(ct, organs)] * n): one unseen phantom per pair, and the real CT for every pair."""
    from lesiondiffusion.io import load_nifti
    from lesiondiffusion.organs import load_organ_map

    out = [("phantoms", phantom_scene(n, seed))]
    if real and (SHARED_CT / "example_ct_sm.nii.gz").is_file():
        ct, _, _ = load_nifti(SHARED_CT / "example_ct_sm.nii.gz", np.float32)
        organs = load_organ_map(SHARED_CT / "example_seg.nii.gz", "v2")
        out.append(("real CT (../shared)", [(ct, organs)] * n))
    return out


def paired(synth, scene: list, catalog, seed: int) -> dict:
    """Paired shape and density figures of one setting on one scene, and the seconds per lesion. Per pair:
    round-like minus irregular sphericity and convexity; hyperdense and hypodense lesion-minus-organ HU and
    their difference (also benchmarks/demo_bundle.py's alignment of the shipped bundle)."""
    from lesiondiffusion.errors import LesionDiffusionError
    from lesiondiffusion.evaluation import convexity, hu_stats, sphericity
    from lesiondiffusion.report import LesionReport

    shape, convex, hyper, hypo, contrast = [], [], [], [], []
    failed, seconds, lesions, reasons = 0, 0.0, 0, []
    for i, (ct, organs) in enumerate(scene):
        for attr, (a, b) in (("shape", ("round-like", "irregular")), ("density", ("hyperdense", "hypodense"))):
            try:  # the pair differs in this one attribute only
                ra = catalog.sample(seed + i, fixed={attr: a})
                rb = LesionReport.from_dict({**ra.to_dict(), attr: b})
            except LesionDiffusionError:
                failed += 1
                continue
            t = time.process_time()
            res = [synth(ct, organs, [r], catalog, seed=seed + i)[0] for r in (ra, rb)]
            seconds += time.process_time() - t
            lesions += 2
            if not all(x.ok for x in res):
                failed += 1
                reasons.append(next(str(x.failure) for x in res if not x.ok)[:60])
                continue
            masks = [np.asarray(x.lesion_mask) > 0 for x in res]
            if attr == "shape":
                shape.append(sphericity(masks[0], organs.spacing) - sphericity(masks[1], organs.spacing))
                convex.append(convexity(masks[0], organs.spacing) - convexity(masks[1], organs.spacing))
            else:
                d = [hu_stats(x.image, m, organs.mask(x.box.organ_names)) for x, m in zip(res, masks)]
                c = [s.lesion_mean - s.organ_mean for s in d]
                hyper.append(c[0])
                hypo.append(c[1])
                contrast.append(c[0] - c[1])
    return {"shape": shape, "convexity": convex, "hyper": hyper, "hypo": hypo, "contrast": contrast, "failed": failed,
            "s_per_lesion": seconds / max(1, lesions), "reasons": reasons}


def fmt(v: list[float], digits: int = 3) -> str:
    if not v:
        return "-"
    sd = np.std(v, ddof=1) if len(v) > 1 else float("nan")
    return f"{np.mean(v):+.{digits}f} ± {sd:.{digits}f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, default=None, help="bundle folder (default: the shipped demo bundle)")
    ap.add_argument("--catalog", default="liver_tumor")
    ap.add_argument("--n", type=int, default=6, help="pairs per prompt and scene")
    ap.add_argument("--seed", type=int, default=9001)
    ap.add_argument("--settings", default="ddim:5,ddim:10,ddim:20,ddim:50,pndm:10")
    ap.add_argument("--no-real", action="store_true", help="phantoms only")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)

    import torch

    from lesiondiffusion.catalog import load_catalog
    from lesiondiffusion.demo_assets import packaged_bundle_dir
    from lesiondiffusion.pipeline import LesionSynthesizer, SynthesisConfig

    torch.set_num_threads(a.threads)
    bundle = a.bundle or packaged_bundle_dir()
    catalog = load_catalog(a.catalog)
    todo = scenes(a.n, a.seed, not a.no_real)
    print(f"bundle {bundle}; catalog {a.catalog}; {a.n} pairs per prompt and scene; HU correction off; "
          f"torch threads {a.threads}; load average {os.getloadavg()[0]:.1f}", flush=True)
    head = ("| setting | scene | pairs ok shape/density (failed) | round - irregular sphericity | >= +0.10 | "
            "hyperdense - organ HU | >= +15 | hypodense - organ HU | <= -15 | hyper - hypo HU | CPU s / lesion |")
    rows = [head, "| " + " | ".join(["---"] * 11) + " |"]
    for setting in a.settings.split(","):
        sampler, steps = setting.split(":")
        synth = LesionSynthesizer.from_bundle(bundle, device="cpu", ddim_steps=int(steps), sampler=sampler,
                                              hu_correction="off")
        for name, scene in todo:
            r = paired(synth, scene, catalog, a.seed)
            row = (f"| {sampler} {steps} | {name} | {len(r['shape'])}/{len(r['hyper'])} ({r['failed']}) | "
                   f"{fmt(r['shape'])} | {sum(v >= 0.10 for v in r['shape'])}/{len(r['shape'])} | "
                   f"{fmt(r['hyper'], 1)} | {sum(v >= 15 for v in r['hyper'])}/{len(r['hyper'])} | "
                   f"{fmt(r['hypo'], 1)} | {sum(v <= -15 for v in r['hypo'])}/{len(r['hypo'])} | "
                   f"{fmt(r['contrast'], 1)} | {r['s_per_lesion']:.2f} |")
            rows.append(row)
            print(row, flush=True)
            for why in sorted(set(r["reasons"])):
                print(f"    failed pair: {why}", flush=True)
    print("\n".join(rows))
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
