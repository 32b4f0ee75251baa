"""Argument types that refuse impossible values when the command line is parsed.

Used by the sub-commands so that ``--epochs -5``, ``--context-rings nan`` or ``--mpp 1e-6``
stop at once with the flag and the fix, instead of being ignored, written as ``NaN`` or
failing deep inside the work.
"""
from __future__ import annotations

import argparse
import math

from ._constants import MPP_MAX, MPP_MIN


def positive_int(text: str) -> int:
    """An integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number. Fix: give e.g. 50") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not allowed, it must be at least 1. Fix: give e.g. 50")
    return value


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number. Fix: give a plain number, e.g. 1")
    return value


def non_negative_float(text: str) -> float:
    """A finite number >= 0 (``nan`` and ``inf`` refused)."""
    value = _float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value:g} is negative. Fix: give 0 or more")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0."""
    value = _float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value:g} is not positive. Fix: give a number above 0")
    return value


def mpp_value(text: str) -> float:
    """Microns per pixel within :data:`MPP_MIN` - :data:`MPP_MAX`."""
    value = _float(text)
    if not MPP_MIN <= value <= MPP_MAX:
        raise argparse.ArgumentTypeError(
            f"{value:g} µm per pixel is outside the plausible range {MPP_MIN:g}-{MPP_MAX:g} "
            "(H&E scans are about 0.25 at 40x, 0.5 at 20x). Fix: give the scan's resolution, e.g. --mpp 0.5")
    return value
