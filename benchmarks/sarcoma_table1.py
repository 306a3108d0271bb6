"""Table 1 on real CT: nnU-Net segments soft-tissue sarcomas, with and without synthetic sarcomas.

    python benchmarks/sarcoma_table1.py --workdir /tmp/sts --bundle BUNDLE [--k 2,9] [--seeds 0,1,2]

Data: the 26 IBSI/TCIA sarcoma CTs in ../shared/data/ct/ibsi_sts_sarcoma (CT + clinician mask, no report,
no organ map). The split is fixed once (``split_cases``): case ids sorted, the i-th goes to the generator
pool if i % 3 == 0 (9 cases: the bundle trained on these only, benchmarks/sarcoma_generator.py), the
segmentation pool if i % 3 == 1 (9) and the test set if i % 3 == 2 (8). The three are disjoint.

For each K (real labelled cases, the first K of the segmentation pool) a dataset is imported the way a user
imports theirs (``lesiondiffusion dataset import``: tissue maps from HU as organ maps) with the 8 test cases
as imagesTs/labelsTs, and nnU-Net is trained with the CPU recipe (``*_fewshotcpu``, 2d) in the settings
real only; synthetic only; synthetic then real (one flag, ``nnUNetTrainerLesionDiffusion``), each synthetic
setting with the real-CT generator (``lesiondiffusion``, HU correction off) and ``rule_based``, and, with
``--generators ...,no_lesion``, the control: the same schedule and the same template crops as ``rule_based``
with no lesion inpainted (what the extra crops alone give). Synthetic
lesions go into the training cases' own CT (``templates.dataset_lesion_cases``: muscle at least 10 mm away
from the real tumour, which stays labelled), so every run sees exactly the same real tumours.
``--reference`` adds real only on the generator pool + the segmentation pool (18 cases).

Tables: WORKDIR/K<k>/segmentation_dice.{md,csv,png}; paired differences per seed: WORKDIR/table1.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

SARCOMA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ct" / "ibsi_sts_sarcoma"


DATASET_IDS = {2: 960, 9: 961}  # other K: 970 + K; the reference (generator + segmentation pool): 969


def split_cases(source: Path = SARCOMA) -> dict[str, list[str]]:
    """The fixed split: sorted case ids, i % 3 -> generator pool / segmentation pool / test set."""
    ids = sorted(p.name for p in source.iterdir() if p.is_dir() and (p / "ct.nii.gz").is_file())
    return {"generator": ids[0::3], "segmentation": ids[1::3], "test": ids[2::3]}


def write_dataset(raw: Path, dataset_id: int, name: str, train: list[str], test: list[str], source: Path) -> Path:
    """nnU-Net raw dataset: imported training cases (+ organsTr tissue maps) and the test set as imagesTs."""
    from lesiondiffusion.dataset_import import import_mask_dataset

    out = raw / f"Dataset{dataset_id:03d}_{name}"
    if (out / "dataset.json").is_file() and (out / "imagesTs").is_dir():
        meta = json.loads((out / "dataset.json").read_text())
        if meta.get("sarcoma_split") == {"train": train, "test": test}:
            return out
    shutil.rmtree(out, ignore_errors=True)
    tmp = raw / f".tmp_test_{dataset_id}"
    shutil.rmtree(tmp, ignore_errors=True)
    import_mask_dataset(source, out, "soft_tissue_sarcoma", mask="{case}/gtv.nii.gz", cases=train)
    import_mask_dataset(source, tmp, "soft_tissue_sarcoma", mask="{case}/gtv.nii.gz", cases=test)
    (tmp / "imagesTr").rename(out / "imagesTs")
    (tmp / "labelsTr").rename(out / "labelsTs")
    shutil.rmtree(tmp)
    meta = json.loads((out / "dataset.json").read_text())
    meta["sarcoma_split"] = {"train": train, "test": test}
    (out / "dataset.json").write_text(json.dumps(meta, indent=2))
    return out


def paired_table(workdir: Path, ks: list[int]) -> str:
    """Per K: Dice of each setting per seed and its difference to real only with the same seed, read from
    every finished run's result.json (so runs from several invocations and partial studies all count).
    When the no_lesion control ran, each synthetic row also gets its difference to the control with the
    same setting and seed: what the synthetic lesions add beyond the extra template crops."""
    import numpy as np

    lines = ["| K | setting | generator | seeds | Dice per seed (%) | mean ± sd (%) | Δ vs real, same seed | higher "
             "| Δ vs no_lesion control, same seed | higher |",
             "| --- | --- | --- | --- | --- | ---: | --- | ---: | --- | ---: |"]

    def deltas(by_seed: dict[int, float], ref: dict[int, float]) -> tuple[str, str]:
        d = [by_seed[s] - ref[s] for s in sorted(by_seed) if s in ref]
        if not d:
            return "", ""
        return ", ".join(f"{100 * v:+.1f}" for v in d), f"{sum(v > 0 for v in d)}/{len(d)}"

    for k in ks:
        table: dict[tuple[str, str], dict[int, float]] = {}
        for path in sorted((workdir / f"K{k}" / "runs").glob("*/result.json")):
            r = json.loads(path.read_text())
            if not r.get("dice"):
                continue
            value = float(np.mean(list(r["dice"].values())))
            table.setdefault((r["setting"], r.get("generator") or "-"), {})[int(r["seed"])] = value
        real = table.get(("real", "-"), {})
        order = sorted(table, key=lambda t: (t[0] != "real", t[0], t[1] != "no_lesion", t[1]))
        for setting, gen in order:
            by_seed = table[(setting, gen)]
            seeds = sorted(by_seed)
            got = [by_seed[s] for s in seeds]
            sd = 100 * np.std(got, ddof=1) if len(got) > 1 else float("nan")
            vs_real = deltas(by_seed, real) if setting != "real" else ("", "")
            control = table.get((setting, "no_lesion"), {})
            vs_control = deltas(by_seed, control) if setting != "real" and gen != "no_lesion" else ("", "")
            lines.append(f"| {k} | {setting} | {gen} | {','.join(map(str, seeds))} | "
                         + ", ".join(f"{100 * v:.1f}" for v in got) + f" | {100 * np.mean(got):.1f} ± {sd:.1f} | "
                         + " | ".join(vs_real + vs_control) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from lesiondiffusion.fewshot import FewShotStudy
    from lesiondiffusion.nnunet_integration.discovery import with_ext_trainer

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/lesiondiffusion_sarcoma"))
    p.add_argument("--source", type=Path, default=SARCOMA)
    p.add_argument("--bundle", type=Path, default=None, help="the real-CT generator (benchmarks/sarcoma_generator.py)")
    p.add_argument("--k", default="2,9", help="real labelled cases from the segmentation pool, comma-separated")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--generators", default="lesiondiffusion,rule_based")
    p.add_argument("--settings", default="real,synthetic,synthetic_real")
    p.add_argument("--synthetic-cases", type=int, default=60, help="offline cache size per generator")
    p.add_argument("--ddim-steps", type=int, default=10)
    p.add_argument("--pretrain-fraction", type=float, default=0.5)
    p.add_argument("--configuration", default="2d")
    p.add_argument("--trainer-suffix", default="_fewshotcpu")
    p.add_argument("--parallel", type=int, default=2)
    p.add_argument("--reference", action="store_true", help="also real only on generator + segmentation pool")
    p.add_argument("--table-only", action="store_true", help="print the paired table of the finished runs and stop")
    a = p.parse_args(argv)
    seeds = tuple(int(s) for s in a.seeds.split(","))
    gens = tuple(g for g in a.generators.split(",") if g)
    if "lesiondiffusion" in gens and a.bundle is None and not a.table_only:
        p.error("--bundle is needed for the lesiondiffusion generator (or --generators rule_based)")

    t0 = time.time()
    split = split_cases(a.source)
    print("split:", json.dumps(split), flush=True)
    raw = a.workdir / "nnUNet_raw"
    ks = [int(k) for k in a.k.split(",")]
    # one nnU-Net id per K, whatever else is asked for: two invocations with different --k share nnUNet_raw,
    # and an id given to two dataset names makes every nnU-Net command on either of them fail
    jobs = [(k, split["segmentation"][:k], DATASET_IDS.get(k, 970 + k)) for k in ks]
    if a.reference:
        jobs.append((len(split["generator"]) + len(split["segmentation"]), split["generator"] + split["segmentation"], 969))
    if a.table_only:  # the table from whatever runs have finished
        print(paired_table(a.workdir, [k for k, _, _ in jobs]))
        return 0
    for k, train, did in jobs:
        ds = write_dataset(raw, did, f"STSK{k}", train, split["test"], a.source)
        reference = did == 969
        study = FewShotStudy(
            workdir=a.workdir / f"K{k}", dataset_dir=ds, bundle=a.bundle,
            generators=gens if not reference else ("rule_based",),
            settings=tuple(a.settings.split(",")) if not reference else ("real",),
            seeds=seeds, configuration=a.configuration, trainer_suffix=a.trainer_suffix,
            synthetic_cases=a.synthetic_cases, ddim_steps=a.ddim_steps, hu_correction="off",
            pretrain_fraction=a.pretrain_fraction, synthetic_probability=1.0, finetune_synthetic_probability=0.0,
            parallel=a.parallel, echo=lambda m: print(m, flush=True),
            env=with_ext_trainer(os.environ),
            extra_config={"templates": {"dataset_healthy": False, "dataset_lesion_cases": True,
                                        "lesion_exclusion_mm": 10.0, "organ_mapping": str(ds / "tissue_labels.json")},
                          "catalogs": [{"name": "soft_tissue_sarcoma", "label": "soft_tissue_sarcoma"}]})
        out = study.run()
        print(out.paths["markdown"].read_text(), flush=True)
    table = paired_table(a.workdir, [k for k, _, _ in jobs])
    (a.workdir / "table1.md").write_text(table + "\n")
    print(table)
    print(f"total {(time.time() - t0) / 60:.1f} min on {os.cpu_count()}-core CPU (load avg {os.getloadavg()[0]:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
