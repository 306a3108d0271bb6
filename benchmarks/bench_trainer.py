"""Seconds per training iteration: plain nnU-Net vs nnUNetTrainerLesionDiffusion, interleaved.

Builds a small phantom dataset, plans/preprocesses it with nnU-Net's CLI, sets up one plain trainer and
one LesionDiffusion trainer per row (paused store; warm and cold store with ``store.budget``), then times
``train_step(next(dataloader_train))`` in windows that alternate plain, row, plain, row, ... so that
drift of a shared machine hits both alike. It prints the plain windows' own spread (the noise floor),
each row's median and every window's ratio to the plain median, the throttle controller's estimate
beside the measured ratio, the training process's CPU time per iteration relative to plain and the
producer's CPU seconds per iteration (both independent of the machine's load), and how many cases the
budget allowed. A producer works only inside its own row's windows (paused otherwise); its start-up
(spawn, imports, templates, bundle) is reported, not timed.

    python benchmarks/bench_trainer.py --tiny --backend lesiondiffusion \
        --bundle src/lesiondiffusion/data/demo_bundle --options '{"ddim_steps": 4}' --iters 30 --repeats 3
    python benchmarks/bench_trainer.py --backend lesiondiffusion --bundle BUNDLE --device cuda --gen-device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", help="work folder (default: a temp folder)")
    ap.add_argument("--backend", default="rule_based", choices=["rule_based", "lesiondiffusion"])
    ap.add_argument("--bundle", help="bundle folder for --backend lesiondiffusion")
    ap.add_argument("--gen-device", default="cpu", help="generator device")
    ap.add_argument("--device", default="cpu", help="training device (cpu|cuda)")
    ap.add_argument("--iters", type=int, default=10, help="timed iterations per window")
    ap.add_argument("--repeats", type=int, default=3, help="windows per row (each between two plain windows)")
    ap.add_argument("--warmup-iters", type=int, default=1, help="untimed iterations at the start of every window")
    ap.add_argument("--warmup-cases", type=int, default=4, help="cases the warm rows wait for before timing")
    ap.add_argument("--ready-timeout", type=float, default=600, help="seconds to wait for a producer's start-up")
    ap.add_argument("--unthrottled", action="store_true", help="also time warm and cold stores without a budget")
    ap.add_argument("--store-size", type=int, default=16)
    ap.add_argument("--reuse", type=int, default=8)
    ap.add_argument("--n-proc-da", type=int, default=0, help="nnUNet_n_proc_DA for the runs")
    ap.add_argument("--tiny", action="store_true", help="tiny network (smoke trainers)")
    ap.add_argument("--shape", type=int, nargs=3, default=(48, 48, 32))
    ap.add_argument("--budgets", type=float, nargs="*", default=[0.05],
                    help="store.budget values to time beside the unthrottled store (default 0.05)")
    ap.add_argument("--settle-iters", type=int, default=150,
                    help="untimed iterations per throttled row before its first window, producer on, so its "
                         "controller has fitted the producer's cost (a real run has thousands of iterations)")
    ap.add_argument("--dump-samples", type=Path, default=None,
                    help="write every throttle observation (row, iteration seconds, busy share, duty, producer CPU "
                         "seconds so far) to this JSON file, to study the controller")
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
    load0 = os.getloadavg()

    # every row is one trainer, set up once; its windows alternate with plain windows (ABAB...), so slow
    # drift of the machine (neighbours, thermal) hits plain and LesionDiffusion alike, and the plain
    # windows' own spread is the noise floor the ratios are read against
    dumped: list[dict] = []
    rows: list[Row] = [Row("plain nnUNetTrainer", make_started(plain_cls, root, args.device), plain=True)]
    specs = [("paused store (empty, duty 0)", 0, None, True)]
    for budget in args.budgets:
        specs += [(f"warm store, budget {100 * budget:g}%", min(args.warmup_cases, args.store_size), budget, False),
                  (f"cold store, budget {100 * budget:g}%", 0, budget, False)]
    if args.unthrottled:
        specs += [("warm store, no budget", min(args.warmup_cases, args.store_size), None, False),
                  ("cold store, no budget", 0, None, False)]
    # rows without a warm-up first: their producers start (spawn, imports, bundle) in parallel, paused,
    # while a warm row's on_train_start waits for its warm-up cases
    specs.sort(key=lambda spec: spec[1] > 0)
    for label, warmup, budget, paused in specs:
        cfg = {"generator": generator, "catalogs": [{"name": "kidney_tumor"}], "synthetic_probability": 1.0,
               "schedule": {"pretrain_fraction": 1.0},
               "store": {"size": args.store_size, "reuse": args.reuse, "warmup": warmup, "budget": budget,
                         "warmup_timeout_s": args.ready_timeout}}
        path = root / f"{label.split(',')[0].replace(' ', '_')}_{budget}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        os.environ["LESIONDIFFUSION_CONFIG"] = str(path)
        t = time.perf_counter()
        tr = make_started(ld_cls, root, args.device)
        tr.ld_store.throttle.set_duty(0.0)  # every producer rests outside its own windows
        rows.append(Row(label, tr, start_s=t, paused=paused, warmup=warmup))
        if args.dump_samples is not None and getattr(tr, "ld_throttle", None) is not None:
            record_observations(rows[-1], dumped)
    for row in rows[1:]:
        # the producer's start-up (spawn, imports, templates, bundle) is a one-off cost of seconds, not a
        # per-iteration one: it is reported here and kept out of the timed windows
        row.trainer.ld_store.wait_ready(args.ready_timeout)
        row.start_s = time.perf_counter() - row.start_s
        row.startup_cpu_s = producer_cpu(row.trainer.ld_store)
    for row in rows[1:]:
        ctl = getattr(row.trainer, "ld_throttle", None)
        if ctl is None or row.paused or args.settle_iters <= 0:
            continue
        # the controller's first fit needs idle and busy iterations (its first probe comes after 20): time
        # the steady state a long run lives in, not the first minute, and say what the controller found
        row.trainer.ld_store.throttle.set_duty(ctl.duty)
        ctl.reset_clock()
        for _ in range(args.settle_iters):
            row.trainer.train_step(next(row.trainer.dataloader_train))
        row.trainer.ld_store.throttle.set_duty(0.0)
        print(f"{row.label}: after {args.settle_iters} untimed iterations: {ctl.summary()}")
    print(f"set-up of {len(rows)} trainers: {time.perf_counter() - t0:.0f} s; load average {os.getloadavg()[0]:.2f}")

    sequence = []  # (row, window) in the order timed: plain, row, plain, row, ..., plain
    for r in range(args.repeats):
        for row in rows[1:]:
            sequence.append((rows[0], time_window(rows[0], args.iters, args.warmup_iters)))
            sequence.append((row, time_window(row, args.iters, args.warmup_iters)))
    sequence.append((rows[0], time_window(rows[0], args.iters, args.warmup_iters)))  # a plain window after the last
    for i, (row, w) in enumerate(sequence):
        if not row.plain:  # against the plain windows just before and after it: drift cancels
            w["paired"] = w["s"] / ((sequence[i - 1][1]["s"] + sequence[i + 1][1]["s"]) / 2)
    load1 = os.getloadavg()
    if args.dump_samples is not None:
        args.dump_samples.write_text(json.dumps(dumped))
    for row in rows[1:]:
        row.trainer._ld_shutdown()

    dev = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    print(f"\nmachine: {dev}; load average {load0[0]:.2f} at start, {load1[0]:.2f} at the end (1 min; 5 min "
          f"{load1[1]:.2f}); backend {args.backend} on {args.gen_device}; network {'tiny' if args.tiny else 'plans'}; "
          f"nnUNet_n_proc_DA={args.n_proc_da}; torch threads {torch.get_num_threads()}; {args.repeats} x "
          f"{args.iters} timed iterations per row, interleaved with plain windows; store size {args.store_size}, "
          f"reuse {args.reuse}")
    plain = rows[0].windows
    med = statistics.median(w["s"] for w in plain)
    spread = [w["s"] / med for w in plain]
    print(f"plain nnUNetTrainer: {len(plain)} windows, median {med:.3f} s/iter, each window / median: "
          + " ".join(f"{v:.2f}" for v in spread)
          + f" (range {100 * (min(spread) - 1):+.0f}% .. {100 * (max(spread) - 1):+.0f}%; this is the noise floor)")
    print(f"{'row':32s} {'s/iter':>7s} {'ratio':>6s} {'windows / plain median':>24s} {'paired':>12s} {'est.':>6s} "
          f"{'train cpu':>9s} "
          f"{'prod cpu':>8s} {'produced':>8s} {'fresh/reused/missed':>19s} {'start s':>7s}")
    cpu_plain = statistics.median(w["cpu"] for w in plain)
    for row in rows:
        ws = row.windows
        m = statistics.median(w["s"] for w in ws)
        est = [w["estimate"] for w in ws if w.get("estimate") is not None]
        est_s = f"{1 + statistics.median(est):.2f}" if est else "-"
        per = " ".join(f"{w['s'] / med:.2f}" for w in ws)
        frm = "-" if row.plain else "/".join(str(sum(w[k] for w in ws)) for k in ("fresh", "reused", "missed"))
        prod = "-" if row.plain else str(sum(w["produced"] for w in ws))
        pcpu = "-" if row.plain else f"{100 * statistics.median(w['producer_cpu'] / (w['s'] * args.iters) for w in ws):.1f}%"
        paired = "-" if row.plain else " ".join(f"{w['paired']:.2f}" for w in ws)
        print(f"{row.label:32s} {m:7.3f} {m / med:6.2f} {per:>24s} {paired:>12s} {est_s:>6s} "
              f"{statistics.median(w['cpu'] for w in ws) / cpu_plain:9.2f} {pcpu:>8s} {prod:>8s} {frm:>19s} "
              f"{row.start_s:7.1f}")
    print("ratio: row median / plain median; paired: each window / the mean of the plain windows just before and "
          "after it; est.: the throttle controller's own estimate for the timed iterations "
          "(1 + estimated overhead); train cpu: the training process's CPU time per iteration relative to plain; "
          "prod cpu: the producer's CPU seconds per wall second of its windows (share of one core); start s: "
          "trainer + producer start-up (+ warm-up cases), not timed")
    pc = [w["cpu"] / cpu_plain for w in plain]
    print(f"plain training cpu per iteration: median {cpu_plain:.3f} s, windows / median {min(pc):.2f} .. {max(pc):.2f}")
    for row in rows[1:]:
        if row.startup_cpu_s is not None:
            print(f"  {row.label}: producer start-up (and warm-up cases) {row.startup_cpu_s:.1f} CPU s before its "
                  "first window")
        ctl = row.trainer.ld_throttle
        if ctl is not None:
            produced = sum(w["produced"] for w in row.windows)
            print(f"  {row.label}: {ctl.summary()}; it allowed {produced} synthetic cases in "
                  f"{len(row.windows) * args.iters} timed iterations")
            if produced == 0:
                why = ("the budget allowed NO synthesis" if ctl.duty < 1.0 else
                       "NO synthesis finished although the budget did not throttle the producer (duty 1: it is "
                       "slower than the windows are long)")
                print(f"  {row.label}: {why} in the timed windows (0 cases); every synthetic draw reused a stored "
                      "case or fell back to a real one")
    return 0


class Row:
    def __init__(self, label: str, trainer, *, plain: bool = False, start_s: float = 0.0,
                 startup_cpu_s: float | None = None, paused: bool = False, warmup: int = 0) -> None:
        self.label, self.trainer, self.plain, self.start_s = label, trainer, plain, start_s
        self.startup_cpu_s, self.paused, self.warmup = startup_cpu_s, paused, warmup
        self.windows: list[dict] = []


def make_started(cls, root: Path, device: str):
    tr = make_trainer(cls, root, device)
    tr.on_train_start()
    tr.on_train_epoch_start()
    return tr


def record_observations(row: "Row", out: list[dict]) -> None:
    """Wrap the row's throttle controller so every observation is also appended to ``out`` with the
    producer's CPU seconds so far (the controller itself sees only busy wall seconds)."""
    ctl, store = row.trainer.ld_throttle, row.trainer.ld_store
    observe = ctl.observe

    def recording(seconds: float, busy_share: float) -> None:
        observe(seconds, busy_share)
        out.append({"row": row.label, "window": len(row.windows), "s": seconds, "f": busy_share,
                    "duty": ctl.throttle.duty, "producer_cpu": producer_cpu(store)})

    ctl.observe = recording


def producer_cpu(store) -> float | None:
    """CPU seconds the producer process has used so far (user + system), from /proc; None for a thread."""
    pid = getattr(store._runner, "pid", None)
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError, TypeError):
        return None


def time_window(row: Row, iters: int, warmup_iters: int) -> dict:
    """Time ``iters`` training iterations of one row; its producer works only inside its own windows."""
    tr = row.trainer
    store = getattr(tr, "ld_store", None)
    ctl = getattr(tr, "ld_throttle", None)
    if store is not None and not row.paused:
        store.throttle.set_duty(ctl.duty if ctl is not None else 1.0)
    if ctl is not None:
        ctl.reset_clock()
    for _ in range(warmup_iters):
        tr.train_step(next(tr.dataloader_train))
    before = store.stats() if store is not None else None
    p0 = producer_cpu(store) if store is not None else None
    if tr.device.type == "cuda":
        import torch

        torch.cuda.synchronize()
    t, c = time.perf_counter(), time.process_time()
    for _ in range(iters):
        tr.train_step(next(tr.dataloader_train))
    if tr.device.type == "cuda":
        import torch

        torch.cuda.synchronize()
    w = {"s": (time.perf_counter() - t) / iters, "cpu": (time.process_time() - c) / iters}
    if store is not None:
        d = store.stats().minus(before)
        p1 = producer_cpu(store)
        w.update(fresh=d.fresh, reused=d.reused, missed=d.missed, produced=d.produced,
                 producer_cpu=(p1 - p0) if p0 is not None and p1 is not None else float("nan"))
        if ctl is not None:
            w["estimate"] = ctl.estimated_overhead(last=iters)
        store.throttle.set_duty(0.0)
    row.windows.append(w)
    print(f"window: {row.label}: {w['s']:.3f} s/iter, training cpu {w['cpu']:.3f} s/iter"
          + (f", producer cpu {w['producer_cpu']:.2f} s, produced {w['produced']}" if store is not None else "")
          + f"; load {os.getloadavg()[0]:.1f}", flush=True)
    return w


if __name__ == "__main__":
    sys.exit(main())
