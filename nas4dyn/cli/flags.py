"""argparse types for numeric flags: a bad value is argparse's one-line error (exit 2) before any work."""
from __future__ import annotations

import argparse
from typing import Callable


def integer_at_least(low: int) -> Callable[[str], int]:
    """An argparse ``type``: an integer >= ``low`` (e.g. ``--repeats 0`` is refused, naming the bound)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value}: must be {low} or more")
        return value

    parse.__name__ = f"integer >= {low}"  # argparse names the type in some messages
    return parse


POSITIVE = integer_at_least(1)
NON_NEGATIVE = integer_at_least(0)
