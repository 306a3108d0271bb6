"""Placement benchmark on the real CT: success rate and time per placement for every catalog x
location category, plus report sampling time.

    python benchmarks/bench_placement.py [--seeds 200] [--ct-dir ../shared/data/ct/totalsegmentator_example]

"cold" is the first placement for an organ set (it computes and caches the distance maps); "warm" is
the mean of the rest. Rule satisfaction is re-measured from the box (see placement.py for the rules).
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np

from lesiondiffusion.catalog import list_catalogs, load_catalog
from lesiondiffusion.organs import load_organ_map
from lesiondiffusion.placement import NoPlacement, lumen_depth_threshold, place_lesion
from lesiondiffusion.report import LOCATION_CATEGORY

DEFAULT_CT = Path(__file__).resolve().parents[2] / "shared" / "data" / "ct" / "totalsegmentator_example"


def rule_holds(box, om, cat) -> bool:
    m = box.measures
    wall_mm = max(cat.placement.wall_mm, max(om.spacing))
    if box.category == "within_parenchyma":
        return m["inside_fraction"] >= cat.placement.inside_fraction
    if box.category == "protruding":
        return 0.1 <= m["inside_fraction"] <= 0.9 and any(abs(c - round(c)) == 0.5 for c in box.center_vox)
    if box.category == "wall":
        return m["center_depth_mm"] <= wall_mm + 1e-6
    return (m["center_depth_mm"] >= lumen_depth_threshold(m["organ_max_depth_mm"], wall_mm) - 1e-6
            and m["inside_fraction"] >= cat.placement.inside_fraction)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=200)
    ap.add_argument("--ct-dir", type=Path, default=DEFAULT_CT)
    args = ap.parse_args()
    maps = {
        "example_seg (30 slices)": args.ct_dir / "example_seg.nii.gz",
        "example_seg_fast_force_split (112 slices)": args.ct_dir / "example_seg_fast_force_split.nii.gz",
    }
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; seeds per case: {args.seeds}")
    rows = []
    for map_name, path in maps.items():
        om = load_organ_map(path)
        print(f"\n{map_name}: {om.shape} @ {tuple(round(s, 2) for s in om.spacing)} mm, ids {om.source}")
        print(f"{'catalog':<20} {'category':<18} {'placed':>7} {'rule ok':>8} {'shrunk':>7} {'cold ms':>8} {'warm ms':>8}")
        for name in list_catalogs():
            cat = load_catalog(name)
            if not any(om.has(n) for n in cat.organ_names()):
                print(f"{name:<20} {'-':<18} organ absent ({', '.join(cat.organ_names())})")
                continue
            for loc in cat.domain("lesion_location"):
                reports = [cat.sample(s, {"lesion_location": loc}) for s in range(args.seeds)]
                om._cache.clear()  # so "cold" includes the distance maps for this case
                times, placed, ok, shrunk = [], 0, 0, 0
                for s, rep in enumerate(reports):
                    t0 = time.perf_counter()
                    box = place_lesion(om, rep, cat, seed=s, on_failure="skip")
                    times.append(time.perf_counter() - t0)
                    if isinstance(box, NoPlacement):
                        continue
                    placed += 1
                    ok += rule_holds(box, om, cat)
                    shrunk += box.measures["shrink"] < 1.0
                cold, warm = times[0] * 1e3, float(np.mean(times[1:])) * 1e3
                cat_name = LOCATION_CATEGORY[loc]
                rows.append((name, cat_name, placed / args.seeds, warm))
                print(f"{name:<20} {cat_name:<18} {placed / args.seeds:>7.1%} {ok / max(placed, 1):>8.1%} "
                      f"{shrunk / max(placed, 1):>7.1%} {cold:>8.2f} {warm:>8.2f}")
    t0 = time.perf_counter()
    n = 0
    for name in list_catalogs():
        cat = load_catalog(name)
        for s in range(200):
            cat.sample(s)
            n += 1
    sample_ms = (time.perf_counter() - t0) / n * 1e3
    warm_all = float(np.mean([r[3] for r in rows]))
    print(f"\nreport sampling: {sample_ms:.3f} ms per report ({n} reports, 15 catalogs)")
    print(f"placement (warm): mean {warm_all:.2f} ms, max {max(r[3] for r in rows):.2f} ms per placement; "
          f"lowest success {min(r[2] for r in rows):.1%}")


if __name__ == "__main__":
    main()
