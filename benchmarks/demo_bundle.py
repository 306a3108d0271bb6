"""Reproduce the demo generator bundle: the tiny preset trained on abdominal phantoms (CPU, minutes).

    python benchmarks/demo_bundle.py --out /tmp/demo_bundle [--install]

The phantoms here use other seeds than the demo's and the benchmark's segmentation datasets, so the
generator never sees a lesion it is later tested on. ``--install`` copies the trained bundle into the
package (``lesiondiffusion/data/demo_bundle``) where ``lesiondiffusion demo`` and the few-shot
benchmark find it; the weights are a few MB. Run from a source checkout: this recipe, ``learns.py`` and
``toydata.py`` are benchmarks, not part of the installed package.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import time
from pathlib import Path

import torch

from lesiondiffusion.demo_assets import DEMO_NOTICE, packaged_bundle_dir

log = logging.getLogger(__name__)

# Everything that decides the shipped weights, as data: change a value, re-run, re-install.
RECIPE = {
    "lesion_types": ["liver_tumor", "kidney_tumor"],
    "cases_per_type": 20,
    "n_healthy": 2,
    "shape": [64, 64, 40],
    "spacing": [3.0, 3.0, 4.0],
    "data_seed": 4242,
    "bundle_spacing": 3.0,
    "lmnet_crop": 16,
    "linet_crop": 16,
    "hu_window": [-200.0, 250.0],
    "steps": {"vqgan": 300, "lmnet": 600, "linet": 2000},
    "batch": 4,
    "lr": {"vqgan": 5e-4, "diffusion": 1e-3},
    "seed": 0,
}


def train_demo_bundle(out: Path, recipe: dict = RECIPE, nets: tuple[str, ...] = ("vqgan", "lmnet", "linet"),
                      progress: bool = False) -> dict:
    from lesiondiffusion.bundle import Bundle
    from lesiondiffusion.phantoms import write_phantom_dataset

    from lesiondiffusion.pretrain.common import prep_config
    from lesiondiffusion.pretrain.data import prepare_dataset
    from learns import _train, make_bundle

    out.mkdir(parents=True, exist_ok=True)
    data = write_phantom_dataset(out / "data", n_healthy=recipe["n_healthy"], lesion_types=recipe["lesion_types"],
                                 shape=recipe["shape"], spacing=recipe["spacing"], seed=recipe["data_seed"],
                                 dataset_id=990, name="LDGenerator", cases_per_type=recipe["cases_per_type"],
                                 progress=progress)
    if not (out / "bundle" / "config.yaml").exists():
        make_bundle(out / "bundle", spacing=recipe["bundle_spacing"], lmnet_crop=recipe["lmnet_crop"],
                    linet_crop=recipe["linet_crop"], seed=recipe["seed"], hu_window=tuple(recipe["hu_window"]))
    prepare_dataset(data, out / "cache", prep_config(Bundle.load(out / "bundle")), progress=progress)
    minutes = {}
    for net in nets:
        extra = {"patch": (16, 16, 16), "adv_warmup_steps": recipe["steps"]["vqgan"] // 2} if net == "vqgan" else {}
        lr = recipe["lr"]["vqgan" if net == "vqgan" else "diffusion"]
        log.warning("training %s for %d steps", net, recipe["steps"][net])
        minutes[net] = _train(net, data, out, recipe["steps"][net], recipe["batch"], extra, lr)
    info = {"recipe": recipe, "minutes": minutes,
            "machine": f"{os.cpu_count()}-core CPU, torch threads {torch.get_num_threads()}, "
                       f"load avg {os.getloadavg()[0]:.1f}"}
    (out / "demo_bundle.json").write_text(json.dumps(info, indent=2))
    return info


def _no_hu_correction() -> dict:
    """Pipeline options that leave the generated intensities as the model made them."""
    from dataclasses import fields

    from lesiondiffusion.pipeline import SynthesisConfig

    names = {f.name for f in fields(SynthesisConfig)}
    return {"hu_correction": "off"} if "hu_correction" in names else {"enforce_hu_range": False}


def paired_alignment(bundle: Path, lesion_types: list[str], n: int = 12, seed: int = 77,
                     ddim_steps: int = 10) -> dict:
    """Prompt alignment of a bundle on held-out healthy phantoms, HU correction off, as paired differences.

    For each of ``n`` sampled reports per lesion type, the same report, placement seed and noise seed are
    synthesised twice with only one attribute changed: ``shape`` round-like vs irregular (sphericity and
    convexity of the mask) and ``density`` hyperdense vs hypodense (lesion mean HU minus the surrounding
    organ's). A pair counts when both lesions pass the pipeline's checks.
    """
    import numpy as np

    from bench_steps import paired, phantom_scene
    from lesiondiffusion.catalog import load_catalog
    from lesiondiffusion.pipeline import LesionSynthesizer

    synth = LesionSynthesizer.from_bundle(bundle, device="cpu", ddim_steps=ddim_steps, **_no_hu_correction())
    scene = phantom_scene(n, seed)  # healthy, unseen seeds
    out: dict = {}
    for t in lesion_types:
        r = paired(synth, scene, load_catalog(t), seed)
        failures = r["failed"]
        pairs = {"shape": [np.array(v) for v in zip(r["shape"], r["convexity"])],
                 "density": [np.array([v]) for v in r["contrast"]]}
        res_t = {"failed_pairs": failures}
        if pairs["shape"]:
            d = np.asarray(pairs["shape"])
            res_t["shape"] = {"pairs": len(d), "sphericity_diff": float(d[:, 0].mean()),
                              "sphericity_se": float(d[:, 0].std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else None,
                              "convexity_diff": float(d[:, 1].mean()),
                              "convexity_se": float(d[:, 1].std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else None,
                              "round_more_spherical": int((d[:, 0] > 0).sum()),
                              "round_more_convex": int((d[:, 1] > 0).sum())}
        if pairs["density"]:
            d = np.asarray(pairs["density"])[:, 0]
            res_t["density"] = {"pairs": len(d), "hu_contrast_diff": float(d.mean()),
                                "hu_contrast_se": float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else None,
                                "hyper_brighter": int((d > 0).sum())}
        out[t] = res_t
    return out


def training_set_shapes(data: Path) -> list[tuple[str, str, int, float, float]]:
    """Per (lesion type, shape prompt): lesions, mean and sd of the mask's sphericity in the training set,
    measured like the alignment (``shape_metrics``; largest component). What LMNet can learn to tell apart
    is bounded by how far apart the training masks are and how many of each it sees."""
    import nibabel as nib
    import numpy as np
    from scipy import ndimage

    from lesiondiffusion.evaluation.metrics import shape_metrics
    from lesiondiffusion.errors import DataCheckError
    from lesiondiffusion.safeyaml import read_yaml

    groups: dict[tuple[str, str], list[float]] = {}
    for report_file in sorted((data / "reportsTr").glob("*.yaml")):
        img = nib.load(str(data / "labelsTr" / (report_file.stem + ".nii.gz")))
        labels = np.asarray(img.dataobj)
        for lesion in read_yaml(report_file, "report", DataCheckError).get("lesions") or []:
            comps, n = ndimage.label(labels == lesion["label"])
            if n == 0:
                continue
            largest = 1 + int(np.argmax(ndimage.sum(comps > 0, comps, range(1, n + 1))))
            sph, _ = shape_metrics(comps == largest, img.header.get_zooms()[:3])
            groups.setdefault((lesion["report"]["lesion_type"], lesion["report"]["shape"]), []).append(sph)
    return [(t, shape, len(v), float(np.mean(v)), float(np.std(v))) for (t, shape), v in sorted(groups.items())]


def install(bundle: Path, target: Path | None = None) -> Path:
    """Copy a trained bundle (weights, config, embeddings) into the package, atomically."""
    target = target or packaged_bundle_dir()
    tmp = target.with_name(target.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(bundle, tmp, ignore=shutil.ignore_patterns("*.tmp", "__pycache__"))
    (tmp / "DEMO_WEIGHTS_NOT_FOR_RESEARCH.txt").write_text(DEMO_NOTICE + "\n")
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
    return target


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("/tmp/lesiondiffusion_demo_bundle"))
    p.add_argument("--nets", default="vqgan,lmnet,linet")
    p.add_argument("--threads", type=int, default=1)
    for net in ("vqgan", "lmnet", "linet"):
        p.add_argument(f"--{net}-steps", type=int, default=RECIPE["steps"][net])
    p.add_argument("--install", action="store_true", help="copy OUT/bundle into the package when done")
    p.add_argument("--evaluate-only", action="store_true", help="only the paired prompt alignment of OUT/bundle")
    p.add_argument("--pairs", type=int, default=12, help="paired reports per lesion type in the evaluation")
    p.add_argument("--training-shapes", action="store_true",
                   help="only write the recipe's training phantoms and print their sphericity per shape prompt")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    torch.set_num_threads(a.threads)
    t0 = time.time()
    if a.training_shapes:
        from lesiondiffusion.phantoms import write_phantom_dataset

        r = RECIPE
        data = write_phantom_dataset(a.out / "data", n_healthy=r["n_healthy"], lesion_types=r["lesion_types"],
                                     shape=r["shape"], spacing=r["spacing"], seed=r["data_seed"], dataset_id=990,
                                     name="LDGenerator", cases_per_type=r["cases_per_type"], progress=False)
        print("| lesion type | shape prompt | training lesions | sphericity mean ± sd |\n| --- | --- | ---: | --- |")
        for t, shape, n, mean, sd in training_set_shapes(data):
            print(f"| {t} | {shape} | {n} | {mean:.3f} ± {sd:.3f} |")
        return 0
    if a.evaluate_only:
        res = paired_alignment(a.out / "bundle", RECIPE["lesion_types"], n=a.pairs)
        print(json.dumps(res, indent=1))
        (a.out / "alignment.json").write_text(json.dumps(res, indent=2))
        return 0
    recipe = dict(RECIPE, steps={n: getattr(a, f"{n}_steps") for n in ("vqgan", "lmnet", "linet")})
    info = train_demo_bundle(a.out, recipe, nets=tuple(a.nets.split(",")))
    print(f"trained in {(time.time() - t0) / 60:.1f} min ({info['machine']}): "
          + ", ".join(f"{k} {v:.1f} min" for k, v in info["minutes"].items()))
    if a.install:
        print(f"installed: {install(a.out / 'bundle')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
