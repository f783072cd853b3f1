"""TLS on kqfast.Loop: the engine (records read and written in C on the very SSL object behind
asyncio's SSLProtocol) behaves as asyncio's own TLS does, on real loopback connections.  Most
tests run the same program on asyncio's loop and on kqfast's and compare what the program
saw; the rest check what only kqfast has (records through the core, the accept in C, other
threads refused)."""
from __future__ import annotations

import asyncio
import os
import socket
import ssl
import subprocess
import sys
import threading
from asyncio import sslproto

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kqfast
from support import memory_bio_client

pytestmark = pytest.mark.timeout(60)

# Python 3.10's asyncio has an older SSLProtocol, which the engine leaves alone.
ENGINE = hasattr(sslproto, "SSLProtocolState")
LOOPS = {"asyncio": asyncio.SelectorEventLoop, "kqfast": kqfast.new_event_loop}


def on_each_loop(main):
    """{loop name: what main() returned} for a new loop of each kind."""
    results = {}
    for name, factory in LOOPS.items():
        loop = factory()
        try:
            results[name] = loop.run_until_complete(asyncio.wait_for(main(), 30))
        finally:
            loop.close()
    return results


def on_kqfast(main):
    loop = kqfast.new_event_loop()
    try:
        return loop.run_until_complete(asyncio.wait_for(main(), 30))
    finally:
        loop.close()


class Echo(asyncio.Protocol):
    """Echoes; records what it was told."""

    def __init__(self):
        self.events = []
        self.lost = asyncio.get_running_loop().create_future()

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.transport.write(data)

    def eof_received(self):
        self.events.append("eof")

    def connection_lost(self, exc):
        self.events.append(("lost", type(exc).__name__ if exc else None))
        self.lost.set_result(exc)


class Collect(asyncio.Protocol):
    """Keeps what it receives; `wait(n)` until n bytes came."""

    def __init__(self):
        self.data = bytearray()
        self.events = []
        self.more = asyncio.Event()
        self.lost = asyncio.get_running_loop().create_future()

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.data += data
        self.more.set()

    async def wait(self, n):
        while len(self.data) < n:
            self.more.clear()
            await self.more.wait()

    def pause_writing(self):
        self.events.append("pause_writing")

    def resume_writing(self):
        self.events.append("resume_writing")

    def eof_received(self):
        self.events.append("eof")

    def connection_lost(self, exc):
        self.events.append(("lost", type(exc).__name__ if exc else None))
        self.lost.set_result(exc)


class Served(list):
    """The protocols a server made, in order; `await served.first()` for the first one."""

    def __init__(self):
        super().__init__()
        self.made = asyncio.Event()

    def make(self):
        self.append(Echo())
        self.made.set()
        return self[-1]

    async def first(self):
        await self.made.wait()
        return self[0]


async def tls_client(server, context, protocol=Collect):
    """A TLS client of server with context, verifying it as localhost: (transport,
    protocol)."""
    return await asyncio.get_running_loop().create_connection(
        protocol, *server.sockets[0].getsockname(), ssl=context, server_hostname="localhost")


async def close_all(transport, client, server):
    """Closes the client's transport, waits for its connection_lost(), then the server."""
    transport.close()
    await client.lost
    server.close()
    await server.wait_closed()


async def tls_echo_server(tls):
    served = Served()
    server = await asyncio.get_running_loop().create_server(served.make, "127.0.0.1", 0,
                                                            ssl=tls[0])
    return server, served


def test_the_engine_runs_where_asyncio_has_its_state_machine():
    assert kqfast.TLS_ENGINE.startswith("kqfast: OpenSSL" if ENGINE else "asyncio SSLProtocol")
    assert ssl.OPENSSL_VERSION.split()[1] in kqfast.TLS_ENGINE or not ENGINE


def test_records_are_read_and_written_by_the_core(tls):
    """Once the handshake is done, neither side's ssl.SSLObject is asked to read or write:
    the core does it in C on the same SSL object (on 3.10, asyncio's SSLProtocol does)."""
    calls = []

    def spy(sslobj):
        for name in ("read", "write"):
            method = getattr(sslobj, name)
            setattr(sslobj, name, lambda *a, _m=method, _n=name: calls.append(_n) or _m(*a))

    async def main():
        server, served = await tls_echo_server(tls)
        transport, client = await tls_client(server, tls[1])
        transport.write(b"x")  # a first round trip: both handshakes are over
        await client.wait(1)
        spy(transport.get_extra_info("ssl_object"))
        spy(served[0].transport.get_extra_info("ssl_object"))
        for i in range(2, 50):
            transport.write(b"x" * i)
            await client.wait(i * (i + 1) // 2)
        steady.extend(calls)
        assert type(transport._ssl_protocol._transport) is kqfast.Transport
        await close_all(transport, client, server)

    steady = []
    on_kqfast(main)
    assert (steady == []) == ENGINE, steady


@pytest.mark.parametrize("size", [1, 16384, 16385, 1 << 20])
def test_echo_over_tcp_and_unix(tls, tmp_path, size):
    payload = os.urandom(size)

    async def main():
        loop = asyncio.get_running_loop()
        results = []
        for unix in (False, True):
            if unix:
                path = str(tmp_path / f"tls-{loop.__class__.__name__}")
                server = await loop.create_unix_server(Echo, path, ssl=tls[0])
                transport, client = await loop.create_unix_connection(
                    Collect, path, ssl=tls[1], server_hostname="localhost")
            else:
                server, _ = await tls_echo_server(tls)
                transport, client = await tls_client(server, tls[1])
            transport.write(payload)
            await client.wait(size)
            transport.close()
            await client.lost
            results.append((bytes(client.data) == payload, client.events))
            server.close()
            await server.wait_closed()
        return results

    results = on_each_loop(main)
    assert results["kqfast"] == results["asyncio"]
    assert all(same for same, _ in results["kqfast"])


def test_a_tls_server_accepts_in_c_without_a_task_per_connection(tls):
    """asyncio's accept runs a task per connection until its handshake ends; kqfast's core
    accepts and the SSLProtocol drives the handshake itself."""
    seen = {}

    class Watch(Echo):
        def connection_made(self, transport):
            super().connection_made(transport)
            seen["accept tasks"] = [t for t in asyncio.all_tasks()
                                    if "_accept_connection" in repr(t.get_coro())]

    async def main():
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Watch, "127.0.0.1", 0, ssl=tls[0])
        transport, client = await tls_client(server, tls[1])
        transport.write(b"ping")
        await client.wait(4)
        await close_all(transport, client, server)
        return len(seen["accept tasks"])

    assert on_each_loop(main) == {"asyncio": 1, "kqfast": 0}


def test_start_tls_upgrades_both_ways(tls):
    """A STARTTLS exchange: loop.start_tls() on both ends of a plain stream (whose new
    protocol asyncio does not tell connection_made(): start_tls returns the transport)."""
    async def main():
        loop = asyncio.get_running_loop()
        upgraded = loop.create_future()
        received = Collect()

        class Starttls(Collect):
            def data_received(self, data):
                super().data_received(data)
                if self.data == b"STARTTLS\n":
                    self.transport.pause_reading()  # what follows is the handshake's
                    self.transport.write(b"OK\n")
                    upgraded.set_result(loop.create_task(loop.start_tls(
                        self.transport, received, tls[0], server_side=True)))

        server = await loop.create_server(Starttls, "127.0.0.1", 0)
        transport, plain = await loop.create_connection(Starttls, *server.sockets[0].getsockname())
        transport.write(b"STARTTLS\n")
        await plain.wait(3)
        client = Collect()
        secure = await loop.start_tls(transport, client, tls[1], server_hostname="localhost")
        secure.write(b"secret" * 10000)
        server_side = await (await upgraded)
        await received.wait(60000)
        server_side.write(bytes(received.data))
        await client.wait(60000)
        secure.close()
        await client.lost
        await received.lost
        server.close()
        await server.wait_closed()
        return (bytes(plain.data), bytes(client.data) == b"secret" * 10000,
                type(server_side).__name__, received.events, client.events)

    results = on_each_loop(main)
    assert results["kqfast"][:2] == results["asyncio"][:2] == (b"OK\n", True)
    assert results["kqfast"][3:] == results["asyncio"][3:]
    assert "SSL" in results["kqfast"][2] and "SSL" in results["asyncio"][2]


def test_connect_accepted_socket_with_tls(tls):
    async def main():
        loop = asyncio.get_running_loop()
        listener = socket.create_server(("127.0.0.1", 0))
        listener.setblocking(False)
        connecting = asyncio.ensure_future(loop.create_connection(
            Collect, *listener.getsockname(), ssl=tls[1], server_hostname="localhost"))
        sock, _ = await loop.sock_accept(listener)
        _, served = await loop.connect_accepted_socket(Echo, sock, ssl=tls[0])
        transport, client = await connecting
        transport.write(b"adopted")
        await client.wait(7)
        transport.close()
        await client.lost
        await served.lost
        listener.close()
        return bytes(client.data), served.events

    results = on_each_loop(main)
    assert results["kqfast"] == results["asyncio"]


def test_a_buffered_protocol_gets_the_plaintext(tls):
    class Buffered(asyncio.BufferedProtocol):
        def __init__(self):
            self.buffer = memoryview(bytearray(1000))  # (asyncio slices it)
            self.data = bytearray()
            self.done = asyncio.get_running_loop().create_future()

        def get_buffer(self, hint):
            return self.buffer

        def buffer_updated(self, n):
            self.data += self.buffer[:n]
            if len(self.data) >= 300000:
                self.done.set_result(None)

        def connection_lost(self, exc):
            pass

    payload = os.urandom(300000)

    async def main():
        server, _ = await tls_echo_server(tls)
        transport, client = await tls_client(server, tls[1], Buffered)
        transport.write(payload)
        await client.done
        transport.close()
        server.close()
        await server.wait_closed()
        return bytes(client.data) == payload

    assert on_each_loop(main) == {"asyncio": True, "kqfast": True}


def test_flow_control_is_asyncios(tls):
    """A peer that does not read: asyncio pauses the app once the records it could not hand
    to the socket's transport (paused itself) pass the high-water mark, and resumes it once
    they drained; the same calls at the same points here, nothing lost."""
    payload = os.urandom(8 << 20)

    async def main():
        gate = asyncio.Event()

        async def slow_reader(reader, writer):
            await gate.wait()
            got = await reader.readexactly(len(payload))
            writer.write(b"%d" % (got == payload))
            writer.close()

        server = await asyncio.start_server(slow_reader, "127.0.0.1", 0, ssl=tls[0])
        transport, client = await tls_client(server, tls[1])
        for at in range(0, len(payload), 1 << 16):
            transport.write(payload[at:at + (1 << 16)])
        paused = list(client.events)
        buffered = transport.get_write_buffer_size() > 0
        gate.set()
        await client.wait(1)
        await client.lost
        server.close()
        await server.wait_closed()
        return paused, buffered, bytes(client.data), client.events

    results = on_each_loop(main)
    assert results["kqfast"] == results["asyncio"]
    assert results["kqfast"][:3] == (["pause_writing"], True, b"1")


def test_plaintext_decrypted_before_a_pause_waits_for_the_resume(tls):
    """A task pauses reading while the next records are arriving: nothing is delivered while
    paused, everything after the resume, in order."""
    async def main():
        loop = asyncio.get_running_loop()
        server, served = await tls_echo_server(tls)
        transport, client = await tls_client(server, tls[1])
        transport.write(b"first")
        await client.wait(5)
        served[0].transport.write(b"second")
        loop.call_soon(transport.pause_reading)  # before the Python pass delivers "second"
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        while_paused = bytes(client.data)
        transport.resume_reading()
        await client.wait(11)
        await close_all(transport, client, server)
        return while_paused, bytes(client.data)

    results = on_each_loop(main)
    assert results["kqfast"] == results["asyncio"] == (b"first", b"firstsecond")


@pytest.mark.parametrize("closer", ["client", "server"])
def test_close_notify_both_ways(tls, closer):
    async def main():
        server, served = await tls_echo_server(tls)
        transport, client = await tls_client(server, tls[1])
        transport.write(b"bye")
        await client.wait(3)
        (transport if closer == "client" else served[0].transport).close()
        await client.lost
        await served[0].lost
        server.close()
        await server.wait_closed()
        return client.events, served[0].events

    results = on_each_loop(main)
    assert results["kqfast"] == results["asyncio"]


def test_a_failed_handshake_raises_what_asyncio_raises(tls):
    """Verification against another CA: the same exception, message included."""
    untrusting = ssl.create_default_context()

    async def main():
        server, _ = await tls_echo_server(tls)
        try:
            await tls_client(server, untrusting)
        except ssl.SSLCertVerificationError as exc:
            return type(exc), exc.reason, exc.verify_code, exc.verify_message, str(exc)
        finally:
            server.close()
            await server.wait_closed()

    results = on_each_loop(main)
    assert results["kqfast"] == results["asyncio"]
    assert results["kqfast"][1] == "CERTIFICATE_VERIFY_FAILED"


def test_a_corrupt_record_fails_the_stream_as_asyncio_does(tls):
    """A record whose last byte is flipped: connection_lost() gets ssl's error, of the same
    class, reason and library as asyncio's (the message names kqfast where _ssl names its own
    line)."""
    async def main():
        server, served = await tls_echo_server(tls)
        address = server.sockets[0].getsockname()
        loop = asyncio.get_running_loop()
        sock, sslobj, _, outgoing = await loop.run_in_executor(None, memory_bio_client, tls[1],
                                                               address)
        sslobj.write(b"tampered")
        record = bytearray(outgoing.read())
        record[-1] ^= 1
        await loop.run_in_executor(None, sock.sendall, bytes(record))
        exc = await (await served.first()).lost
        sock.close()
        server.close()
        await server.wait_closed()
        return type(exc), exc.reason, exc.library, exc.errno, str(exc).rsplit(" (", 1)[0]

    results = on_each_loop(main)
    assert results["kqfast"] == results["asyncio"]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cuts=st.lists(st.integers(1, 400), min_size=1, max_size=30),
       sizes=st.lists(st.integers(1, 3000), min_size=1, max_size=8))
def test_records_split_anywhere_come_out_whole(tls, cuts, sizes):
    """The client's records reach the server in pieces cut at arbitrary bytes, across record
    boundaries and inside headers: the echo is exactly the plaintext sent."""
    messages = [bytes([65 + i % 26]) * n for i, n in enumerate(sizes)]

    async def main():
        server, _ = await tls_echo_server(tls)
        loop = asyncio.get_running_loop()
        sock, sslobj, incoming, outgoing = await loop.run_in_executor(
            None, memory_bio_client, tls[1], server.sockets[0].getsockname())
        for message in messages:
            sslobj.write(message)
        wire, pieces, at = outgoing.read(), [], 0
        for cut in cuts:
            pieces.append(wire[at:at + cut])
            at += cut
        pieces.append(wire[at:])

        def exchange():
            for piece in pieces:
                if piece:
                    sock.sendall(piece)
            echoed = bytearray()
            while len(echoed) < sum(sizes):
                try:
                    echoed += sslobj.read(65536)
                except ssl.SSLWantReadError:
                    incoming.write(sock.recv(65536))
            return bytes(echoed)

        echoed = await loop.run_in_executor(None, exchange)
        sock.close()
        server.close()
        await server.wait_closed()
        return echoed

    assert on_kqfast(main) == b"".join(messages)


@pytest.mark.parametrize("when", ["mid-handshake", "mid-record"])
def test_a_reset_in_the_middle_ends_only_that_stream(tls, when):
    async def main():
        server, served = await tls_echo_server(tls)
        address = server.sockets[0].getsockname()
        loop = asyncio.get_running_loop()
        if when == "mid-handshake":
            sock = socket.create_connection(address)
            context = tls[1]
            outgoing = ssl.MemoryBIO()
            hello = context.wrap_bio(ssl.MemoryBIO(), outgoing, server_hostname="localhost")
            with pytest.raises(ssl.SSLWantReadError):
                hello.do_handshake()
            sock.sendall(outgoing.read()[:50])  # half a ClientHello
        else:
            sock, sslobj, _, outgoing = await loop.run_in_executor(None, memory_bio_client,
                                                                   tls[1], address)
            sslobj.write(b"z" * 5000)
            sock.sendall(outgoing.read()[:2000])
        protocol = await served.first()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
        sock.close()  # a reset
        # Mid-handshake the app protocol was never connected: asyncio tells it nothing.
        exc = await protocol.lost if when == "mid-record" else None
        # The server serves on.
        transport, client = await tls_client(server, tls[1])
        transport.write(b"still here")
        await client.wait(10)
        await close_all(transport, client, server)
        return type(exc).__name__, protocol.events

    results = on_each_loop(main)
    assert results["kqfast"] == results["asyncio"]


def test_extra_info_is_asyncios(tls):
    server_ctx, client_ctx = tls
    server_ctx.set_alpn_protocols(["kq/1"])
    client_ctx.set_alpn_protocols(["kq/1"])

    async def main():
        server, _ = await tls_echo_server(tls)
        transport, client = await tls_client(server, client_ctx)
        sslobj = transport.get_extra_info("ssl_object")
        facts = (type(sslobj), sslobj.selected_alpn_protocol(), sslobj.version(),
                 sslobj.cipher(), sslobj.server_hostname, sslobj.getpeercert()["subjectAltName"],
                 transport.get_extra_info("cipher"), transport.get_extra_info("compression"),
                 transport.get_extra_info("sslcontext") is client_ctx,
                 transport.get_extra_info("peername") == server.sockets[0].getsockname(),
                 type(transport.get_extra_info("socket")).__name__)
        await close_all(transport, client, server)
        return facts

    try:
        results = on_each_loop(main)
    finally:
        server_ctx.set_alpn_protocols([])
        client_ctx.set_alpn_protocols([])
    assert results["kqfast"] == results["asyncio"]
    assert results["kqfast"][1] == "kq/1"


def test_an_sni_callback_runs_during_the_handshake(tls):
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)  # no certificate: the
    names = []                                                      # callback's context has

    def pick(sslobj, name, context):
        names.append(name)
        sslobj.context = tls[0]

    server_ctx.sni_callback = pick

    async def main():
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Echo, "127.0.0.1", 0, ssl=server_ctx)
        transport, client = await tls_client(server, tls[1])
        transport.write(b"sni")
        await client.wait(3)
        await close_all(transport, client, server)
        return bytes(client.data)

    assert on_each_loop(main) == {"asyncio": b"sni", "kqfast": b"sni"}
    assert names == ["localhost", "localhost"]


def test_a_tls_transport_refuses_other_threads(tls):
    async def main():
        server, _ = await tls_echo_server(tls)
        transport, client = await tls_client(server, tls[1])
        errors = []

        def misuse():
            for call in (lambda: transport.write(b"x"), transport.close,
                         transport.pause_reading, lambda: transport.writelines([b"y"])):
                try:
                    call()
                except RuntimeError as exc:
                    errors.append(str(exc))

        thread = threading.Thread(target=misuse)
        thread.start()
        await asyncio.get_running_loop().run_in_executor(None, thread.join)
        transport.write(b"ok")
        await client.wait(2)
        await close_all(transport, client, server)
        return errors, bytes(client.data)

    errors, data = on_kqfast(main)
    assert data == b"ok"
    assert len(errors) == 4 and all("thread" in e for e in errors)


def test_asyncios_own_tls_is_the_fallback(tls):
    """KQFAST_TLS_ENGINE=asyncio (what kqfast does by itself where the engine cannot run):
    TLS is asyncio's SSLProtocol over a core stream (its app transport, still refusing other
    threads than the loop's, a subclass of asyncio's), and works."""
    code = (
        "import asyncio, kqfast, ssl, trustme\n"
        "ca = trustme.CA(); cert = ca.issue_cert('localhost')\n"
        "s = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH); cert.configure_cert(s)\n"
        "c = ssl.create_default_context(); ca.configure_trust(c)\n"
        "async def main():\n"
        "    async def echo(r, w):\n"
        "        w.write(await r.read(100)); w.close()\n"
        "    srv = await asyncio.start_server(echo, '127.0.0.1', 0, ssl=s)\n"
        "    r, w = await asyncio.open_connection(*srv.sockets[0].getsockname(), ssl=c,\n"
        "                                         server_hostname='localhost')\n"
        "    w.write(b'fallback'); print((await r.read(100)).decode(),\n"
        "          type(w.transport).__name__, type(w.transport._ssl_protocol._transport).__name__)\n"
        "    w.close(); srv.close()\n"
        "print(kqfast.TLS_ENGINE); kqfast.run(main())\n")
    env = dict(os.environ, KQFAST_TLS_ENGINE="asyncio")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "asyncio SSLProtocol over the core (KQFAST_TLS_ENGINE=asyncio asks for asyncio's own)",
        "fallback LoopThreadSSLTransport Transport"]
