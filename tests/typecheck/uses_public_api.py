"""A user's program over kqfast's whole public API, for `mypy --strict` (.ci/run's type
check): every call here must type-check against the installed package as it is written."""
from __future__ import annotations

import asyncio
import sys
import threading

import kqfast


class Upper(kqfast.LineProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, kqfast.Transport)
        self.transport = transport

    def line_received(self, line: bytes) -> None:
        self.transport.write(line.upper())


async def main() -> int:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(asyncio.Protocol, "127.0.0.1", 0)
    server.close()
    await server.wait_closed()
    return 42


def asyncio_loop() -> None:
    answer: int = kqfast.run(main(), debug=False)
    loop: kqfast.Loop = kqfast.new_event_loop()
    loop.call_soon(print, "soon")
    handle: asyncio.TimerHandle = loop.call_later(0.1, print, "later")
    handle.cancel()
    assert loop.run_until_complete(main()) == answer
    loop.close()
    if sys.version_info >= (3, 11):
        with asyncio.Runner(loop_factory=kqfast.new_event_loop) as runner:
            runner.run(main())
    policy: asyncio.AbstractEventLoopPolicy = kqfast.EventLoopPolicy()
    del policy


def server() -> None:
    handler: kqfast.NativeHandler = kqfast.LINE_ECHO
    with kqfast.Server(handler, "127.0.0.1", 0, workers=2, idle_timeout=None) as native:
        native.start()
        address: kqfast.ServerAddress = native.address
        if not isinstance(address, str):
            host, port = address
            print(host, port + 1)
        stats: kqfast.ServerStats = native.stats()
        current: int = stats["connections_current"] + stats["handler_errors"]
        per_loop: list[kqfast.LoopStats] = stats["loops"]
        print(current, per_loop[0]["bytes_in"], native.addresses)
        native.call_soon_threadsafe(print, "on the loop")
        native.stop(timeout=1.0)
    python = kqfast.Server(Upper, host=None, port=0, max_output=1 << 20)
    python.stop()
    if kqfast.BACKEND == "epoll":
        print(kqfast.TLS_ENGINE, kqfast.__version__)


def tutorial() -> None:
    sock: kqfast.Socket = kqfast.listen("127.0.0.1", 0, backlog=16, reuse_port=False)
    poller = kqfast.EventLoop(sock)

    def handle(conn: kqfast.Socket) -> None:
        data: bytes = conn.read(4096)
        if data.strip():
            sent: int = conn.write(data)
            print(sent)
        else:
            conn.close()

    threading.Timer(0.1, poller.stop).start()
    poller.handle(handle)
    sock.close()


def serve_forever() -> None:
    kqfast.serve(kqfast.ECHO, "127.0.0.1", 0, workers=1)
