"""kqfast's Python Protocol API over real loopback sockets: asyncio.Protocol factories, the
Transport, flow control, LineProtocol, timeouts and the Server lifecycle.

Protocol callbacks run on the server's loop thread; the tests wait on threading.Events set from
those callbacks (or on socket reads), and run transport calls on the loop thread through
call_soon_threadsafe (see on_loop)."""
from __future__ import annotations

import asyncio
import hashlib
import os
import queue
import random
import socket
import threading
import time

import pytest

import kqfast
from support import (
    connect_refused,
    connect_to,
    echo_through,
    on_loop,
    process_cpu_seconds,
    recv_exactly,
    recv_until_closed,
    recv_until_eof,
    reset_close,
    roundtrip,
    server_family,
    server_fd,
    wait_until,
)

pytestmark = pytest.mark.timeout(60)

MiB = 1 << 20
# One random MiB: blocks made from it are unique per index, so a lost, doubled or reordered
# byte changes the digest.
PATTERN = os.urandom(MiB)


def block(i: int) -> bytes:
    """The i-th 1 MiB block of a stream: its index, then the random pattern."""
    return i.to_bytes(4, "big") + PATTERN[4:]


def sha(data) -> str:
    return hashlib.sha256(data).hexdigest()


# -- protocols ------------------------------------------------------------------------------------

class Recorder(asyncio.Protocol):
    """Records every callback in order, with events for the test thread to wait on.

    options: on_made(p), on_data(p, data) and on_eof(p) hooks (on_eof's result is
    eof_received's); raise_in=(callback name, exception) plants a failure in that callback."""

    def __init__(self, **options):
        self.options = options
        self.events: list[tuple] = []
        self.flow: list[tuple] = []
        self.transport = None
        self.thread_ident = None
        self.lost_exc = "connection_lost was not called"
        self.lost_calls = 0
        self.state: dict = {}
        self.data = bytearray()
        self.cond = threading.Condition()
        self.made = threading.Event()
        self.eof = threading.Event()
        self.lost = threading.Event()
        self.paused = threading.Event()
        self.resumed = threading.Event()

    def _maybe_fail(self, where: str) -> None:
        planted = self.options.get("raise_in")
        if planted is not None and planted[0] == where:
            raise planted[1]

    def connection_made(self, transport):
        self.transport = transport
        self.thread_ident = threading.get_ident()
        self.events.append(("made",))
        self.made.set()
        self._maybe_fail("connection_made")
        if "on_made" in self.options:
            self.options["on_made"](self)

    def data_received(self, data):
        self.events.append(("data", bytes(data)))
        with self.cond:
            self.data += data
            self.cond.notify_all()
        self._maybe_fail("data_received")
        if "on_data" in self.options:
            self.options["on_data"](self, data)

    def eof_received(self):
        self.events.append(("eof",))
        self.eof.set()
        self._maybe_fail("eof_received")
        if "on_eof" in self.options:
            return self.options["on_eof"](self)
        return None

    def connection_lost(self, exc):
        self.events.append(("lost", exc))
        self.lost_calls += 1
        self.lost_exc = exc
        self.lost.set()

    def pause_writing(self):
        self.flow.append(("pause", self.transport.get_write_buffer_size()))
        self.paused.set()

    def resume_writing(self):
        self.flow.append(("resume", self.transport.get_write_buffer_size()))
        self.resumed.set()

    def kinds(self) -> list[str]:
        return [event[0] for event in self.events]

    def wait_data(self, n: int, timeout: float = 5.0) -> bool:
        """Waits until at least n bytes have arrived."""
        with self.cond:
            return self.cond.wait_for(lambda: len(self.data) >= n, timeout)


class LineRecorder(Recorder, kqfast.LineProtocol):
    """A LineProtocol that records its lines (and data_received, which must never come)."""

    def __init__(self, **options):
        super().__init__(**options)
        self.lines: list[bytes] = []

    def line_received(self, line):
        self.events.append(("line", line))
        with self.cond:
            self.lines.append(line)
            self.cond.notify_all()
        if self.options.get("echo"):
            self.transport.write(line)

    def wait_lines(self, n: int, timeout: float = 5.0) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: len(self.lines) >= n, timeout)


class Factory:
    """A protocol factory that keeps what it makes; arm(**options) adds options to the next
    protocol only."""

    def __init__(self, cls=Recorder, **options):
        self.cls, self.options = cls, options
        self.protocols: list[Recorder] = []
        self._made: queue.Queue = queue.Queue()
        self._armed: dict | None = None

    def arm(self, **options) -> None:
        self._armed = options

    def __call__(self):
        options = dict(self.options)
        if self._armed is not None:
            options.update(self._armed)
            self._armed = None
        protocol = self.cls(**options)
        self.protocols.append(protocol)
        self._made.put(protocol)
        return protocol

    def next(self, timeout: float = 5.0) -> Recorder:
        """The next protocol made, once its connection_made has run."""
        protocol = self._made.get(timeout=timeout)
        assert protocol.made.wait(timeout)
        return protocol


def echo(p: Recorder, data: bytes) -> None:
    p.transport.write(data)


def closes(sock: socket.socket) -> str:
    """Reads to the end; the peer must send nothing more. Returns "eof" or "reset"."""
    data, how = recv_until_closed(sock)
    assert data == b""
    return how


# -- a plain asyncio.Protocol, callback order, connection_lost ------------------------------------

class PlainEcho(asyncio.Protocol):
    """An unmodified asyncio echo protocol, as asyncio's docs write it."""

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.transport.write(data)


def test_plain_asyncio_protocol_echoes(serve):
    """A plain asyncio.Protocol subclass echoes 1 MiB byte for byte and closes at EOF."""
    server = serve(PlainEcho)
    payload = os.urandom(MiB)
    with connect_to(server) as client:
        assert echo_through(client, payload) == payload


def test_callback_order_made_data_eof_lost(serve):
    """Callbacks come in order: connection_made, data_received, eof_received, connection_lost."""
    factory = Factory()
    server = serve(factory)
    with connect_to(server) as client:
        p = factory.next()
        assert isinstance(p.transport, kqfast.Transport)
        client.sendall(b"hello, kqfast")
        client.shutdown(socket.SHUT_WR)
        assert recv_until_eof(client) == b""
    assert p.lost.wait(5)
    kinds = p.kinds()
    assert kinds[0] == "made" and kinds[-2:] == ["eof", "lost"]
    assert set(kinds[1:-2]) == {"data"}
    assert bytes(p.data) == b"hello, kqfast"
    assert p.lost_exc is None and p.lost_calls == 1
    assert p.thread_ident != threading.get_ident()


def test_connection_lost_none_when_the_server_closes(serve):
    """close() from a handler: the client gets the reply then EOF; connection_lost(None)."""
    def reply_and_close(p, data):
        p.transport.write(b"bye")
        p.transport.close()

    factory = Factory(on_data=reply_and_close)
    server = serve(factory)
    with connect_to(server) as client:
        p = factory.next()
        client.sendall(b"x")
        assert recv_until_eof(client) == b"bye"
    assert p.lost.wait(5)
    assert p.lost_exc is None and p.lost_calls == 1


def test_connection_lost_gets_connection_reset_error(serve):
    """A client reset (SO_LINGER 1,0 then close) gives connection_lost(ConnectionResetError)."""
    factory = Factory()
    server = serve(factory)
    client = connect_to(server)
    p = factory.next()
    reset_close(client)
    assert p.lost.wait(5)
    assert isinstance(p.lost_exc, ConnectionResetError), p.lost_exc
    assert p.kinds() == ["made", "lost"] and p.lost_calls == 1


# -- exceptions in handlers -----------------------------------------------------------------------

@pytest.mark.parametrize("where", ["connection_made", "data_received", "eof_received"])
def test_handler_exception_closes_only_its_connection(serve, caplog, where):
    """A ValueError in A's handler closes A (logged) while B completes 1000 echoes."""
    factory = Factory(on_data=echo)
    server = serve(factory)
    b_client = connect_to(server)
    pb = factory.next()
    progress = threading.Event()
    failures: list[BaseException] = []
    done = []

    def run_b():
        try:
            for i in range(1000):
                message = b"%06d|" % i * 8
                assert roundtrip(b_client, message) == message
                done.append(i)
                if i == 100:
                    progress.set()
        except BaseException as exc:  # reported below
            failures.append(exc)
            progress.set()

    b_thread = threading.Thread(target=run_b, daemon=True)
    b_thread.start()
    try:
        assert progress.wait(5)
        planted = ValueError(f"planted in {where}")
        factory.arm(raise_in=(where, planted))
        try:
            a_client = connect_to(server)
        except ConnectionResetError:
            # Failing in connection_made resets A so fast that connect() itself can see it.
            assert where == "connection_made"
            a_client = None
        pa = factory.next()
        if where == "data_received":
            a_client.sendall(b"boom")
        elif where == "eof_received":
            a_client.shutdown(socket.SHUT_WR)
        assert pa.lost.wait(5)
        assert pa.lost_exc is planted and pa.lost_calls == 1
        if a_client is not None:
            with a_client:
                closes(a_client)
        b_thread.join(10)
        assert not b_thread.is_alive()
        assert not failures, failures
        assert len(done) == 1000
        assert not pb.lost.is_set()
        assert roundtrip(b_client, b"after") == b"after"
    finally:
        b_client.close()
    assert any(r.exc_info and r.exc_info[1] is planted for r in caplog.records), caplog.records


@pytest.mark.parametrize("exc_type", [KeyboardInterrupt, SystemExit])
def test_base_exception_in_handler_stops_serve_forever(exc_type):
    """KeyboardInterrupt/SystemExit from a handler stop the server; serve_forever() re-raises."""
    factory = Factory()
    server = kqfast.Server(factory, port=0)
    outcome: queue.Queue = queue.Queue()

    def run():
        try:
            server.serve_forever()
        except BaseException as exc:  # handed to the test thread
            outcome.put(exc)
        else:
            outcome.put(None)

    runner = threading.Thread(target=run, daemon=True)
    runner.start()
    try:
        with connect_to(server) as bystander:
            pb = factory.next()
            factory.arm(raise_in=("data_received", exc_type("from a handler")))
            with connect_to(server) as client:
                factory.next()
                client.sendall(b"boom")
                raised = outcome.get(timeout=5)
            assert type(raised) is exc_type
            runner.join(5)
            assert not runner.is_alive()
            assert pb.lost.wait(5)
            closes(bystander)
        assert connect_refused(server.address)
    finally:
        server.stop(1.0)


# -- flow control ---------------------------------------------------------------------------------

def write_blocks(p, data):
    """One 1 MiB block per request byte."""
    for _ in range(len(data)):
        n = p.state.get("blocks", 0)
        p.transport.write(block(n))
        p.state["blocks"] = n + 1


def test_water_marks_pause_and_resume_writing(serve):
    """pause_writing for a client that does not read, resume_writing once it drains; bytes intact."""
    factory = Factory(on_data=write_blocks)
    server = serve(factory, max_output=64 * MiB)
    n = 8
    with connect_to(server, rcvbuf=65536) as client:
        p = factory.next()
        client.sendall(b"r" * n)
        assert p.paused.wait(5)
        assert not p.resumed.is_set()
        received = recv_exactly(client, n * MiB)
        assert p.resumed.wait(5)
    assert sha(received) == sha(b"".join(block(i) for i in range(n)))
    assert [kind for kind, _ in p.flow] == ["pause", "resume"]
    assert p.flow[0][1] >= 65536
    assert p.flow[1][1] <= 16384


def test_hard_output_cap_closes_a_peer_that_never_reads(serve):
    """Over max_output: closed with connection_lost(OSError); others are still served."""
    def hog(p, data):
        if not p.options.get("hog"):
            p.transport.write(data)
            return
        for _ in range(len(data)):
            p.transport.write(PATTERN)
            p.state["writes"] = p.state.get("writes", 0) + 1
            if p.transport.is_closing():
                p.state["closing"] = True
                break

    factory = Factory(on_data=hog)
    server = serve(factory, max_output=MiB)
    with connect_to(server) as bystander:
        factory.next()
        factory.arm(hog=True)
        with connect_to(server, rcvbuf=65536) as client:
            p = factory.next()
            client.sendall(b"r" * 64)
            assert p.lost.wait(5)
            assert isinstance(p.lost_exc, OSError), p.lost_exc
            assert p.lost_calls == 1
            assert p.state.get("closing") and p.state["writes"] < 64
            data, _ = recv_until_closed(client)
            assert len(data) < 64 * MiB
        assert roundtrip(bystander, b"still here") == b"still here"
    with connect_to(server) as other:
        assert roundtrip(other, b"new client") == b"new client"


def test_pause_reading_stops_delivery_until_resumed(serve):
    """pause_reading: no delivery, reads or busy loop; after resume_reading all 8 MiB arrive."""
    total = 8 * MiB
    payload = os.urandom(total)

    def pause_first(p, data):
        if len(p.events) == 2:  # made, then this first chunk
            p.transport.pause_reading()
            p.state["reading_after_pause"] = p.transport.is_reading()
            p.state["first"].set()
        else:
            p.state["more"].set()
        if len(p.data) >= total:
            p.state["done"].set()

    factory = Factory(on_data=pause_first)
    server = serve(factory)
    failures: list[BaseException] = []
    with connect_to(server) as client:
        p = factory.next()
        p.state.update(first=threading.Event(), more=threading.Event(), done=threading.Event())
        assert on_loop(server, p.transport.is_reading) is True

        def send():
            try:
                client.sendall(payload)
            except BaseException as exc:  # reported below
                failures.append(exc)

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        assert p.state["first"].wait(5)
        assert p.state["reading_after_pause"] is False
        assert on_loop(server, p.transport.is_reading) is False
        bytes_in = server.stats()["bytes_in"]
        cpu = process_cpu_seconds()
        assert not p.state["more"].wait(0.3)
        cpu = process_cpu_seconds() - cpu
        assert server.stats()["bytes_in"] == bytes_in, "the server kept reading while paused"
        assert cpu < 0.1, f"{cpu:.2f} s of CPU in 0.3 s while paused: a busy loop"
        assert len(p.data) < total

        def resume(t):
            t.resume_reading()
            return t.is_reading()

        assert on_loop(server, resume, p.transport) is True
        assert p.state["done"].wait(10)
        sender.join(5)
        assert not failures, failures
    assert len(p.data) == total
    assert sha(p.data) == sha(payload)


def test_eof_received_true_keeps_the_connection_half_open(serve):
    """eof_received True keeps it half-open: a later reply and close reach the client, then EOF."""
    factory = Factory(on_eof=lambda p: True)
    server = serve(factory)
    with connect_to(server) as client:
        p = factory.next()
        client.sendall(b"question")
        client.shutdown(socket.SHUT_WR)
        assert p.eof.wait(5)
        assert on_loop(server, p.transport.is_closing) is False
        client.settimeout(0.2)
        with pytest.raises(socket.timeout):
            client.recv(1)  # neither data nor EOF: the connection is still open
        client.settimeout(5)
        assert not p.lost.is_set()

        def reply(t):
            t.write(b"answer to " + bytes(p.data))
            t.close()

        on_loop(server, reply, p.transport)
        assert recv_until_eof(client) == b"answer to question"
    assert p.lost.wait(5)
    assert p.lost_exc is None
    assert p.kinds()[-2:] == ["eof", "lost"]


def test_write_eof_after_queuing_4_mib(serve):
    """write_eof with 4 MiB queued: the client gets 4 MiB then EOF, and can still send."""
    payload = os.urandom(4 * MiB)

    def send_then_eof(p, data):
        if p.state:
            return
        t = p.transport
        t.write(payload)
        p.state["queued"] = t.get_write_buffer_size()
        p.state["can_write_eof"] = t.can_write_eof()
        t.write_eof()
        try:
            t.write(b"too late")
        except RuntimeError:
            p.state["write_after_eof"] = "RuntimeError"
        p.state["closing"] = t.is_closing()

    factory = Factory(on_data=send_then_eof)
    server = serve(factory)
    with connect_to(server, rcvbuf=65536) as client:
        p = factory.next()
        client.sendall(b"go")
        assert recv_exactly(client, len(payload)) == payload
        assert client.recv(1) == b""  # EOF, right after the payload
        assert p.state["queued"] > 0  # write_eof really came with output still queued
        assert p.state["can_write_eof"] is True
        assert p.state["write_after_eof"] == "RuntimeError"
        assert p.state["closing"] is False
        client.sendall(b" and more")
        assert p.wait_data(len(b"go and more"))
        assert bytes(p.data) == b"go and more"
        assert not p.lost.is_set()
        client.shutdown(socket.SHUT_WR)
        assert p.lost.wait(5)
    assert p.lost_exc is None
    assert p.kinds()[-2:] == ["eof", "lost"]


# -- the transport --------------------------------------------------------------------------------

def test_get_extra_info_names_both_ends(serve):
    """get_extra_info: peername/sockname match the client; 'socket' is the connection's own
    socket behind asyncio's TransportSocket, which refuses what would stall the loop (blocking
    mode, a timeout); anything else gives the default."""
    factory = Factory(on_data=echo)
    server = serve(factory)

    def extra_info(t):
        sock = t.get_extra_info("socket")
        return {
            "peername": t.get_extra_info("peername"),
            "sockname": t.get_extra_info("sockname"),
            "socket": (sock.getpeername(), sock.getsockname(), sock.type),
            "same_fd": sock.fileno() == server_fd(t),
            "blocking": refusal(sock.setblocking, True),
            "timeout": refusal(sock.settimeout, 1.0),
            "missing": t.get_extra_info("no-such-thing", "default"),
        }

    def refusal(call, *args):
        try:
            call(*args)
        except ValueError as exc:
            return str(exc)
        return None

    with connect_to(server) as client:
        p = factory.next()
        info = on_loop(server, extra_info, p.transport)
        assert info["peername"] == client.getsockname()
        assert info["sockname"] == client.getpeername() == server.address
        assert info["socket"] == (client.getsockname(), client.getpeername(), socket.SOCK_STREAM)
        assert info["same_fd"]
        assert "cannot be blocking" in info["blocking"] and "only 0 timeout" in info["timeout"]
        assert info["missing"] == "default"
        assert roundtrip(client, b"still open") == b"still open"


@pytest.mark.parametrize("server_kw, default", [
    ({}, (16384, 65536)),
    ({"high_water": 200_000, "low_water": 50_000}, (50_000, 200_000)),
])
def test_write_buffer_limits_semantics(serve, server_kw, default):
    """get/set_write_buffer_limits follow asyncio (defaults, one-sided, ValueError if high < low)."""
    factory = Factory()
    server = serve(factory, **server_kw)

    def script(t):
        out = {"initial": t.get_write_buffer_limits(), "size": t.get_write_buffer_size()}
        t.set_write_buffer_limits(high=1000, low=100)
        out["both"] = t.get_write_buffer_limits()
        t.set_write_buffer_limits(high=4096)
        out["high_only"] = t.get_write_buffer_limits()
        t.set_write_buffer_limits(low=2000)
        out["low_only"] = t.get_write_buffer_limits()
        t.set_write_buffer_limits(high=5000, low=5000)
        out["equal"] = t.get_write_buffer_limits()
        for key, kw in (("high_below_low", dict(high=100, low=1000)),
                        ("negative_low", dict(high=10, low=-1))):
            try:
                t.set_write_buffer_limits(**kw)
                out[key] = "accepted"
            except ValueError:
                out[key] = "ValueError"
        out["after_errors"] = t.get_write_buffer_limits()
        t.set_write_buffer_limits()
        out["reset"] = t.get_write_buffer_limits()
        return out

    with connect_to(server) as client:
        p = factory.next()
        out = on_loop(server, script, p.transport)
        client.close()
    assert out == {
        "initial": default, "size": 0, "both": (100, 1000), "high_only": (1024, 4096),
        "low_only": (2000, 8000), "equal": (5000, 5000), "high_below_low": "ValueError",
        "negative_low": "ValueError", "after_errors": (5000, 5000), "reset": (16384, 65536),
    }


@pytest.mark.parametrize("limits, pauses, resume_at_most", [
    (None, True, 16384),
    ((1024, 0), True, 0),
    ((8 * MiB, 0), False, None),
])
def test_write_buffer_limits_drive_pause_writing(serve, limits, pauses, resume_at_most):
    """A transport's limits decide pause_writing/resume_writing; the buffer size drains to 0."""
    payload = PATTERN * 4

    def set_limits(p):
        if limits is not None:
            p.transport.set_write_buffer_limits(high=limits[0], low=limits[1])

    def write_once(p, data):
        p.transport.write(payload)
        p.state["size"] = p.transport.get_write_buffer_size()
        p.state["wrote"].set()

    factory = Factory(on_made=set_limits, on_data=write_once)
    server = serve(factory)
    with connect_to(server, rcvbuf=65536) as client:
        p = factory.next()
        p.state["wrote"] = threading.Event()
        client.sendall(b"w")
        assert p.state["wrote"].wait(5)
        assert 0 < p.state["size"] <= len(payload)
        assert p.paused.is_set() is pauses
        assert recv_exactly(client, len(payload)) == payload
        if pauses:
            assert p.resumed.wait(5)
            assert [kind for kind, _ in p.flow] == ["pause", "resume"]
            assert p.flow[1][1] <= resume_at_most
        else:
            assert p.flow == []
        assert on_loop(server, p.transport.get_write_buffer_size) == 0


def test_writelines(serve):
    """writelines sends a list (and any iterable) of bytes-like objects in order."""
    def write_lines(p, data):
        p.transport.writelines([b"ab", bytearray(b"cd"), memoryview(b"ef")])
        p.transport.writelines(chunk for chunk in (b"gh", b"ij"))
        p.transport.close()

    factory = Factory(on_data=write_lines)
    server = serve(factory)
    with connect_to(server) as client:
        factory.next()
        client.sendall(b"go")
        assert recv_until_eof(client) == b"abcdefghij"


def test_close_flushes_and_is_closing(serve):
    """close() flushes queued output first; is_closing() turns True; connection_lost(None)."""
    payload = os.urandom(4 * MiB)

    def write_and_close(p, data):
        t = p.transport
        t.write(payload)
        p.state["queued"] = t.get_write_buffer_size()
        p.state["closing_before"] = t.is_closing()
        t.close()
        t.close()  # twice is harmless
        p.state["closing_after"] = t.is_closing()

    factory = Factory(on_data=write_and_close)
    server = serve(factory)
    with connect_to(server, rcvbuf=65536) as client:
        p = factory.next()
        client.sendall(b"x")
        received = recv_until_eof(client)
    assert sha(received) == sha(payload)
    assert p.state["queued"] > 0
    assert p.state["closing_before"] is False and p.state["closing_after"] is True
    assert p.lost.wait(5)
    assert p.lost_exc is None and p.lost_calls == 1


def test_abort_drops_queued_output(serve):
    """abort() drops queued output: the client sees a reset or EOF; connection_lost(None)."""
    payload = PATTERN * 4

    def write_and_abort(p, data):
        t = p.transport
        t.write(payload)
        p.state["queued"] = t.get_write_buffer_size()
        t.abort()
        p.state["closing"] = t.is_closing()
        t.write(b"ignored")  # a closed transport ignores writes

    factory = Factory(on_data=write_and_abort)
    server = serve(factory)
    with connect_to(server, rcvbuf=65536) as client:
        p = factory.next()
        client.sendall(b"x")
        received, how = recv_until_closed(client)
    assert how in ("reset", "eof")
    assert len(received) < len(payload)
    assert p.state["queued"] > 0 and p.state["closing"] is True
    assert p.lost.wait(5)
    assert p.lost_exc is None and p.lost_calls == 1


# -- lifecycle ------------------------------------------------------------------------------------

def test_stop_from_another_thread_closes_every_connection(serve):
    """stop() from another thread: output flushed, every connection_lost runs, the port refuses."""
    factory = Factory(on_data=write_blocks)
    server = serve(factory)
    clients, protocols = [], []
    for _ in range(5):
        clients.append(connect_to(server, rcvbuf=65536))
        protocols.append(factory.next())
    try:
        clients[0].sendall(b"r" * 8)
        assert protocols[0].paused.wait(5)  # output is queued for client 0
        stopper = threading.Thread(target=server.stop, args=(5.0,), daemon=True)
        stopper.start()
        for client in clients[1:]:
            assert recv_until_eof(client) == b""
        received = recv_until_eof(clients[0])
        assert sha(received) == sha(b"".join(block(i) for i in range(8)))
    finally:
        for client in clients:
            client.close()
    stopper.join(5)
    assert not stopper.is_alive()
    for p in protocols:
        assert p.lost.wait(5)
        assert p.lost_exc is None and p.lost_calls == 1
    assert connect_refused(server.address)
    assert server.stats()["connections_current"] == 0
    server.stop(0.5)  # idempotent
    server.stop()
    assert connect_refused(server.address)


def test_stop_from_a_handler_on_the_loop_thread(serve):
    """stop() from a handler (the loop thread) does not deadlock; connections close, port refuses."""
    servers: list[kqfast.Server] = []
    factory = Factory(on_data=lambda p, data: servers[0].stop())
    servers.append(serve(factory))
    with connect_to(servers[0]) as client:
        p = factory.next()
        client.sendall(b"stop")
        assert closes(client) == "eof"
    assert p.lost.wait(5)
    assert p.lost_exc is None
    assert connect_refused(servers[0].address)


def test_context_manager_stops_the_server():
    """`with Server(...)` stops it on exit: the open connection is closed and the port refuses."""
    factory = Factory(on_data=echo)
    outcome: queue.Queue = queue.Queue()
    with kqfast.Server(factory, port=0) as server:
        assert server.start() is server
        client = connect_to(server)
        p = factory.next()
        assert roundtrip(client, b"inside") == b"inside"

        def close_on_eof():
            outcome.put(recv_until_closed(client))
            client.close()

        threading.Thread(target=close_on_eof, daemon=True).start()
    assert outcome.get(timeout=5) == (b"", "eof")
    assert p.lost.wait(5)
    assert p.lost_exc is None
    assert connect_refused(server.address)


def test_context_manager_closes_a_server_that_never_started():
    """A Server that never started still releases its listening socket on exit."""
    with kqfast.Server(Factory(), port=0) as server:
        address = server.address
        assert not connect_refused(address)  # bound and listening from __init__
    assert connect_refused(address)


def test_call_soon_threadsafe_runs_on_the_loop_thread(serve, caplog):
    """call_soon_threadsafe runs callback(*args) on the loop thread, in order; failures are logged."""
    factory = Factory(on_data=echo)
    server = serve(factory)
    with connect_to(server) as client:
        p = factory.next()
        results: queue.Queue = queue.Queue()

        def note(i, tag):
            results.put((i, tag, threading.get_ident()))

        def fail():
            raise ValueError("a failing callback")

        server.call_soon_threadsafe(fail)
        for i in range(100):
            server.call_soon_threadsafe(note, i, "from the test thread")
        got = [results.get(timeout=5) for _ in range(100)]
        assert [i for i, _, _ in got] == list(range(100))
        assert {tag for _, tag, _ in got} == {"from the test thread"}
        assert {ident for _, _, ident in got} == {p.thread_ident}
        assert p.thread_ident != threading.get_ident()

        def from_thread(k):
            for i in range(50):
                server.call_soon_threadsafe(note, i, k)

        threads = [threading.Thread(target=from_thread, args=(k,)) for k in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(5)
        got = [results.get(timeout=5) for _ in range(200)]
        for k in range(4):
            assert [i for i, tag, _ in got if tag == k] == list(range(50))
        assert {ident for _, _, ident in got} == {p.thread_ident}
        assert roundtrip(client, b"loop alive") == b"loop alive"
    assert any(r.exc_info and "a failing callback" in str(r.exc_info[1]) for r in caplog.records)


def test_stats_count_connections_and_bytes(serve):
    """stats(): current and total connections, bytes in and out, and a per-loop list."""
    factory = Factory(on_data=echo)
    server = serve(factory)
    first = server.stats()
    assert first["connections_current"] == 0 and first["connections_total"] == 0
    assert first["bytes_in"] == 0 and first["bytes_out"] == 0
    sizes = [1000, 20000, 300000]
    for size in sizes:
        with connect_to(server) as client:
            p = factory.next()
            assert server.stats()["connections_current"] == 1
            payload = os.urandom(size)
            assert echo_through(client, payload) == payload
        assert p.lost.wait(5)
    stats = server.stats()
    assert stats["connections_current"] == 0
    assert stats["connections_total"] == len(sizes)
    assert stats["bytes_in"] == sum(sizes)
    assert stats["bytes_out"] == sum(sizes)
    assert stats["errors"] == 0 and stats["timeouts"] == 0 and stats["connections_rejected"] == 0
    assert isinstance(stats["loops"], list) and len(stats["loops"]) == 1
    assert stats["loops"][0]["bytes_in"] == sum(sizes)


def test_stats_count_rejected_connections(serve):
    """Over max_connections a client is closed at once, without a protocol, and counted."""
    factory = Factory(on_data=echo)
    server = serve(factory, max_connections=1)
    with connect_to(server) as first:
        factory.next()
        try:
            second = connect_to(server)
        except ConnectionResetError:
            pass  # the reset can even beat connect() back to the client on loopback
        else:
            with second:
                closes(second)
        assert roundtrip(first, b"first") == b"first"
    assert len(factory.protocols) == 1
    assert server.stats()["connections_rejected"] == 1


def test_serve_runs_a_server_until_a_handler_exits(tmp_path):
    """kqfast.serve(handler, host, port, **kw) serves a Unix path until SystemExit, then re-raises."""
    path = str(tmp_path / "serve.sock")

    def echo_or_exit(p, data):
        if data == b"exit":
            raise SystemExit(3)
        p.transport.write(data)

    factory = Factory(on_data=echo_or_exit)
    outcome: queue.Queue = queue.Queue()

    def run():
        try:
            kqfast.serve(factory, path, 0, idle_timeout=0, max_line=1024)
        except BaseException as exc:  # handed to the test thread
            outcome.put(exc)
        else:
            outcome.put(None)

    threading.Thread(target=run, daemon=True).start()
    with connect_to(path, retry=5) as client:
        assert roundtrip(client, b"hello") == b"hello"
        client.sendall(b"exit")
        raised = outcome.get(timeout=5)
    assert isinstance(raised, SystemExit) and raised.code == 3


# -- LineProtocol ---------------------------------------------------------------------------------

def send_in_reads(server, client, pieces):
    """Sends each piece only once the server has read the previous ones (separate reads)."""
    sent = server.stats()["bytes_in"]
    for piece in pieces:
        client.sendall(piece)
        sent += len(piece)
        assert wait_until(lambda: server.stats()["bytes_in"] >= sent)


def test_line_protocol_frames_lines_across_reads(serve):
    """LineProtocol joins lines split over reads, keeps \\r\\n, gives a partial line before EOF."""
    factory = Factory(LineRecorder)
    server = serve(factory)
    with connect_to(server) as client:
        p = factory.next()
        send_in_reads(server, client, [b"he", b"llo\nwo", b"r", b"ld\r\n", b"\n", b"par", b"tial"])
        client.shutdown(socket.SHUT_WR)
        assert recv_until_eof(client) == b""
    assert p.lost.wait(5)
    assert p.events == [
        ("made",), ("line", b"hello\n"), ("line", b"world\r\n"), ("line", b"\n"),
        ("line", b"partial"), ("eof",), ("lost", None),
    ]


def test_line_protocol_many_lines_in_big_reads(serve):
    """LineProtocol frames ~1 MiB of lines of random lengths (straddling reads) exactly, in order."""
    rng = random.Random(1234)
    lines = [b"%d:" % i + bytes(rng.choice(b"abcdefgh \t\r") for _ in range(rng.randrange(0, 1500)))
             + (b"\r\n" if i % 3 == 0 else b"\n") for i in range(1500)]
    factory = Factory(LineRecorder, echo=True)
    server = serve(factory)
    stream = b"".join(lines)
    with connect_to(server) as client:
        p = factory.next()
        assert echo_through(client, stream) == stream
    assert p.lost.wait(5)
    assert p.lines == lines
    assert "data" not in p.kinds()


@pytest.mark.parametrize("pieces, accepted", [
    ([b"a" * 16 + b"\n"], True),
    ([b"e" * 16, b"\n"], True),
    ([b"b" * 17 + b"\n"], False),
    ([b"c" * 17], False),
    ([b"d" * 10, b"d" * 10], False),
    ([b"f" * 10, b"f" * 7 + b"\n"], False),
])
def test_line_protocol_max_line(serve, pieces, accepted):
    """A line of max_line bytes (plus newline) is delivered; a longer one closes, undelivered."""
    factory = Factory(LineRecorder, echo=True)
    server = serve(factory, max_line=16)
    with connect_to(server) as client:
        p = factory.next()
        send_in_reads(server, client, pieces)
        line = b"".join(pieces)
        if accepted:
            assert recv_exactly(client, len(line)) == line
            assert roundtrip(client, b"ok\n") == b"ok\n"
            assert p.lines == [line, b"ok\n"]
            assert not p.lost.is_set()
        else:
            closes(client)
            assert p.lost.wait(5)
            assert p.lines == []


# -- timeouts -------------------------------------------------------------------------------------

def test_idle_timeout_ends_a_silent_connection(serve):
    """idle_timeout=0.5: activity keeps a connection; silence ends it with TimeoutError."""
    factory = Factory(on_data=echo)
    server = serve(factory, idle_timeout=0.5)
    with connect_to(server) as client:
        p = factory.next()
        for i in range(6):  # 0.9 s of activity, never 0.5 s apart
            assert not p.lost.wait(0.15)
            assert roundtrip(client, b"ping %d" % i) == b"ping %d" % i
        silent_since = time.monotonic()
        assert p.lost.wait(5)
        silent_for = time.monotonic() - silent_since
        assert isinstance(p.lost_exc, TimeoutError), p.lost_exc
        assert p.lost_calls == 1
        assert 0.4 <= silent_for < 3.0
        closes(client)
    assert server.stats()["timeouts"] == 1


@pytest.mark.parametrize("idle_timeout", [0, None])
def test_idle_timeout_zero_disables_it(serve, idle_timeout):
    """idle_timeout=0 (or None) disables the timeout: a silent connection stays open."""
    factory = Factory(on_data=echo)
    server = serve(factory, idle_timeout=idle_timeout)
    with connect_to(server) as client:
        p = factory.next()
        assert not p.lost.wait(0.3)
        assert roundtrip(client, b"still here") == b"still here"


# -- addresses and many clients -------------------------------------------------------------------

def test_unix_socket_path(serve, tmp_path):
    """A Python protocol serves a Unix socket path: echo, sockname, clean close."""
    path = str(tmp_path / "kq.sock")
    factory = Factory(on_data=echo)
    server = serve(factory, host=path)
    assert server.address == path
    with connect_to(server) as client:
        assert client.family == socket.AF_UNIX
        p = factory.next()
        assert on_loop(server, p.transport.get_extra_info, "sockname") == path
        payload = os.urandom(300_000)
        assert echo_through(client, payload) == payload
    assert p.lost.wait(5)
    assert p.lost_exc is None


def test_ipv6_loopback(serve):
    """A Python protocol serves IPv6 "::1": echo, and peername matches the client."""
    factory = Factory(on_data=echo)
    server = serve(factory, host="::1")
    assert server.address[0] == "::1" and server.address[1] > 0
    assert server_family(server.address) == socket.AF_INET6
    with connect_to(server) as client:
        assert client.family == socket.AF_INET6
        p = factory.next()
        peer = on_loop(server, p.transport.get_extra_info, "peername")
        assert peer[:2] == client.getsockname()[:2]
        payload = os.urandom(300_000)
        assert echo_through(client, payload) == payload
    assert p.lost.wait(5)
    assert p.lost_exc is None


def test_many_concurrent_clients(serve):
    """200 clients connected at once each get their own id echoed back, then all close cleanly."""
    n = 200
    factory = Factory(on_data=echo)
    server = serve(factory)
    clients = [connect_to(server) for _ in range(n)]
    try:
        for rnd in range(3):
            for i, client in enumerate(clients):
                client.sendall(b"client %d round %d\n" % (i, rnd))
            for i, client in enumerate(clients):
                expected = b"client %d round %d\n" % (i, rnd)
                assert recv_exactly(client, len(expected)) == expected
        assert server.stats()["connections_current"] == n
        for client in clients:
            client.shutdown(socket.SHUT_WR)
        for client in clients:
            assert recv_until_eof(client) == b""
    finally:
        for client in clients:
            client.close()
    assert len(factory.protocols) == n
    for p in factory.protocols:
        assert p.lost.wait(5)
        assert p.lost_exc is None and p.lost_calls == 1
    assert server.stats()["connections_total"] == n
