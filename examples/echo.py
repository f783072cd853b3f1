"""The smallest kqfast server: the tutorial's line echo, run in C without the GIL, or the same
through a Python protocol.

    python examples/echo.py               # native kqfast.LINE_ECHO on 127.0.0.1:8080
    python examples/echo.py --python      # the LineEcho protocol below, the same behaviour
    nc 127.0.0.1 8080                     # type lines; a blank one closes
"""
from __future__ import annotations

import argparse
import asyncio
import sys
from typing import cast

import kqfast


class LineEcho(kqfast.LineProtocol):
    """kqfast.LINE_ECHO in Python: each line back with its terminator; a blank line closes.
    kqfast.LineProtocol frames the input in C: line_received() gets one line at a time (at
    EOF, a last one without its newline), and the transport closes once flushed after EOF."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def line_received(self, line: bytes) -> None:
        if line.strip():
            self.transport.write(line)
        else:
            self.transport.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080, help="0 picks a free port")
    parser.add_argument("--python", action="store_true",
                        help="serve through the LineEcho protocol instead of kqfast.LINE_ECHO")
    args = parser.parse_args(argv)

    handler = LineEcho if args.python else kqfast.LINE_ECHO
    server = kqfast.Server(handler, args.host, args.port)
    address = server.address  # (host, port), or the path of a Unix socket
    where = address if isinstance(address, str) else f"{address[0]}:{address[1]}"
    print(f"echo: listening on {where} (backend={kqfast.BACKEND})",
          file=sys.stderr, flush=True)
    try:
        server.serve_forever()  # Ctrl-C stops it cleanly, then raises KeyboardInterrupt
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
