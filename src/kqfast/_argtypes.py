"""argparse value types shared by kqfast-echo and kqfast-bench: a bad value exits 2 with
usage, as argparse does, and a message that says what is expected (argparse itself would
name the parsing function: "invalid parse value")."""
from __future__ import annotations

import argparse
import re
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
    path (anything with a "/", taken as it is).  HOST:PORT is refused with a hint: the port
    has an option of its own."""
    if "/" in text:
        return text
    with_port = re.fullmatch(r"\[(?P<v6>[^]]*)\]:(?P<port>\d+)|(?P<name>[^:]*):(?P<p>\d+)", text)
    if with_port:
        bare = f"[{with_port['v6']}]" if with_port["v6"] is not None else with_port["name"]
        port_text = with_port["port"] or with_port["p"]
        raise argparse.ArgumentTypeError(
            f"{text!r} has a port: use --host {bare} --port {port_text}")
    if not text:
        raise argparse.ArgumentTypeError("must not be empty (0.0.0.0 is every IPv4 "
                                         "interface, :: every IPv6 one)")
    if text.startswith("[") and text.endswith("]"):
        return text[1:-1]
    return text
