"""A line-based chat: every line a client sends goes to every connected client.

    python examples/chat.py --port 8888
    nc 127.0.0.1 8888                     # in two or more terminals

kqfast.LineProtocol frames the input in C and calls line_received() once per line.  All the
callbacks of one server run on its loop thread (workers=1), so the set needs no lock.
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import sys
from typing import cast

import kqfast

clients: set[ChatProtocol] = set()
_ids = itertools.count(1)


def broadcast(message: bytes) -> None:
    """Queues message for every client.  One that stops reading is not waited for: past the
    server's max_output its connection is closed (connection_lost with ENOBUFS)."""
    for client in list(clients):
        client.transport.write(message)


class ChatProtocol(kqfast.LineProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.name = f"user{next(_ids)}"
        clients.add(self)
        self.transport.write(f"* you are {self.name}\n".encode())
        broadcast(f"* {self.name} joined\n".encode())

    def line_received(self, line: bytes) -> None:
        text = line.rstrip(b"\r\n")
        if text.strip():
            broadcast(self.name.encode() + b": " + text + b"\n")

    def connection_lost(self, exc: Exception | None) -> None:
        clients.discard(self)
        broadcast(f"* {self.name} left\n".encode())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8888, help="0 picks a free port")
    args = parser.parse_args(argv)

    server = kqfast.Server(ChatProtocol, args.host, args.port, idle_timeout=None)
    address = server.address  # (host, port), or the path of a Unix socket
    where = address if isinstance(address, str) else f"{address[0]}:{address[1]}"
    print(f"chat: listening on {where} (backend={kqfast.BACKEND})",
          file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
