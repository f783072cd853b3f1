"""kqfast.Loop's contract: how users get one (new_event_loop, run, Runner, asyncio.run's
loop_factory, the policy), and the transports it gives streams: real asyncio.Transports on
the core, asyncio's rules (BufferedProtocol, set_protocol, water marks, exceptions through
the exception handler), the thread rule, Ctrl-C during a nogil wait."""
from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import socket
import subprocess
import sys
import warnings
import threading

import pytest

import kqfast

pytestmark = pytest.mark.timeout(60)


def run(coro):
    return kqfast.run(coro)


async def serve(factory, **kwargs):
    loop = asyncio.get_running_loop()
    server = await loop.create_server(factory, "127.0.0.1", 0, **kwargs)
    return server, server.sockets[0].getsockname()[1]


class Collect(asyncio.Protocol):
    """Records what a server-side protocol sees; done resolves at connection_lost."""

    def __init__(self):
        self.events = []
        self.data = bytearray()
        self.done = asyncio.get_running_loop().create_future()

    def connection_made(self, transport):
        self.transport = transport
        self.events.append("made")

    def data_received(self, data):
        self.data += data

    def eof_received(self):
        self.events.append("eof")

    def connection_lost(self, exc):
        self.events.append("lost")
        if not self.done.done():
            self.done.set_result(exc)


# ---- getting a loop --------------------------------------------------------------------

def test_new_event_loop_is_an_asyncio_loop():
    loop = kqfast.new_event_loop()
    try:
        assert isinstance(loop, kqfast.Loop) and isinstance(loop, asyncio.AbstractEventLoop)
        assert loop.run_until_complete(asyncio.sleep(0, "done")) == "done"
    finally:
        loop.close()
    assert loop.is_closed()


def test_run_returns_the_result_on_a_kqfast_loop():
    async def main():
        await asyncio.sleep(0.01)
        return type(asyncio.get_running_loop()), asyncio.get_running_loop().get_debug()

    assert run(main()) == (kqfast.Loop, False)
    assert kqfast.run(main(), debug=True) == (kqfast.Loop, True)


@pytest.mark.skipif(sys.version_info < (3, 11), reason="asyncio.Runner is Python 3.11+")
def test_asyncio_runner_with_the_loop_factory():
    async def main():
        return type(asyncio.get_running_loop())

    with asyncio.Runner(loop_factory=kqfast.new_event_loop) as runner:
        assert runner.run(main()) is kqfast.Loop
        assert runner.run(main()) is kqfast.Loop


@pytest.mark.skipif(sys.version_info < (3, 12), reason="loop_factory is Python 3.12+")
def test_asyncio_run_with_the_loop_factory():
    async def main():
        return type(asyncio.get_running_loop())

    assert asyncio.run(main(), loop_factory=kqfast.new_event_loop) is kqfast.Loop


def test_event_loop_policy_makes_kqfast_loops():
    """The policy is made on first use and deprecated from 3.14, as asyncio's own are; the
    warning points at the code that asked for it."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        policy = kqfast.EventLoopPolicy()
    deprecated = [w for w in caught if issubclass(w.category, DeprecationWarning)]
    assert len(deprecated) == (sys.version_info >= (3, 14)), [str(w.message) for w in caught]
    assert all(w.filename == __file__ for w in deprecated)
    assert isinstance(policy, asyncio.AbstractEventLoopPolicy if sys.version_info < (3, 14)
                      else asyncio.events._AbstractEventLoopPolicy)
    loop = policy.new_event_loop()
    try:
        assert isinstance(loop, kqfast.Loop)
    finally:
        loop.close()


# ---- transports --------------------------------------------------------------------------

def test_server_and_client_transports_are_kqfast_transports():
    async def main():
        protos = []
        server, port = await serve(lambda: protos.append(Collect()) or protos[-1])
        transport, client = await asyncio.get_running_loop().create_connection(
            asyncio.Protocol, "127.0.0.1", port)
        assert transport.get_protocol() is client
        transport.write(b"x" * 100_000)
        transport.write_eof()
        await asyncio.wait_for(_until(lambda: protos and "eof" in protos[0].events), 10)
        assert isinstance(transport, kqfast.Transport)
        assert isinstance(transport, asyncio.Transport)
        assert isinstance(protos[0].transport, kqfast.Transport)
        assert bytes(protos[0].data) == b"x" * 100_000
        transport.close()
        await protos[0].done
        assert protos[0].events == ["made", "eof", "lost"]
        server.close()
        await server.wait_closed()

    run(main())


async def _until(predicate):
    while not predicate():
        await asyncio.sleep(0.001)


def test_buffered_protocol_reads_into_its_own_buffer():
    """The core reads straight into get_buffer(); 8 MiB arrive intact in small buffers."""

    class Buffered(asyncio.BufferedProtocol):
        def __init__(self):
            self.buf = bytearray(1000)
            self.hash = hashlib.sha256()
            self.sizes = set()
            self.done = asyncio.get_running_loop().create_future()

        def get_buffer(self, sizehint):
            return self.buf

        def buffer_updated(self, nbytes):
            self.sizes.add(nbytes)
            self.hash.update(self.buf[:nbytes])

        def eof_received(self):
            self.done.set_result(self.hash.hexdigest())

    payload = os.urandom(8 << 20)

    async def main():
        protos = []
        server, port = await serve(lambda: protos.append(Buffered()) or protos[-1])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(payload)
        await writer.drain()
        writer.write_eof()
        await asyncio.wait_for(_until(lambda: protos), 10)
        digest = await asyncio.wait_for(protos[0].done, 20)
        assert max(protos[0].sizes) <= 1000
        writer.close()
        server.close()
        return digest

    assert run(main()) == hashlib.sha256(payload).hexdigest()


def test_set_protocol_switches_mid_stream():
    """After set_protocol(), input goes to the new protocol (asyncio's upgrade path)."""

    class First(Collect):
        def data_received(self, data):
            super().data_received(data)
            if b"\n" in data:
                self.transport.set_protocol(second)

    async def main():
        nonlocal second
        second = Collect()
        first = First()
        server, port = await serve(lambda: first)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"upgrade\n")
        await asyncio.wait_for(_until(lambda: first.transport.get_protocol() is second), 10)
        writer.write(b"after")
        writer.write_eof()
        await asyncio.wait_for(_until(lambda: "eof" in second.events), 10)
        writer.close()
        server.close()
        return bytes(first.data), bytes(second.data)

    second = None
    assert run(main()) == (b"upgrade\n", b"after")


def test_water_marks_follow_asyncio():
    """pause_writing() once the buffer is over high (not at it), resume_writing() at or under
    low, get_write_buffer_limits() as asyncio reports it."""

    class Flow(Collect):
        def __init__(self):
            super().__init__()
            self.calls = []

        def pause_writing(self):
            self.calls.append(("pause", self.transport.get_write_buffer_size()))

        def resume_writing(self):
            self.calls.append(("resume", self.transport.get_write_buffer_size()))

    async def main():
        flow = Flow()
        server, port = await serve(lambda: flow)
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        await asyncio.wait_for(_until(lambda: "made" in flow.events), 10)
        t = flow.transport
        t.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        t.set_write_buffer_limits(high=100_000, low=10_000)
        assert t.get_write_buffer_limits() == (10_000, 100_000)
        while t.get_write_buffer_size() == 0:
            t.write(b"a" * 65536)
            await asyncio.sleep(0)
        t.write(b"b" * (100_000 - t.get_write_buffer_size()))
        assert flow.calls == []  # exactly at high: not over it
        t.write(b"c")
        assert flow.calls == [("pause", 100_001)]
        sock.setblocking(False)
        while len(flow.calls) < 2:
            try:
                sock.recv(1 << 20)
            except BlockingIOError:
                pass
            await asyncio.sleep(0.001)
        assert flow.calls[1][0] == "resume" and flow.calls[1][1] <= 10_000
        sock.close()
        server.close()

    run(main())


def test_callback_exception_goes_to_the_exception_handler_and_closes_only_that_stream():
    class Failing(Collect):
        def data_received(self, data):
            if data == b"boom":
                raise ValueError("boom")
            self.transport.write(data)

    async def main():
        loop = asyncio.get_running_loop()
        contexts = []
        loop.set_exception_handler(lambda loop, context: contexts.append(context))
        protos = []
        server, port = await serve(lambda: protos.append(Failing()) or protos[-1])
        r1, w1 = await asyncio.open_connection("127.0.0.1", port)
        r2, w2 = await asyncio.open_connection("127.0.0.1", port)
        w1.write(b"boom")
        assert await r1.read() == b""
        w2.write(b"fine")
        assert await r2.readexactly(4) == b"fine"
        await asyncio.wait_for(_until(lambda: len(protos) == 2 and "lost" in protos[0].events), 10)
        failed = next(p for p in protos if "lost" in p.events)
        assert isinstance(await failed.done, ValueError)
        (context,) = contexts
        assert isinstance(context["exception"], ValueError)
        assert context["protocol"] is failed and context["transport"] is failed.transport
        assert "data_received" in context["message"]
        w1.close()
        w2.close()
        server.close()

    run(main())


def test_transport_from_another_thread_raises_and_loses_nothing():
    """A worker thread writing to a transport gets RuntimeError every time; the loop's own
    writes all arrive, in order, and the process survives."""

    async def main():
        protos = []
        server, port = await serve(lambda: protos.append(Collect()) or protos[-1])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await asyncio.wait_for(_until(lambda: protos), 10)
        transport = protos[0].transport
        errors = []
        stop = threading.Event()

        def intruder():
            while not stop.is_set():
                for call in (lambda: transport.write(b"x" * 65536), transport.pause_reading,
                             transport.get_write_buffer_size, transport.close):
                    try:
                        call()
                    except RuntimeError as exc:
                        errors.append(str(exc))

        thread = threading.Thread(target=intruder)
        thread.start()
        expected = hashlib.sha256()
        for i in range(200):
            chunk = b"%d:" % i + os.urandom(4096)
            expected.update(chunk)
            transport.write(chunk)
            await asyncio.sleep(0)
        stop.set()
        await asyncio.get_running_loop().run_in_executor(None, thread.join)
        transport.write_eof()
        received = await reader.read()
        writer.close()
        server.close()
        return errors, hashlib.sha256(received).hexdigest() == expected.hexdigest()

    errors, intact = run(main())
    assert intact
    assert errors and all("thread other than its loop's" in e for e in errors)


def test_protocols_on_kqfast_server_have_a_running_loop(serve):
    """The issue's example: a protocol that replies after loop.call_later() and a task."""

    class Later(asyncio.Protocol):
        def connection_made(self, transport):
            self.transport = transport
            self.loop = asyncio.get_running_loop()

        def data_received(self, data):
            self.loop.call_later(0.01, self.transport.write, b"later:" + data)
            self.loop.create_task(self.reply(data))

        async def reply(self, data):
            await asyncio.sleep(0.02)
            self.transport.write(b"task:" + data)

    server = serve(Later)
    with socket.create_connection(server.address, timeout=10) as client:
        client.sendall(b"hi")
        got = b""
        while len(got) < len(b"later:hitask:hi"):
            got += client.recv(100)
    assert got == b"later:hitask:hi"


CTRL_C_CHILD = """
import asyncio, sys, kqfast
async def main():
    server = await asyncio.get_running_loop().create_server(asyncio.Protocol, "127.0.0.1", 0)
    print("READY", flush=True)
    await asyncio.sleep(3600)
try:
    kqfast.run(main())
except KeyboardInterrupt:
    print("INTERRUPTED", flush=True)
"""


def test_ctrl_c_ends_a_nogil_wait_at_once():
    """SIGINT to kqfast.run() blocked in the poller's wait: KeyboardInterrupt, promptly."""
    proc = subprocess.Popen([sys.executable, "-c", CTRL_C_CHILD], stdout=subprocess.PIPE,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT,
                                                                        signal.SIG_DFL))
    assert proc.stdout.readline().strip() == "READY"
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=10)
    assert out.strip() == "INTERRUPTED"
    assert proc.returncode == 0
