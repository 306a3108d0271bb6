"""A generator trained on real sarcomas, and how real its lesions are (HU correction off).

    python benchmarks/sarcoma_generator.py train    --workdir /tmp/sts_gen [--vqgan-steps 1200 ...]
    python benchmarks/sarcoma_generator.py evaluate --workdir /tmp/sts_gen --bundle /tmp/sts_gen/bundle

``train`` does what a user does with their own mask-only data, with the project's commands:
``dataset import`` (tissue maps from HU as organ maps) of the generator pool of the fixed split
(benchmarks/sarcoma_table1.py ``split_cases``: 9 of the 26 cases), ``pretrain prepare --derive-reports``,
then ``pretrain vqgan``, ``pretrain lmnet`` and ``pretrain linet`` with the ``tiny`` preset (3 mm, LMNet crop
16^3, LINet crop 32^3, HU window -1000..1000: muscle, fat, bone and air fit). The bundle is written to
WORKDIR/bundle (about 9 MB; not in git).

``evaluate`` measures, on the 8 test cases (never seen by the generator):
* realism: the real sarcomas against ``--per-case`` synthetic ones per test CT (reports sampled from the
  soft_tissue_sarcoma catalog, placed in the CT's muscle at least 10 mm from the real tumour, which is
  taken out of the organ map), for LesionDiffusion and ``rule_based``: sphericity, convexity, volume,
  lesion HU and lesion-minus-muscle HU (muscle 2-15 mm around the lesion): median, IQR, and the
  two-sample Kolmogorov-Smirnov distance (scipy) against the real values;
* paired prompt effects: the same report, placement and noise with only the shape (round-like vs
  irregular) or only the density (hypodense vs isodense) changed;
* a PNG of real and synthetic sarcomas side by side.
Writes WORKDIR/realism.{md,csv}, WORKDIR/prompt_effects.csv and WORKDIR/real_vs_synthetic.png.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sarcoma_table1 import SARCOMA, split_cases  # noqa: E402  (the one split)


def run(cmd: list[str]) -> None:
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def train(a: argparse.Namespace) -> None:
    split = split_cases(a.source)
    data, w = a.workdir / "data", a.workdir
    ld = [sys.executable, "-m", "lesiondiffusion"]
    if not (data / "dataset.json").is_file():
        run(ld + ["dataset", "import", str(a.source), "--mask", "{case}/gtv.nii.gz", "--lesion-type",
                  "soft_tissue_sarcoma", "--cases", *split["generator"], "-o", str(data)])
    if not (data / "reportsTr").is_dir():
        run(ld + ["pretrain", "prepare", str(data), "--derive-reports"])
    common = ["--data", str(data), "--preset", "tiny", "--bundle", str(w / "bundle"), "--cache", str(w / "cache"),
              "--workers", "1", "--no-progress", "--checkpoint-every", "100"]
    for net, steps in (("vqgan", a.vqgan_steps), ("lmnet", a.lmnet_steps), ("linet", a.linet_steps)):
        extra = ["--adv-warmup", str(min(1000, steps // 2))] if net == "vqgan" else []
        run(ld + ["pretrain", net, *common, "-o", str(w / f"run_{net}"), "--steps", str(steps), "--resume", *extra])


# ------------------------------------------------------------------------------------------------
# measurement


def muscle_ring(lesion: np.ndarray, muscle: np.ndarray, spacing, inner_mm: float = 2.0, outer_mm: float = 15.0):
    from scipy import ndimage

    d = ndimage.distance_transform_edt(~lesion, sampling=spacing)
    return muscle & (d > inner_mm) & (d <= outer_mm)


def measure(image: np.ndarray, lesion: np.ndarray, muscle: np.ndarray, spacing) -> dict[str, float]:
    from lesiondiffusion.evaluation.metrics import shape_metrics

    lesion = lesion.astype(bool)
    sph, cvx = shape_metrics(lesion, spacing)
    ring = muscle_ring(lesion, muscle, spacing)
    hu = float(image[lesion].mean())
    return {"sphericity": sph, "convexity": cvx, "volume_ml": float(lesion.sum() * np.prod(spacing) / 1000),
            "lesion_hu": hu, "lesion_minus_muscle_hu": hu - float(image[ring].mean()) if ring.any() else float("nan")}


METRICS = ("sphericity", "convexity", "volume_ml", "lesion_hu", "lesion_minus_muscle_hu")


def load_case(case: str, source: Path):
    from lesiondiffusion.io import load_nifti, voxel_spacing
    from lesiondiffusion.organs import organ_map_from_array
    from lesiondiffusion.tissue import TISSUE_LABELS, tissue_map

    ct, aff, _ = load_nifti(source / case / "ct.nii.gz", np.float32)
    gtv = load_nifti(source / case / "gtv.nii.gz")[0] > 0
    sp = voxel_spacing(aff)
    tissue = tissue_map(ct, sp)
    muscle = tissue == TISSUE_LABELS["muscle"]
    # the template for synthesis: the real tumour and 10 mm around it are not muscle to place into
    from scipy import ndimage

    near = ndimage.distance_transform_edt(~gtv, sampling=sp) <= 10.0
    labels = np.where(near, 0, tissue).astype(np.int16)
    organs = organ_map_from_array(labels, aff, dict(TISSUE_LABELS))
    return ct, gtv, muscle & ~gtv, organs, sp


def generators(bundle: Path | None, ddim_steps: int, names: tuple[str, ...]):
    from lesiondiffusion.generators import build_generator

    out = {"rule_based": build_generator("rule_based")} if "rule_based" in names else {}
    if bundle is not None and "lesiondiffusion" in names:
        out["lesiondiffusion"] = build_generator("lesiondiffusion", bundle=str(bundle), device="cpu",
                                                 options={"ddim_steps": ddim_steps}, hu_correction="off")
    return out


def evaluate(a: argparse.Namespace) -> None:
    from scipy.stats import ks_2samp

    from lesiondiffusion.catalog import load_catalog

    t0 = time.time()
    cat = load_catalog("soft_tissue_sarcoma")
    split = split_cases(a.source)
    gens = generators(a.bundle, a.ddim_steps, tuple(a.generators.split(",")))
    rows: list[dict] = []
    effects: list[dict] = []
    previews: list[tuple] = []
    for ci, case in enumerate(split["test"]):
        ct, gtv, muscle, organs, sp = load_case(case, a.source)
        rows.append({"source": "real", "case": case, "seed": "", **measure(ct, gtv, muscle, sp)})
        reports = [cat.sample(1000 * ci + i) for i in range(a.per_case)]
        for name, gen in gens.items():
            res = gen(ct, organs, reports, cat, seed=ci)
            for i, r in enumerate(res):
                if not r.ok:
                    rows.append({"source": name, "case": case, "seed": i, "failure": r.failure})
                    continue
                les = r.lesion_mask > 0
                rows.append({"source": name, "case": case, "seed": i, **measure(r.image, les, muscle & ~les, sp),
                             "shape_prompt": r.report.shape, "density_prompt": r.report.density})
                if name == "lesiondiffusion" and i == 0 and len(previews) < 4:
                    previews.append((case, ct, gtv, r.image, les))
        if "lesiondiffusion" in gens:  # paired prompt effects: one attribute changed, all else equal
            gen = gens["lesiondiffusion"]
            base = reports[0]
            for attr, (v1, v2) in (("shape", ("round-like", "irregular")), ("density", ("hypodense", "isodense"))):
                pair = [dataclasses.replace(base, **{attr: v}) for v in (v1, v2)]
                if attr == "density":
                    pair = [dataclasses.replace(p, density_variations="homogeneous", specific_features="none")
                            for p in pair]
                out = [gen(ct, organs, [p], cat, seed=7 + ci)[0] for p in pair]
                if not all(o.ok for o in out):
                    effects.append({"case": case, "attribute": attr, "failure": "; ".join(str(o.failure) for o in out)})
                    continue
                m = [measure(o.image, o.lesion_mask > 0, muscle & ~(o.lesion_mask > 0), sp) for o in out]
                key = "sphericity" if attr == "shape" else "lesion_minus_muscle_hu"
                effects.append({"case": case, "attribute": attr, "a": v1, "b": v2, "metric": key,
                                "value_a": m[0][key], "value_b": m[1][key], "difference": m[0][key] - m[1][key],
                                "convexity_difference": m[0]["convexity"] - m[1]["convexity"]})
        print(f"{case}: done ({time.time() - t0:.0f} s)", flush=True)

    a.workdir.mkdir(parents=True, exist_ok=True)
    keys = sorted({k for r in rows for k in r})
    with (a.workdir / "realism.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    with (a.workdir / "prompt_effects.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=sorted({k for r in effects for k in r}))
        w.writeheader()
        w.writerows(effects)

    def vals(source: str, m: str) -> np.ndarray:
        v = np.array([r.get(m, np.nan) for r in rows if r["source"] == source and "failure" not in r], float)
        return v[np.isfinite(v)]

    lines = [f"Test set: {len(split['test'])} real sarcomas; {a.per_case} synthetic per test CT and generator "
             f"(HU correction off, DDIM {a.ddim_steps} steps). Median [IQR]; KS = two-sample Kolmogorov-Smirnov "
             "distance to the real values (p in brackets).", "",
             "| metric | real | " + " | ".join(gens) + " |", "| --- | --- | " + " | ".join("---" for _ in gens) + " |"]
    for m in METRICS:
        real = vals("real", m)
        cells = [f"{np.median(real):.3g} [{np.percentile(real, 25):.3g}, {np.percentile(real, 75):.3g}]"]
        for g in gens:
            v = vals(g, m)
            if v.size == 0:
                cells.append("no sample")
                continue
            ks = ks_2samp(real, v)
            cells.append(f"{np.median(v):.3g} [{np.percentile(v, 25):.3g}, {np.percentile(v, 75):.3g}]; "
                         f"KS {ks.statistic:.2f} (p {ks.pvalue:.2g})")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    fails = {g: sum(1 for r in rows if r["source"] == g and "failure" in r) for g in gens}
    lines += ["", "failed syntheses (redrawn nowhere here, counted): " + json.dumps(fails), ""]
    for attr in ("shape", "density"):
        e = [x for x in effects if x["attribute"] == attr and "difference" in x]
        if e:
            d = np.array([x["difference"] for x in e])
            lines.append(f"paired {attr} effect ({e[0]['a']} - {e[0]['b']}, {e[0]['metric']}): "
                         f"{d.mean():+.3g} ± {d.std(ddof=1) if len(d) > 1 else 0:.2g}, > 0 in {int((d > 0).sum())}/{len(d)}"
                         + (f"; convexity {np.mean([x['convexity_difference'] for x in e]):+.3g}" if attr == "shape" else ""))
    lines.append(f"\n{time.time() - t0:.0f} s on {os.cpu_count()}-core CPU (load avg {os.getloadavg()[0]:.1f})")
    text = "\n".join(lines)
    (a.workdir / "realism.md").write_text(text + "\n")
    print(text)
    if previews:
        plot_previews(previews, a.workdir / "real_vs_synthetic.png")


def plot_previews(previews, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(previews), figsize=(3.2 * len(previews), 6.4), squeeze=False)
    for j, (case, ct, gtv, img, les) in enumerate(previews):
        for i, (vol, m, title) in enumerate(((ct, gtv, f"{case}: real"), (img, les, f"{case}: synthetic"))):
            z = int(np.argmax(m.sum(axis=(0, 1))))
            ax = axes[i, j]
            # LPS arrays: transpose for a radiological axial view
            ax.imshow(vol[:, :, z].T, cmap="gray", vmin=-160, vmax=240)
            ax.contour(m[:, :, z].T, levels=[0.5], colors="r", linewidths=0.7)
            ax.set_title(title, fontsize=9)
            ax.axis("off")
    fig.suptitle("Real (top) vs LesionDiffusion (bottom) sarcomas on held-out CT, HU correction off", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=("train", "evaluate"))
    p.add_argument("--workdir", type=Path, default=Path("/tmp/lesiondiffusion_sarcoma_generator"))
    p.add_argument("--source", type=Path, default=SARCOMA)
    p.add_argument("--bundle", type=Path, default=None, help="evaluate: the bundle (default WORKDIR/bundle)")
    p.add_argument("--vqgan-steps", type=int, default=1200)
    p.add_argument("--lmnet-steps", type=int, default=1500)
    p.add_argument("--linet-steps", type=int, default=1000)
    p.add_argument("--per-case", type=int, default=3, help="evaluate: synthetic lesions per test CT")
    p.add_argument("--ddim-steps", type=int, default=10)
    p.add_argument("--no-diffusion", action="store_true", help="evaluate rule_based only")
    p.add_argument("--generators", default="lesiondiffusion,rule_based", help="evaluate: which generators")
    a = p.parse_args(argv)
    if a.action == "train":
        train(a)
    else:
        if a.bundle is None and not a.no_diffusion:
            a.bundle = a.workdir / "bundle"
        if a.no_diffusion:
            a.bundle = None
        evaluate(a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
