"""Zero-shot hematencephalon: a generator trained only on abdominal phantoms synthesises intracerebral
haemorrhage into a head phantom (skull, brain, ventricles) from its report.

Prints, per density prompt, how many lesions came out, the share of LMNet's own mask inside the brain
label (before the pipeline clips a within-organ lesion to its organ), the share of the kept lesion in
brain tissue (ventricles excluded), and the lesion's mean HU against the surrounding
brain (a 2-voxel ring of parenchyma around it), with the catalog's HU correction OFF: the figures are the
networks' own output. Every mask is measured (no retries, no organ or volume filter).

    python benchmarks/bench_zero_shot.py --bundle lesiondiffusion_demo/bundle -n 8    # e.g. the demo's bundle
    python benchmarks/bench_zero_shot.py --train-steps 100,300,300 --workdir zs       # train one here first

``--train-steps`` trains a tiny bundle with `lesiondiffusion pretrain` on the demo's abdominal phantom
dataset (kidney and liver lesions, no head, no brain, no haemorrhage) in WORKDIR.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

from lesiondiffusion.catalog import load_catalog
from lesiondiffusion.organs import organ_map_from_array
from lesiondiffusion.phantoms import HEAD_TS_V2_IDS, make_head_phantom, write_phantom_dataset
from lesiondiffusion.pipeline import LesionSynthesizer, SynthesisConfig


def train_abdominal_bundle(workdir: Path, steps: list[int]) -> Path:
    """A tiny bundle trained on abdominal phantoms only (the demo's dataset settings)."""
    from lesiondiffusion.cli import main
    from lesiondiffusion.demo import DemoSettings

    s = DemoSettings()
    data = write_phantom_dataset(workdir / "raw", n_healthy=s.n_healthy, lesion_types=list(s.lesion_types),
                                 shape=s.shape, spacing=s.spacing, seed=s.seed, cases_per_type=s.cases_per_type)
    bundle = workdir / "bundle"
    for net, n in zip(("vqgan", "lmnet", "linet"), steps):
        run = workdir / "runs" / net
        argv = ["pretrain", net, "--data", str(data), "--preset", "tiny", "-o", str(run), "--bundle", str(bundle),
                "--steps", str(n), "--workers", "0", "--device", "cpu", "--checkpoint-every", str(max(10, n // 4)),
                "--preview-every", "0", "--log-every", "25", "--no-progress"]
        if (run / "checkpoint.pt").exists():  # an interrupted run continues
            argv.append("--resume")
        rc = main(argv)
        if rc:
            raise SystemExit(f"pretrain {net} failed (exit {rc})")
    return bundle


def measure(bundle: Path, n: int, densities: list[str], seed: int, ddim_steps: int | None) -> list[dict]:
    head = make_head_phantom(seed=seed)
    organs = organ_map_from_array(head.organs, head.affine, mapping="v2")
    catalog = load_catalog("hematencephalon")
    brain = head.organs == HEAD_TS_V2_IDS["brain"]
    parenchyma = head.parenchyma
    # HU correction off, and keep every mask: the figures are the networks' own
    config = dict(max_retries=0, min_volume_fraction=0.0, min_organ_fraction=0.0, min_mask_in_organ=0.0, hu_correction="off")
    if ddim_steps:
        config["ddim_steps"] = ddim_steps
    synth = LesionSynthesizer.from_bundle(bundle, device="cpu", **config)
    rows = []
    for density in densities:
        reports = [catalog.sample(seed * 1000 + i, {"density": density}) for i in range(n)]
        t = time.perf_counter()
        results = synth(head.ct, organs, reports, catalog, seed=seed)
        dt = (time.perf_counter() - t) / n
        for rep, res in zip(reports, results):
            row = {"density": density, "ok": res.failure is None, "failure": res.failure, "s_per_lesion": dt,
                   "target_hu": catalog.hu_range(density, rep.enhancement)}
            if res.lesion_mask is not None and res.lesion_mask.any():
                m = res.lesion_mask > 0
                ring = ndimage.binary_dilation(m, iterations=3) & ~ndimage.binary_dilation(m, iterations=1) & parenchyma
                # inside_brain: LMNet's own mask before the pipeline clips it to the box and the organ;
                # inside_parenchyma: the kept lesion, ventricles excluded
                row.update(voxels=int(m.sum()), inside_brain=float(res.info.get("raw_organ_fraction", brain[m].mean())),
                           inside_parenchyma=float(parenchyma[m].mean()),
                           lesion_hu=float(res.image[m].mean()),
                           brain_hu=float(head.ct[ring].mean()) if ring.any() else float("nan"))
            rows.append(row)
    return rows


def report(rows: list[dict]) -> None:
    print(f"{'density':12} {'masks':>7} {'in brain':>9} {'in tissue':>9} {'lesion HU':>10} {'brain HU':>9} "
          f"{'diff':>7} {'target':>10} {'s/lesion':>8}")
    for density in dict.fromkeys(r["density"] for r in rows):
        sub = [r for r in rows if r["density"] == density]
        got = [r for r in sub if "voxels" in r]
        if not got:
            print(f"{density:12} {0:>3}/{len(sub):<3} (no mask; failures: {sub[0]['failure']})")
            continue
        mean = lambda k: float(np.nanmean([r[k] for r in got]))  # noqa: E731
        diffs = [r["lesion_hu"] - r["brain_hu"] for r in got]
        lo, hi = sub[0]["target_hu"]
        print(f"{density:12} {len(got):>3}/{len(sub):<3} {100 * mean('inside_brain'):8.1f}% {100 * mean('inside_parenchyma'):8.1f}% "
              f"{mean('lesion_hu'):10.1f} {mean('brain_hu'):9.1f} {np.mean(diffs):+7.1f} {f'{lo:g}..{hi:g}':>10} "
              f"{sub[0]['s_per_lesion']:8.2f}")
        print(f"{'':12} lesion - brain per lesion: {', '.join(f'{d:+.0f}' for d in diffs)}; "
              f"fully inside brain: {sum(r['inside_brain'] >= 0.999 for r in got)}/{len(got)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, help="a bundle trained on abdominal data only")
    p.add_argument("--train-steps", help="train one first: VQGAN,LMNET,LINET steps, e.g. 100,300,300")
    p.add_argument("--workdir", type=Path, default=Path("zero_shot"), help="where --train-steps trains")
    p.add_argument("-n", type=int, default=8, help="lesions per density prompt")
    p.add_argument("--densities", default="hyperdense,hypodense")
    p.add_argument("--ddim-steps", type=int, default=None, help="default: the bundle's")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.train_steps:
        args.bundle = train_abdominal_bundle(args.workdir, [int(v) for v in args.train_steps.split(",")])
    if args.bundle is None:
        p.error("give --bundle or --train-steps")
    rows = measure(args.bundle, args.n, args.densities.split(","), args.seed, args.ddim_steps)
    print(f"bundle {args.bundle}; head phantom seed {args.seed}; HU correction off; no retries, no filters")
    report(rows)


if __name__ == "__main__":
    main()
