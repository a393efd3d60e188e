"""Argument types for numeric flags: checked where they are parsed, so argparse names the flag.

`--batch-size 0` ends as `argument --batch-size: expected a whole number >= 1, not '0'`, before any
model is loaded, instead of a ValueError from deep inside the command.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def whole(low: int = 1, high: int | None = None) -> Callable[[str], int]:
    """A whole number in [low, high]."""
    want = f"a whole number >= {low}" + (f" and <= {high}" if high is not None else "")

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected {want}, not {text!r}")
        return value

    parse.__name__ = "whole number"  # argparse's fallback message names the type
    return parse


def number(gt: float | None = None, ge: float | None = None, le: float | None = None) -> Callable[[str], float]:
    """A finite number above `gt` (or at least `ge`), and at most `le`."""
    want = "a number" + "".join(f" {op} {bound:g}" for op, bound in ((">", gt), (">=", ge), ("<=", le))
                                if bound is not None)

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if (not math.isfinite(value) or (gt is not None and value <= gt) or (ge is not None and value < ge)
                or (le is not None and value > le)):
            raise argparse.ArgumentTypeError(f"expected {want}, not {text!r}")
        return value

    parse.__name__ = "number"
    return parse
