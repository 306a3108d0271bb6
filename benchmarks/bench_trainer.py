"""Seconds per training iteration: plain nnU-Net vs nnUNetTrainerLesionDiffusion (warm and cold store).

Builds a small phantom dataset, plans/preprocesses it with nnU-Net's CLI, then times
``train_step(next(dataloader_train))`` for each trainer on the same plans in one process and prints
the ratios and the store's hit rate over the timed window.

    python benchmarks/bench_trainer.py                       # rule-based generator, plans network, CPU
    python benchmarks/bench_trainer.py --backend lesiondiffusion --bundle BUNDLE --device cuda
    python benchmarks/bench_trainer.py --tiny --iters 20     # tiny network: data path dominates

The unthrottled store rows set ``store.budget: null``; the ``budget`` rows let the producer throttle
itself online (``lesiondiffusion.store.ThrottleController``) and print what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DATASET_ID = 951
NAME = "LDBench"
DS = f"Dataset{DATASET_ID}_{NAME}"


def prepare(root: Path, n_healthy: int, shape: tuple[int, int, int]) -> None:
    from lesiondiffusion.phantoms import write_phantom_dataset

    if (root / "pre" / DS / "nnUNetPlans.json").is_file():
        return
    write_phantom_dataset(root / "raw", n_healthy=n_healthy, lesion_types=["kidney_tumor"], shape=shape,
                          spacing=(2.0, 2.0, 3.0), seed=0, dataset_id=DATASET_ID, name=NAME, cases_per_type=2)
    env = dict(os.environ, nnUNet_n_proc_DA="1")
    subprocess.run([str(Path(sys.executable).parent / "nnUNetv2_plan_and_preprocess"), "-d", str(DATASET_ID),
                    "-c", "3d_fullres", "-np", "1"], env=env, check=True, capture_output=True)


def make_trainer(cls, root: Path, device: str):
    import torch

    pre = root / "pre" / DS
    plans = json.loads((pre / "nnUNetPlans.json").read_text())
    plans["continue_training"] = False
    dataset_json = json.loads((pre / "dataset.json").read_text())
    return cls(plans, "3d_fullres", 0, dataset_json, device=torch.device(device))


def time_iters(trainer, iters: int, warmup_iters: int) -> float:
    for _ in range(warmup_iters):
        trainer.train_step(next(trainer.dataloader_train))
    if trainer.device.type == "cuda":
        import torch

        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        trainer.train_step(next(trainer.dataloader_train))
    if trainer.device.type == "cuda":
        import torch

        torch.cuda.synchronize()
    return (time.perf_counter() - t) / iters


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", help="work folder (default: a temp folder)")
    ap.add_argument("--backend", default="rule_based", choices=["rule_based", "lesiondiffusion"])
    ap.add_argument("--bundle", help="bundle folder for --backend lesiondiffusion")
    ap.add_argument("--gen-device", default="cpu", help="generator device")
    ap.add_argument("--device", default="cpu", help="training device (cpu|cuda)")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup-iters", type=int, default=2)
    ap.add_argument("--store-size", type=int, default=16)
    ap.add_argument("--reuse", type=int, default=8)
    ap.add_argument("--n-proc-da", type=int, default=0, help="nnUNet_n_proc_DA for the runs")
    ap.add_argument("--tiny", action="store_true", help="tiny network (smoke trainers)")
    ap.add_argument("--shape", type=int, nargs=3, default=(48, 48, 32))
    ap.add_argument("--budgets", type=float, nargs="*", default=[0.05],
                    help="store.budget values to time beside the unthrottled store (default 0.05)")
    ap.add_argument("--options", default="{}", help="JSON generator options, e.g. '{\"ddim_steps\": 10}'")
    args = ap.parse_args()

    root = Path(args.root) if args.root else Path(tempfile.mkdtemp(prefix="ld_bench_"))
    os.environ.update({"nnUNet_raw": str(root / "raw"), "nnUNet_preprocessed": str(root / "pre"),
                       "nnUNet_results": str(root / "res"), "nnUNet_compile": "false"})
    t0 = time.perf_counter()
    prepare(root, 4, tuple(args.shape))
    print(f"dataset + nnU-Net planning/preprocessing: {time.perf_counter() - t0:.1f} s ({root})")
    os.environ["nnUNet_n_proc_DA"] = str(args.n_proc_da)

    import torch
    import yaml

    from lesiondiffusion.nnunet_integration import trainers as T
    from lesiondiffusion.nnunet_integration.variants import tiny_network as V

    torch.set_num_threads(max(1, min(os.cpu_count() or 1, 4)))
    plain_cls = V.nnUNetTrainer_tinynet_2epochs_3iters if args.tiny else T.nnUNetTrainer
    ld_cls = V.nnUNetTrainerLesionDiffusion_tinynet_2epochs_3iters if args.tiny else T.nnUNetTrainerLesionDiffusion
    generator = {"backend": args.backend, "device": args.gen_device, "options": json.loads(args.options)}
    if args.bundle:
        generator["bundle"] = args.bundle
    results: dict[str, dict] = {}

    def run(label: str, cls, warmup_cases: int | None, budget: float | None = None) -> None:
        if warmup_cases is not None:
            cfg = {"generator": generator, "catalogs": [{"name": "kidney_tumor"}], "synthetic_probability": 1.0,
                   "schedule": {"pretrain_fraction": 1.0},
                   "store": {"size": args.store_size, "reuse": args.reuse, "warmup": warmup_cases, "budget": budget}}
            path = root / f"{label}.yaml"
            path.write_text(yaml.safe_dump(cfg))
            os.environ["LESIONDIFFUSION_CONFIG"] = str(path)
        tr = make_trainer(cls, root, args.device)
        t = time.perf_counter()
        tr.on_train_start()
        start_s = time.perf_counter() - t
        tr.on_train_epoch_start()
        before = tr.ld_store.stats() if getattr(tr, "ld_store", None) else None
        sec = time_iters(tr, args.iters, args.warmup_iters if warmup_cases != 0 else 0)
        row = {"s_per_iter": sec, "start_s": start_s}
        if before is not None:
            d = tr.ld_store.stats().minus(before)
            row.update(hit_rate=d.hit_rate, fresh=d.fresh, reused=d.reused, missed=d.missed, failed=d.failed,
                       produced=d.produced)
            if tr.ld_throttle is not None:
                row["throttle"] = tr.ld_throttle.summary()
            tr._ld_shutdown()
        elif hasattr(tr, "dataloader_train") and hasattr(tr.dataloader_train, "_finish"):
            tr.dataloader_train._finish()
        results[label] = row

    run("plain nnUNetTrainer", plain_cls, None)
    run("LesionDiffusion warm store", ld_cls, args.store_size)
    run("LesionDiffusion cold store", ld_cls, 0)
    for budget in args.budgets:
        run(f"warm store, budget {100 * budget:g}%", ld_cls, args.store_size, budget)
        run(f"cold store, budget {100 * budget:g}%", ld_cls, 0, budget)

    base = results["plain nnUNetTrainer"]["s_per_iter"]
    dev = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    print(f"\nmachine: {dev}; backend {args.backend} on {args.gen_device}; network "
          f"{'tiny' if args.tiny else 'plans'}; nnUNet_n_proc_DA={args.n_proc_da}; {args.iters} timed iterations; "
          f"store size {args.store_size}, reuse {args.reuse}")
    print(f"{'trainer':32s} {'s/iter':>8s} {'ratio':>6s} {'start s':>8s} {'hit rate':>9s} {'fresh/reused/missed':>20s} "
          f"{'produced':>8s}")
    for label, r in results.items():
        hr = f"{100 * r['hit_rate']:.0f}%" if "hit_rate" in r else "-"
        frm = f"{r['fresh']}/{r['reused']}/{r['missed']}" if "fresh" in r else "-"
        print(f"{label:32s} {r['s_per_iter']:8.3f} {r['s_per_iter'] / base:6.2f} {r['start_s']:8.1f} {hr:>9s} {frm:>20s} "
              f"{r.get('produced', '-'):>8}")
    for label, r in results.items():
        if "throttle" in r:
            print(f"  {label}: {r['throttle']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
