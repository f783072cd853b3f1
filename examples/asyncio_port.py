"""Porting an asyncio program to kqfast: one line.  The same program, unchanged, on asyncio's
own event loop and on kqfast's.

    python examples/asyncio_port.py asyncio --port 8080      # asyncio.run(main(...))
    python examples/asyncio_port.py kqfast --port 8080       # kqfast.run(main(...))
    nc 127.0.0.1 8080                     # lines come back upper-cased; "quit" closes

Everything but the last lines of main() is plain asyncio code that knows nothing of kqfast:
a protocol, loop.create_server(), serve_forever().  Porting it means running main() with
kqfast.run() instead of asyncio.run() (or passing loop_factory=kqfast.new_event_loop to
asyncio.run or asyncio.Runner); the transports kqfast hands to connection_made() are
asyncio.Transports, with their reads and writes run in C.  (kqfast.Server is the other way
in: native handlers and worker threads, for servers written for kqfast.)
"""
from __future__ import annotations

import argparse
import asyncio
import sys
from typing import cast

import kqfast


class UpperEcho(asyncio.Protocol):
    """Echoes each line upper-cased; a line "quit" closes the connection."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.pending = b""

    def data_received(self, data: bytes) -> None:
        self.pending += data
        while b"\n" in self.pending:
            line, _, self.pending = self.pending.partition(b"\n")
            if line.strip() == b"quit":
                self.transport.close()
                return
            self.transport.write(line.upper() + b"\n")

    def eof_received(self) -> bool | None:
        if self.pending:
            self.transport.write(self.pending.upper())
        return None  # the transport closes itself once the output is flushed


def ready(loop_name: str, host: str, port: int) -> None:
    print(f"asyncio_port: listening on {host}:{port} (loop={loop_name})",
          file=sys.stderr, flush=True)


async def serve(host: str, port: int) -> None:
    """Plain asyncio: serves UpperEcho until cancelled (Ctrl-C)."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(UpperEcho, host, port)
    bound_host, bound_port = server.sockets[0].getsockname()[:2]
    ready(type(loop).__module__.split(".")[0], bound_host, bound_port)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("loop", choices=("asyncio", "kqfast"))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080, help="0 picks a free port")
    args = parser.parse_args(argv)
    try:
        if args.loop == "asyncio":
            asyncio.run(serve(args.host, args.port))
        else:
            kqfast.run(serve(args.host, args.port))  # the port: this line
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
