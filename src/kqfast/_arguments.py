"""Argument checks for kqfast's public entry points, in one message style: the parameter's
name, what it must be, and what it was ("port must be an int in 0..65535, not -1").  A value
of the wrong type is a TypeError, one of the right type out of range a ValueError; both are
raised before anything is bound, started or allocated."""
from __future__ import annotations

import os
import sys
from typing import Any, Callable, NoReturn

# What the C core can hold: sizes are size_t, counts and backlogs are C ints.
MAX_SIZE = sys.maxsize
MAX_COUNT = 2**31 - 1

HOST_EXPECTED = "a str (an IP address, a host name or a Unix socket path)"
HOST_OR_NONE_EXPECTED = HOST_EXPECTED + " or None (every interface)"


def _refuse(name: str, expected: str, value: object, error: type[Exception]) -> NoReturn:
    raise error(f"{name} must be {expected}, not {value!r}")


def _is_int(value: object) -> bool:
    # bool is an int to Python, never a count or a port to a user.
    return isinstance(value, int) and not isinstance(value, bool)


def integer(name: str, value: object, minimum: int, maximum: int = MAX_SIZE) -> int:
    """value, an int in minimum..maximum."""
    expected = f"an int in {minimum}..{maximum}" if maximum < MAX_SIZE else f"an int >= {minimum}"
    if not _is_int(value):
        _refuse(name, expected, value, TypeError)
    assert isinstance(value, int)
    if not minimum <= value <= maximum:
        _refuse(name, expected, value, ValueError)
    return value


def port(value: object, name: str = "port") -> int:
    """A TCP port; 0 lets the kernel pick a free one."""
    return integer(name, value, 0, 65535)


def seconds(name: str, value: object, allow_none: bool = False) -> float:
    """A number of seconds, at least 0 (NaN refused); with allow_none, None is 0.0 (which
    disables the timeout it sets)."""
    expected = "a number of seconds >= 0" + (" or None" if allow_none else "")
    if value is None and allow_none:
        return 0.0
    if not (_is_int(value) or isinstance(value, float)):
        _refuse(name, expected, value, TypeError)
    assert isinstance(value, (int, float))
    if not value >= 0:  # NaN too
        _refuse(name, expected, value, ValueError)
    return float(value)


def flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        _refuse(name, "True or False", value, TypeError)
    return value


def function(name: str, value: object) -> Callable[..., Any]:
    if not callable(value):
        _refuse(name, "callable", value, TypeError)
    return value


def host(value: object, name: str = "host", every_interface: bool = False) -> str | None:
    """An address or name to bind, or a Unix socket path (a str with a "/", or any
    os.PathLike, which is always a path).  With every_interface, None and "" pass as None
    (every interface, as asyncio's create_server takes them)."""
    if every_interface and value in (None, ""):
        return None
    if isinstance(value, os.PathLike):
        path = os.fspath(value)
        if not isinstance(path, str):
            _refuse(name, HOST_EXPECTED, value, TypeError)  # a bytes path
        return path if "/" in path else "./" + path
    expected = HOST_OR_NONE_EXPECTED if every_interface else HOST_EXPECTED
    if not isinstance(value, str):
        _refuse(name, expected, value, TypeError)
    if not value:
        _refuse(name, "a non-empty " + HOST_EXPECTED[2:], value, ValueError)
    return value


def choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    if value not in choices:
        expected = " or ".join(repr(c) for c in choices)
        _refuse(name, expected, value, ValueError if isinstance(value, str) else TypeError)
    assert isinstance(value, str)
    return value


def server_tls(value: object, native: bool) -> Any:
    """None, or an ssl.SSLContext a server can accept with.  Native handlers never take the
    GIL, so a context with Python callbacks (which OpenSSL would call mid-handshake) cannot
    serve them."""
    import ssl
    if value is None:
        return None
    if not isinstance(value, ssl.SSLContext):
        _refuse("ssl", "an ssl.SSLContext or None", value, TypeError)
    if value.protocol is ssl.PROTOCOL_TLS_CLIENT:
        raise ValueError("ssl must be a server-side context (ssl.create_default_context("
                         "ssl.Purpose.CLIENT_AUTH), or ssl.PROTOCOL_TLS_SERVER), not a client's")
    if native:
        for attribute in ("sni_callback", "keylog_filename", "_msg_callback"):
            if getattr(value, attribute, None) is not None:
                raise ValueError(f"ssl.{attribute} is set: native handlers run without the "
                                 f"GIL and cannot call Python during a handshake (serve a "
                                 f"protocol factory instead)")
    return value
