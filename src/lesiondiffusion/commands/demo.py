"""``lesiondiffusion demo``: the whole method on built-in phantoms (see lesiondiffusion.demo)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="run the whole method on built-in CT phantoms (CPU, minutes)",
        description=(
            "Builds a phantom CT dataset, trains a tiny generator bundle (demo weights, not for research "
            "use), synthesises lesions with previews, trains/predicts nnU-Net with a short LesionDiffusion "
            "trainer and reports Dice. Re-running reuses finished steps."
        ),
    )
    p.add_argument("--workdir", type=Path, default=Path("lesiondiffusion_demo"),
                   help="where everything is written (default: ./lesiondiffusion_demo)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    p.add_argument("--fast", action="store_true", help="smallest run (CI): fewer, smaller phantoms and steps")
    p.add_argument("--restart", action="store_true",
                   help="delete this demo's earlier outputs in --workdir and start over")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lesiondiffusion.demo import Demo, format_final

    demo = Demo(args.workdir, device=args.device, fast=args.fast, progress=not args.no_progress, echo=print)
    if args.restart:
        demo.restart()
    results = demo.run()
    print(format_final(results))
    return 0
