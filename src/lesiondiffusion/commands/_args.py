"""Argument types shared by the sub-commands (a leading underscore keeps this module off the command list)."""

from __future__ import annotations

import argparse
import math


def finite_float(text: str) -> float:
    """A float option that refuses NaN and infinity (``float('nan')`` parses, and then poisons every step)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number; give a real value such as 2.5")
    return value
