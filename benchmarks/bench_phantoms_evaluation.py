"""Speed of phantom generation and of the evaluation metrics; optional demo step timings.

    python benchmarks/bench_phantoms_evaluation.py [--demo-workdir DIR]

Prints seconds per phantom by size (healthy and with one lesion), seconds per sphericity/convexity
evaluation by mask size, and, given a finished ``lesiondiffusion demo`` workdir, the seconds of each
demo step as recorded in its markers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np


def timeit(fn, repeat: int = 5) -> float:
    fn()  # warm-up (imports, caches)
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t) / repeat


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo-workdir", type=Path)
    args = ap.parse_args()
    from lesiondiffusion.evaluation import convexity, sphericity
    from lesiondiffusion.phantoms import make_phantom

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs")
    print("\nphantom generation (s per phantom)")
    for shape, spacing in [((32, 32, 32), (2, 2, 3)), ((48, 48, 48), (2, 2, 3)), ((64, 64, 40), (3, 3, 4)),
                           ((128, 128, 64), (3, 3, 4))]:
        healthy = timeit(lambda: make_phantom(shape, spacing, seed=0))
        seeds = iter(range(1000))
        lesion = timeit(lambda: make_phantom(shape, spacing, seed=next(seeds), lesion_types=["kidney_tumor"]), 3)
        print(f"  {str(shape):>15} @ {spacing}: healthy {healthy:.3f}  + kidney_tumor {lesion:.3f}  "
              f"(lesion/healthy {lesion / healthy:.1f}x)")
    print("\nshape metrics (s per mask)")
    for r in (4, 8, 16):
        n = 2 * r + 8
        g = np.ogrid[:n, :n, :n]
        ball = sum((gi - n / 2) ** 2 for gi in g) <= r**2
        ts = timeit(lambda: sphericity(ball))
        tc = timeit(lambda: convexity(ball))
        print(f"  ball r={r:>2} ({int(ball.sum()):>6} voxels): sphericity {ts:.4f} ({sphericity(ball):.3f})  "
              f"convexity {tc:.4f} ({convexity(ball):.3f})")
    if args.demo_workdir:
        print(f"\ndemo steps in {args.demo_workdir}")
        total = 0.0
        for step in ("data", "bundle", "synthesis", "nnunet", "summary"):
            p = args.demo_workdir / "steps" / f"{step}.json"
            if p.exists():
                sec = float(json.loads(p.read_text()).get("seconds", float("nan")))
                total += sec
                print(f"  {step:<10} {sec:7.1f} s")
        print(f"  {'total':<10} {total:7.1f} s")


if __name__ == "__main__":
    main()
