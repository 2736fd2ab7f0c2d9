"""argparse types shared by the command lines: a bad number is one usage error naming its option,
never a traceback from the code that would have used it."""

from __future__ import annotations

import argparse
import math


def integer_at_least(low: int):
    """An argparse type: an integer >= ``low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}")
        return value

    parse.__name__ = "integer"  # argparse names the type in its error messages
    return parse


def integers_at_least(low: int):
    """An argparse type: a comma list of integers, each >= ``low``."""
    one = integer_at_least(low)

    def parse(text: str) -> list[int]:
        try:
            return [one(item) for item in text.split(",")]
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(f"expected a comma list of integers >= {low}, got {text!r}") from None

    parse.__name__ = "integer list"
    return parse


def number_at_least(low: float):
    """An argparse type: a finite number >= ``low``."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and value >= low):
            raise argparse.ArgumentTypeError(f"expected a number >= {low}, got {text!r}")
        return value

    parse.__name__ = "number"
    return parse
