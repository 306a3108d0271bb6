"""What the demo ships with: the notice on demo weights and where the shipped demo bundle lives.

A module of its own so that ``lesiondiffusion demo`` and the recipe that rebuilds the bundle
(``benchmarks/demo_bundle.py``, not installed) share it without importing each other.
"""

from __future__ import annotations

from pathlib import Path

DEMO_NOTICE = (
    "DEMO WEIGHTS - NOT FOR RESEARCH OR CLINICAL USE. Trained for a few minutes on CPU by "
    "`lesiondiffusion demo` on procedural phantoms (tiny preset); they show that the pipeline "
    "runs end to end, not that it produces realistic lesions."
)


def packaged_bundle_dir() -> Path:
    """Where the shipped demo bundle lives inside the installed package (``lesiondiffusion/data``)."""
    return Path(__file__).resolve().parent / "data" / "demo_bundle"
