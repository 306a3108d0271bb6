"""Agreement of derived reports (``lesiondiffusion.derive``) with the known reports of phantom lesions.

Each phantom lesion is drawn from a report sampled from its catalog (``lesiondiffusion.phantoms``); the
derivation sees only the CT, the mask, the organ map, the lesion type and the contrast phase. Prints the
share of lesions whose derived value equals the phantom's, per attribute, and the confusions.

    python benchmarks/bench_derive_agreement.py [--per-type 6] [--seed 0]
"""

from __future__ import annotations

import argparse
import collections
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

from lesiondiffusion.derive import derive_reports  # noqa: E402
from lesiondiffusion.organs import organ_map_from_array  # noqa: E402
from lesiondiffusion.phantoms import make_phantom  # noqa: E402

TYPES = ("liver_tumor", "liver_cyst", "kidney_tumor", "kidney_cyst", "pancreatic_tumor", "gallstone",
         "colon_cancer", "gastric_cancer")
ATTRS = ("size", "organ", "organ_type", "enhancement", "lesion_location", "shape", "relationship", "density",
         "density_variations")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-type", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    hits: dict[str, int] = collections.Counter()
    total = 0
    confusions: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    t0 = time.perf_counter()
    for t in TYPES:
        for k in range(args.per_type):
            ph = make_phantom((64, 64, 40), (2.0, 2.0, 3.0), seed=args.seed * 1000 + k, lesion_types=[t])
            organs = organ_map_from_array(ph.organs, ph.affine, "v2")
            (entry,) = derive_reports(ph.ct, ph.lesion, organs, enhancement=ph.enhancement, lesion_type=t)[:1]
            truth = ph.reports[0].to_dict()
            total += 1
            for a in ATTRS:
                if entry["report"][a] == truth[a]:
                    hits[a] += 1
                else:
                    confusions[a][(truth[a], entry["report"][a])] += 1
    print(f"{total} phantom lesions ({len(TYPES)} types x {args.per_type}), {time.perf_counter() - t0:.0f} s")
    print("| attribute | agreement | most frequent disagreement (phantom -> derived) |")
    print("| --- | --- | --- |")
    for a in ATTRS:
        worst = confusions[a].most_common(1)
        miss = f"{worst[0][0][0]} -> {worst[0][0][1]} ({worst[0][1]})" if worst else ""
        print(f"| {a} | {hits[a]}/{total} ({hits[a] / total:.0%}) | {miss} |")


if __name__ == "__main__":
    main()
