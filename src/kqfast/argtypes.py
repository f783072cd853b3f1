"""argparse value types shared by kqfast-echo and kqfast-bench: a bad value exits 2 with
usage, as argparse does, and a message that says what is expected."""
from __future__ import annotations

import argparse
from typing import Callable


def count(minimum: int) -> Callable[[str], int]:
    """A whole number at least minimum."""
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}")
        return value
    return parse


def seconds(text: str) -> float:
    """A number of seconds, at least 0 (nan refused)."""
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError("must be a number of seconds, at least 0")
    return value
