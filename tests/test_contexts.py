"""The context rule (Python 3.15's, on every version): a stream's protocol factory and every one
of its callbacks run in a copy of the context current where its server or connection was made,
so a ContextVar set in one connection's callbacks never reaches another connection, nor the
code that runs the loop.  Servers, clients, adopted sockets and TLS streams; the callbacks of
plain, buffered and flow-controlled protocols.  On 3.15 the same bodies run on asyncio's own
loop too, which has the rule: the tests are the oracle's."""
from __future__ import annotations

import asyncio
import contextvars
import os
import socket
import sys
import tempfile

import pytest

import kqfast

pytestmark = pytest.mark.timeout(60)

var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")

LOOPS = [pytest.param(kqfast.new_event_loop, id="kqfast")]
if sys.version_info >= (3, 15):
    LOOPS.append(pytest.param(asyncio.SelectorEventLoop, id="asyncio"))


@pytest.fixture(params=LOOPS)
def loop_factory(request):
    return request.param


def run_on(loop_factory, main):
    """main() on a new loop of loop_factory's, with the caller's own value of var set: it
    must be what the caller sees afterwards, whatever the callbacks set."""
    var.set("caller")
    loop = loop_factory()
    try:
        result = loop.run_until_complete(main())
    finally:
        loop.close()
    assert var.get() == "caller"
    return result


class Recorder(asyncio.Protocol):
    """Records the value of var each callback sees, then sets its own: the stream's name."""

    def __init__(self, name: str, log: list):
        self.name, self.log = name, log
        self.received = bytearray()
        self.lost = asyncio.get_running_loop().create_future()
        # Recorded, not set: asyncio calls a client's factory in the caller's own context.
        self.log.append((name, "factory", var.get()))

    def note(self, callback: str) -> None:
        self.log.append((self.name, callback, var.get()))
        var.set(self.name)

    def connection_made(self, transport):
        self.transport = transport
        self.note("connection_made")

    def data_received(self, data):
        self.note("data_received")
        self.received += data

    def eof_received(self):
        self.note("eof_received")

    def pause_writing(self):
        self.note("pause_writing")

    def resume_writing(self):
        self.note("resume_writing")

    def connection_lost(self, exc):
        self.note("connection_lost")
        self.lost.set_result(exc)


class BufferedRecorder(Recorder, asyncio.BufferedProtocol):
    """The same, reading through get_buffer/buffer_updated."""

    def __init__(self, name: str, log: list):
        super().__init__(name, log)
        self.buffer = bytearray(1024)

    def get_buffer(self, sizehint):
        self.note("get_buffer")
        return self.buffer

    def buffer_updated(self, nbytes):
        self.note("buffer_updated")
        self.received += self.buffer[:nbytes]
        self.transport.write(bytes(self.buffer[:nbytes]))

    def eof_received(self):
        super().eof_received()
        self.transport.close()


def check_streams(log: list, made_in: dict[str, str]) -> None:
    """Each stream's factory and connection_made saw the context its server or connection
    was made in (made_in[name]); every later callback saw only what the stream itself set."""
    assert log, "no callback ran"
    assert {name for name, _, _ in log} == set(made_in), log
    for name, callback, seen in log:
        expected = made_in[name] if callback in ("factory", "connection_made") else name
        assert seen == expected, (name, callback, seen, log)


async def talk(host_port_or_path, payload: bytes) -> bytes:
    """A client that sends payload, half-closes and reads until EOF (a plain socket in a
    thread, so only the server's callbacks are the loop's)."""
    def client():
        family = socket.AF_UNIX if isinstance(host_port_or_path, str) else socket.AF_INET
        with socket.socket(family) as sock:
            sock.connect(host_port_or_path)
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
            return b"".join(chunks)
    return await asyncio.to_thread(client)


class EchoRecorder(Recorder):
    """An echo server's protocol that records."""

    def data_received(self, data):
        super().data_received(data)
        self.transport.write(data)

    def eof_received(self):
        super().eof_received()
        self.transport.close()


@pytest.mark.parametrize("buffered", [False, True], ids=["Protocol", "BufferedProtocol"])
def test_server_streams_each_have_a_copy_of_the_servers_context(loop_factory, buffered):
    log: list = []

    async def main():
        names = iter(f"conn{i}" for i in range(3))
        protocols = []

        def factory():
            cls = BufferedRecorder if buffered else EchoRecorder
            protocols.append(cls(next(names), log))
            return protocols[-1]

        var.set("server")
        server = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)
        var.set("main")  # what the code that made the server does next is not the server's
        address = server.sockets[0].getsockname()
        for i in range(3):
            assert await talk(address, b"x%d" % i) == b"x%d" % i
        await asyncio.gather(*(p.lost for p in protocols))
        server.close()
        await server.wait_closed()
        assert var.get() == "main"

    run_on(loop_factory, main)
    check_streams(log, {f"conn{i}": "server" for i in range(3)})
    callbacks = {c for _, c, _ in log}
    assert {"data_received", "eof_received", "connection_lost"} <= callbacks or buffered
    assert not buffered or {"get_buffer", "buffer_updated"} <= callbacks


def test_unix_server_streams_each_have_a_copy_of_the_servers_context(loop_factory):
    log: list = []

    async def main():
        names = iter(("u0", "u1"))
        protocols = []
        path = os.path.join(tempfile.mkdtemp(), "s.sock")
        var.set("unix server")
        server = await asyncio.get_running_loop().create_unix_server(
            lambda: protocols.append(EchoRecorder(next(names), log)) or protocols[-1], path)
        var.set("main")
        assert await talk(path, b"a") == b"a"
        assert await talk(path, b"b") == b"b"
        await asyncio.gather(*(p.lost for p in protocols))
        server.close()
        await server.wait_closed()

    run_on(loop_factory, main)
    check_streams(log, {"u0": "unix server", "u1": "unix server"})


def test_a_server_started_later_keeps_the_context_it_was_made_in(loop_factory):
    """start_serving=False, then serve_forever from another task in another context."""
    log: list = []

    async def main():
        protocols = []
        var.set("made here")
        server = await asyncio.get_running_loop().create_server(
            lambda: protocols.append(EchoRecorder("late", log)) or protocols[-1],
            "127.0.0.1", 0, start_serving=False)

        async def serve():
            var.set("serving task")
            await server.start_serving()
        await asyncio.create_task(serve())
        assert await talk(server.sockets[0].getsockname(), b"z") == b"z"
        await protocols[0].lost
        server.close()
        await server.wait_closed()

    run_on(loop_factory, main)
    check_streams(log, {"late": "made here"})


def test_streams_handlers_see_their_own_connections_context(loop_factory):
    """asyncio.start_server: a handler task per connection; what one sets, the next does
    not see."""
    seen: list = []

    async def main():
        var.set("streams server")

        async def handler(reader, writer):
            seen.append(var.get())
            var.set(f"handler{len(seen)}")
            writer.write(await reader.read())
            await writer.drain()
            writer.close()
            await writer.wait_closed()

        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        var.set("main")
        for i in range(3):
            assert await talk(server.sockets[0].getsockname(), b"s%d" % i) == b"s%d" % i
        server.close()
        await server.wait_closed()

    run_on(loop_factory, main)
    assert seen == ["streams server"] * 3


def test_client_streams_run_in_a_copy_of_the_context_of_create_connection(loop_factory):
    log: list = []

    async def main():
        loop = asyncio.get_running_loop()
        peers = []

        def accept(listener):
            for _ in range(2):
                conn, _ = listener.accept()
                conn.sendall(b"hello")
                conn.shutdown(socket.SHUT_WR)
                peers.append(conn)

        with socket.create_server(("127.0.0.1", 0)) as listener:
            accepting = asyncio.create_task(asyncio.to_thread(accept, listener))
            clients = []
            for name in ("client0", "client1"):
                var.set(f"{name} maker")
                _, protocol = await loop.create_connection(
                    lambda name=name: Recorder(name, log), *listener.getsockname())
                clients.append(protocol)
            var.set("main")
            await accepting
            for protocol in clients:
                await asyncio.wait_for(_received(protocol, b"hello"), 10)
                protocol.transport.close()
                await protocol.lost
            for peer in peers:
                peer.close()
        assert var.get() == "main"

    run_on(loop_factory, main)
    # asyncio calls a client's factory in create_connection itself: the maker's context.
    check_streams(log, {"client0": "client0 maker", "client1": "client1 maker"})


async def _received(protocol, data: bytes) -> None:
    while bytes(protocol.received) != data:
        await asyncio.sleep(0.001)
        if protocol.lost.done():
            assert bytes(protocol.received) == data
            return


def test_adopted_sockets_run_in_a_copy_of_the_context_of_connect_accepted_socket(
        loop_factory):
    log: list = []

    async def main():
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair()
        var.set("adopter")
        _, protocol = await loop.connect_accepted_socket(lambda: Recorder("adopted", log),
                                                         ours)
        var.set("main")
        theirs.sendall(b"ping")
        theirs.shutdown(socket.SHUT_WR)
        await _received(protocol, b"ping")
        protocol.transport.close()
        await protocol.lost
        theirs.close()

    run_on(loop_factory, main)
    check_streams(log, {"adopted": "adopter"})


def test_tls_streams_follow_the_rule_both_ways(loop_factory, tls):
    server_ctx, client_ctx = tls
    log: list = []

    async def main():
        loop = asyncio.get_running_loop()
        names = iter(("tls0", "tls1"))
        served = []
        var.set("tls server")
        server = await loop.create_server(
            lambda: served.append(EchoRecorder(next(names), log)) or served[-1],
            "127.0.0.1", 0, ssl=server_ctx)
        host, port = server.sockets[0].getsockname()
        clients = []
        for name in ("tlsclient0", "tlsclient1"):
            var.set(f"{name} maker")
            transport, protocol = await loop.create_connection(
                lambda name=name: Recorder(name, log), host, port, ssl=client_ctx,
                server_hostname="localhost")
            clients.append(protocol)
            transport.write(name.encode())
        var.set("main")
        for protocol in clients:
            await asyncio.wait_for(_received(protocol, protocol.name.encode()), 10)
            protocol.transport.close()
            await protocol.lost
        await asyncio.gather(*(p.lost for p in served))
        server.close()
        await server.wait_closed()

    run_on(loop_factory, main)
    check_streams(log, {"tls0": "tls server", "tls1": "tls server",
                        "tlsclient0": "tlsclient0 maker", "tlsclient1": "tlsclient1 maker"})


def test_start_tls_keeps_the_streams_context(loop_factory, tls):
    """start_tls upgrades a stream in place: its TLS callbacks run in the context the stream
    already had (as on 3.15's asyncio, where the TLS layer is called from the transport's
    callbacks), not in the caller's."""
    server_ctx, client_ctx = tls
    log: list = []

    async def main():
        loop = asyncio.get_running_loop()
        served = []
        server = await loop.create_server(lambda: served.append(EchoRecorder("tls side", log))
                                          or served[-1], "127.0.0.1", 0, ssl=server_ctx)
        var.set("connector")
        transport, protocol = await loop.create_connection(
            lambda: Recorder("upgraded", log), *server.sockets[0].getsockname())
        var.set("upgrader")
        tls_transport = await loop.start_tls(transport, protocol, client_ctx,
                                             server_hostname="localhost")
        var.set("main")
        tls_transport.write(b"over tls")
        await asyncio.wait_for(_received(protocol, b"over tls"), 10)
        tls_transport.close()
        await protocol.lost
        await served[0].lost
        server.close()
        await server.wait_closed()

    run_on(loop_factory, main)
    check_streams(log, {"upgraded": "connector", "tls side": "caller"})
    assert any(n == "upgraded" and c == "data_received" for n, c, _ in log)


def test_kqfast_server_protocols_run_in_a_copy_of_the_context_it_was_made_in():
    log: list = []
    var.set("kqfast.Server maker")
    names = iter(("k0", "k1", "k2"))
    server = kqfast.Server(lambda: EchoRecorder(next(names), log), port=0)
    var.set("caller")
    server.start()
    try:
        for i in range(3):
            with socket.create_connection(server.address) as sock:
                sock.sendall(b"k")
                sock.shutdown(socket.SHUT_WR)
                assert sock.recv(10) == b"k"
                assert sock.recv(10) == b""
    finally:
        server.stop()
    assert var.get() == "caller"
    check_streams(log, {name: "kqfast.Server maker" for name in ("k0", "k1", "k2")})


def test_flow_control_callbacks_run_in_the_streams_context_whoever_writes():
    """pause_writing comes from write(), which any task may call: the protocol still hears
    it in its own stream's context (asyncio 3.15 calls it in the writer's)."""
    log: list = []

    async def main():
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair()
        theirs.setblocking(False)
        var.set("adopter")
        transport, protocol = await loop.connect_accepted_socket(
            lambda: Recorder("flow", log), ours)
        transport.set_write_buffer_limits(high=1024)

        async def writer():
            var.set("writer task")
            transport.write(b"w" * (1 << 22))  # more than the socket takes: pause
        await asyncio.create_task(writer())
        drained = 0
        while not any(c == "resume_writing" for _, c, _ in log):
            try:
                drained += len(theirs.recv(1 << 20))
            except BlockingIOError:
                await asyncio.sleep(0.001)
        transport.close()
        await protocol.lost
        theirs.close()

    run_on(kqfast.new_event_loop, main)
    assert [c for _, c, _ in log if c.endswith("_writing")] == ["pause_writing",
                                                                 "resume_writing"]
    check_streams(log, {"flow": "adopter"})
