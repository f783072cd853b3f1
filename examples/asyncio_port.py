"""One asyncio.Protocol, unchanged, on two event loops: asyncio's own and kqfast's.

    python examples/asyncio_port.py asyncio --port 8080
    python examples/asyncio_port.py kqfast --port 8080
    nc 127.0.0.1 8080                     # lines come back upper-cased; "quit" closes

UpperEcho below is plain asyncio code that knows nothing of kqfast.  Porting a server means
replacing `loop.create_server(UpperEcho, host, port)` with `kqfast.Server(UpperEcho, host, port)`:
the transport kqfast hands to connection_made() has the methods of asyncio's.
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


async def serve_on_asyncio(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(UpperEcho, host, port)
    bound_host, bound_port = server.sockets[0].getsockname()[:2]
    ready("asyncio", bound_host, bound_port)
    async with server:
        await server.serve_forever()


def serve_on_kqfast(host: str, port: int) -> None:
    server = kqfast.Server(UpperEcho, host, port)
    bound_host, bound_port = server.address
    ready("kqfast", bound_host, bound_port)
    server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("loop", choices=("asyncio", "kqfast"))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080, help="0 picks a free port")
    args = parser.parse_args(argv)
    try:
        if args.loop == "asyncio":
            asyncio.run(serve_on_asyncio(args.host, args.port))
        else:
            serve_on_kqfast(args.host, args.port)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
