"""Few-shot phantom Table 1 / Table 2: does nnU-Net segment lesions better with synthetic lesions?

    python benchmarks/fewshot_table1.py --workdir /tmp/fewshot [--seeds 0,1,2] [--k 2]

Writes a few-shot phantom dataset (K real lesion cases per type, H healthy templates, 12 held-out test
cases per type), then trains nnU-Net with the CPU recipe (``*_fewshotcpu``: 2d, small network, AdamW,
500 iterations) in every setting -- real only; synthetic only; synthetic then real -- for each generator
(LesionDiffusion with the shipped demo bundle, the rule-based baseline, LesionDiffusion with null prompts)
and seed, and prints mean +- sd over seeds of the test Dice (``lesiondiffusion.fewshot.FewShotStudy``, the
few-shot preset of ``lesiondiffusion evaluate segmentation``; tables in WORKDIR/segmentation_dice.{csv,md,png}).
Finished runs are reused: re-run to resume.
Budget: 100 min measured on a 2-core CPU shared with a CI run (caches 27 min, 21 trainings two at a time:
68 min); the trainings take about half as long on an idle machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from lesiondiffusion.fewshot import GENERATORS, FewShotData, FewShotStudy, write_fewshot_dataset
    from lesiondiffusion.nnunet_integration.discovery import with_ext_trainer
    from lesiondiffusion.demo_assets import packaged_bundle_dir

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/lesiondiffusion_fewshot"))
    p.add_argument("--types", default="liver_tumor", help="lesion types (catalog names), comma-separated")
    p.add_argument("--k", type=int, default=2, help="real lesion cases per type")
    p.add_argument("--healthy", type=int, default=8, help="healthy templates")
    p.add_argument("--test", type=int, default=12, help="test cases per type")
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--generators", default=",".join(GENERATORS))
    p.add_argument("--settings", default="real,synthetic,synthetic_real")
    p.add_argument("--synthetic-cases", type=int, default=150,
                   help="offline cache size per generator (0: on-the-fly producer)")
    p.add_argument("--bundle", type=Path, default=None, help="generator bundle (default: the shipped demo bundle)")
    p.add_argument("--ddim-steps", type=int, default=10)
    p.add_argument("--pretrain-fraction", type=float, default=0.5, help="share of iterations pretrained on synthetic")
    # pure synthetic pretraining, as the method (0.5 with 30 cases was measured too: no gain, docs/fewshot.md)
    p.add_argument("--synthetic-probability", type=float, default=1.0, help="synthetic share during pretraining")
    p.add_argument("--finetune-synthetic-probability", type=float, default=0.0,
                   help="synthetic share during real fine-tuning")
    # off: the shift would restore the catalog's density for the text-ablated generator too (Table 2)
    p.add_argument("--hu-correction", default="off", help="generator HU correction (off|shift|clip)")
    p.add_argument("--configuration", default="2d")
    p.add_argument("--trainer-suffix", default="_fewshotcpu")
    p.add_argument("--parallel", type=int, default=2, help="nnU-Net trainings at once")
    a = p.parse_args(argv)

    t0 = time.time()
    data = FewShotData(lesion_types=tuple(a.types.split(",")), k_real=a.k, n_healthy=a.healthy,
                       n_test_per_type=a.test, seed=a.data_seed)
    raw = a.workdir / "nnUNet_raw"
    ds = write_fewshot_dataset(raw, data, progress=False)
    print(f"dataset {ds}: K={a.k} lesion cases per type, {a.healthy} healthy, {a.test} test cases per type "
          f"({time.time() - t0:.0f} s)", flush=True)
    study = FewShotStudy(
        workdir=a.workdir, dataset_dir=ds, bundle=a.bundle or packaged_bundle_dir(),
        generators=tuple(a.generators.split(",")),
        settings=tuple(a.settings.split(",")), seeds=tuple(int(s) for s in a.seeds.split(",")),
        configuration=a.configuration, trainer_suffix=a.trainer_suffix,
        synthetic_cases=a.synthetic_cases or None, ddim_steps=a.ddim_steps, hu_correction=a.hu_correction,
        pretrain_fraction=a.pretrain_fraction, synthetic_probability=a.synthetic_probability,
        finetune_synthetic_probability=a.finetune_synthetic_probability,
        parallel=a.parallel, echo=lambda m: print(m, flush=True), env=with_ext_trainer(os.environ))
    out = study.run()
    minutes = (time.time() - t0) / 60
    print()
    print(out.paths["markdown"].read_text())
    print(f"K={a.k}, {len(study.seeds)} seeds, recipe {a.configuration}{a.trainer_suffix}, "
          f"{a.synthetic_cases or 'on-the-fly'} synthetic cases per generator")
    print(f"total {minutes:.1f} min on {os.cpu_count()}-core CPU (load avg {os.getloadavg()[0]:.1f}); "
          f"table {out.paths['markdown']}, chart {out.paths['png']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
