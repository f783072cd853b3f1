"""argparse value types shared by kqfast-echo and kqfast-bench: a bad value exits 2 with
usage, as argparse does, and a message that says what is expected (argparse itself would
name the parsing function: "invalid parse value")."""
from __future__ import annotations

import argparse
from typing import Callable


def count(minimum: int) -> Callable[[str], int]:
    """A whole number at least minimum."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}")
        return value
    return parse


def seconds(text: str) -> float:
    """A number of seconds, at least 0 (nan refused)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError("must be a number of seconds, at least 0")
    return value


def port(text: str) -> int:
    """A TCP port number; 0 lets the kernel pick a free one."""
    try:
        value = int(text)
        if 0 <= value <= 65535:
            return value
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"{text!r} is not a port number (0-65535)")


def host(text: str) -> str:
    """An address or name to bind, IPv6 ones also in URL brackets ("[::1]"), or a Unix socket
    path (anything with a "/", taken as it is)."""
    if "/" not in text and text.startswith("[") and text.endswith("]"):
        return text[1:-1]
    return text
