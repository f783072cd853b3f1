"""Hardening, round 2: misuse raises instead of crashing, workers are supervised, nothing is
reordered or lost.  Each test is named after its item of the issue; each failed on a1341b0
(crash, wrong order, hang or silence) before its fix."""
from __future__ import annotations

import asyncio
import errno
import math
import os
import queue
import select
import socket
import struct
import subprocess
import sys
import threading

import pytest

import kqfast
from support import (
    connect_to, cpu_seconds, recv_exactly, recv_until_closed, reset_close, roundtrip,
    serve_forever_in_thread, server_fd, wait_until,
)
from test_reliability import CHILD_PRELUDE, Book, Recorder, kill_child

pytestmark = pytest.mark.timeout(60)


# ---- 1. a transport used from another thread raises --------------------------------------

def test_01_worker_thread_writes_raise_and_the_loops_own_arrive():
    """A queue consumer thread writing to transports while the loop flushes them gets
    RuntimeError each time (on a1341b0 the process died of SIGSEGV or SIGABRT); the loop's own
    echoes of 150 lines of 1 KB on 10 clients all arrive, in order."""
    handed: queue.Queue = queue.Queue()

    class Echo(asyncio.Protocol):
        def connection_made(self, transport):
            self.transport = transport

        def data_received(self, data):
            self.transport.write(data)
            handed.put((self.transport, data))

    errors: list[str] = []
    stop = threading.Event()

    def consumer():
        while not stop.is_set():
            try:
                transport, data = handed.get(timeout=0.05)
            except queue.Empty:
                continue
            try:
                transport.write(data * 64)
            except RuntimeError as exc:
                errors.append(str(exc))

    server = kqfast.Server(Echo, port=0, max_output=1 << 30).start()
    thread = threading.Thread(target=consumer)
    thread.start()
    try:
        clients = [connect_to(server) for _ in range(10)]
        lines = [b"%04d " % i + b"x" * 1018 + b"\n" for i in range(150)]
        for client in clients:
            client.sendall(b"".join(lines))
        for client in clients:
            assert recv_exactly(client, 150 * 1024) == b"".join(lines)
            client.close()
    finally:
        stop.set()
        thread.join()
        server.stop()
    assert errors and all("thread other than its loop's" in e for e in errors)


# ---- 2. input read while paused keeps its order, and EOF comes after it ------------------

def test_02_paused_line_protocol_gets_every_line_in_order_then_eof():
    """LineProtocol pausing on "a"; the client sends a, b, c, then d and its EOF; resume from
    another thread: a, b, c, d, then eof (a1341b0 gave [a, d, b, c] or [a])."""
    seen: list = []
    paused = threading.Event()

    class Lines(kqfast.LineProtocol):
        def connection_made(self, transport):
            self.transport = transport
            seen.append(self)

        def line_received(self, line):
            seen.append(line)
            if line == b"a\n":
                self.transport.pause_reading()
                paused.set()

        def eof_received(self):
            seen.append("eof")

    server = kqfast.Server(Lines, port=0).start()
    try:
        client = connect_to(server)
        client.sendall(b"a\nb\nc\n")
        assert paused.wait(5)
        client.sendall(b"d\n")
        client.shutdown(socket.SHUT_WR)
        proto = seen[0]
        server.call_soon_threadsafe(proto.transport.resume_reading)
        assert recv_until_closed(client) == (b"", "eof")
        assert seen[1:] == [b"a\n", b"b\n", b"c\n", b"d\n", "eof"], seen
        client.close()
    finally:
        server.stop()


# ---- 3. writes count as activity for the idle timeout -----------------------------------

def test_03_a_connection_that_only_writes_is_not_idle():
    """A protocol streaming a chunk every 50 ms for 1.5 s to a client that never sends, with
    idle_timeout=0.5: every chunk arrives and the close is clean (a1341b0: TimeoutError)."""
    lost = []

    class Streamer(asyncio.Protocol):
        def connection_made(self, transport):
            self.transport = transport
            self.left = 30
            self.tick()

        def tick(self):
            if self.left == 0:
                self.transport.close()
                return
            self.left -= 1
            self.transport.write(b"chunk\n")
            asyncio.get_running_loop().call_later(0.05, self.tick)

        def connection_lost(self, exc):
            lost.append(exc)

    server = kqfast.Server(Streamer, port=0, idle_timeout=0.5).start()
    try:
        with connect_to(server, timeout=10) as client:
            data, how = recv_until_closed(client)
        assert (data, how) == (b"chunk\n" * 30, "eof")
        assert wait_until(lambda: lost) and lost == [None]
    finally:
        server.stop()


# ---- 5. closing a failed stream, and a transport made by hand ----------------------------

def test_05_close_in_the_failing_batch_keeps_the_failure():
    """Stream A failed (an ERROR event) in the batch where B's data closes A: A's
    connection_lost still gets the error (a1341b0: None)."""

    class Closer(Recorder):
        def data_received(self, data):
            super().data_received(data)
            if data == b"close the other":
                other = next(p for p in self.book.protocols if p is not self)
                other.transport.close()

    book = Book()
    server = kqfast.Server(book.factory(Closer), port=0)
    reactor = server._reactors[0]
    try:
        a, b = connect_to(server), connect_to(server)
        reactor._feed_events([(reactor.listen_fileno, kqfast._core.READABLE, 0)])
        pa, pb = book.protocols
        fa, fb = server_fd(pa.transport), server_fd(pb.transport)
        b.sendall(b"close the other")
        assert select.select([fb], [], [], 5)[0]
        reactor._feed_events([(fb, kqfast._core.READABLE, 0),
                              (fa, kqfast._core.ERROR, errno.ENOSPC)])
        assert pa.calls == ["made", "lost"], pa.calls
        assert isinstance(pa.exc, OSError) and pa.exc.errno == errno.ENOSPC, pa.exc
    finally:
        server.stop()
        a.close()
        b.close()


def test_05_a_transport_made_by_hand_raises_instead_of_crashing():
    with pytest.raises(TypeError, match="made by the event loop"):
        kqfast.Transport()
    bare = kqfast.Transport.__new__(kqfast.Transport)
    for call in (lambda: bare.write(b"x"), bare.close, bare.abort, bare.pause_reading,
                 bare.get_write_buffer_size, lambda: bare.get_extra_info("socket")):
        with pytest.raises(TypeError, match="made by the event loop"):
            call()


# ---- 6, 7. supervised workers, stop() from loop threads -----------------------------------

def test_06_systemexit_on_a_worker_loop_stops_the_server():
    """SystemExit from a protocol on loop 1 of 2 stops the whole server, and serve_forever()
    re-raises it (a1341b0: loop 1 died alone; loop 0 kept handing it clients that hung)."""

    class Exiter(asyncio.Protocol):
        def connection_made(self, transport):
            self.transport = transport

        def data_received(self, data):
            if data == b"exit":
                raise SystemExit(3)
            self.transport.write(data)

    server = kqfast.Server(Exiter, port=0, workers=2, balance="handoff")
    thread, outcome = serve_forever_in_thread(server)
    first, second = connect_to(server), connect_to(server)  # round-robin: loops 0 and 1
    try:
        assert roundtrip(first, b"hi") == b"hi" and roundtrip(second, b"hi") == b"hi"
        assert [loop["connections_current"] for loop in server.stats()["loops"]] == [1, 1]
        second.sendall(b"exit")
        thread.join(10)
        assert not thread.is_alive()
        assert len(outcome) == 1 and isinstance(outcome[0], SystemExit)
        assert outcome[0].code == 3
        assert recv_until_closed(first)[0] == b""  # loop 0 stopped and closed too
    finally:
        first.close()
        second.close()


def test_07_two_loops_calling_stop_from_callbacks_do_not_deadlock():
    """Both loops call server.stop() from a protocol callback at the same moment (each
    waits for the other inside its callback first): both finish, both replies arrive."""
    both_inside = threading.Barrier(2, timeout=5)

    class Stopper(asyncio.Protocol):
        def connection_made(self, transport):
            self.transport = transport

        def data_received(self, data):
            self.transport.write(data)
            both_inside.wait()
            server.stop(1.0)

    server = kqfast.Server(Stopper, port=0, workers=2, balance="handoff").start()
    clients = [connect_to(server), connect_to(server)]
    assert wait_until(lambda: [loop["connections_current"]
                               for loop in server.stats()["loops"]] == [1, 1])
    for client in clients:
        client.sendall(b"stop")
    for client in clients:
        assert recv_until_closed(client) == (b"stop", "eof")
        client.close()
    for thread in server._threads:
        thread.join(10)
        assert not thread.is_alive()


@pytest.mark.parametrize("handler", [kqfast.ECHO, asyncio.Protocol], ids=["native", "python"])
def test_07_a_stop_as_serving_begins_ends_serve_forever_cleanly(handler):
    """A signal handler's stop() that lands while serve_forever() is getting ready (here: just
    before the server counts as started) makes serve_forever() return, not fail on the loops
    that stop() closed; the port is free after."""
    class StoppedWhileStarting(kqfast.Server):
        def _check_not_started(self):
            self.stop()
            super()._check_not_started()

    server = StoppedWhileStarting(handler, port=0)
    port = server.address[1]
    server.serve_forever()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


# ---- 8, 14. ports other servers hold, names that do not resolve (kqfast.Server) ----------

def test_08_workers_refuse_a_port_another_server_holds():
    """Server(workers=2)'s SO_REUSEPORT listeners would silently join another server's group
    and take part of its clients: the port is refused instead."""
    first = kqfast.Server(kqfast.ECHO, port=0, workers=2, balance="reuseport").start()
    try:
        with pytest.raises(OSError) as caught:
            kqfast.Server(kqfast.ECHO, port=first.address[1], workers=2, balance="reuseport")
        assert caught.value.errno == errno.EADDRINUSE
        assert str(first.address[1]) in str(caught.value)
    finally:
        first.stop()


def test_14_a_host_that_does_not_resolve_is_named():
    with pytest.raises(OSError, match="cannot resolve host 'no-such-host.invalid'"):
        kqfast.Server(kqfast.ECHO, host="no-such-host.invalid", port=0)


# ---- 9. Unix socket files ----------------------------------------------------------------

def test_09_unix_socket_file_goes_with_the_server_and_a_stale_one_is_replaced(tmp_path):
    path = str(tmp_path / "kq.sock")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)  # a socket file that nothing listens on, as a crash leaves it
    stale.close()
    server = kqfast.Server(kqfast.ECHO, host=path).start()
    with socket.socket(socket.AF_UNIX) as client:
        client.connect(path)
        assert roundtrip(client, b"unix") == b"unix"
    server.stop()
    assert not os.path.exists(path)
    # A live one is left alone: the second server fails with the address in use.
    server = kqfast.Server(kqfast.ECHO, host=path).start()
    try:
        with pytest.raises(OSError) as caught:
            kqfast.Server(kqfast.ECHO, host=path)
        assert caught.value.errno == errno.EADDRINUSE
        assert os.path.exists(path)
    finally:
        server.stop()


@pytest.mark.parametrize("handler", [kqfast.ECHO, "python"])
def test_09_two_workers_on_a_unix_path_share_it(tmp_path, handler):
    """--workers 2 on a Unix path: one listener, hand-off to the other loop (a1341b0:
    EADDRINUSE)."""
    from kqfast._echo import EchoProtocol
    path = str(tmp_path / "kq.sock")
    server = kqfast.Server(EchoProtocol if handler == "python" else handler, host=path,
                           workers=2).start()
    clients = []
    try:
        for i in range(4):
            client = socket.socket(socket.AF_UNIX)
            client.connect(path)
            clients.append(client)
            assert roundtrip(client, b"%d" % i) == b"%d" % i
        assert [loop["connections_total"] for loop in server.stats()["loops"]] == [2, 2]
    finally:
        for client in clients:
            client.close()
        server.stop()


# ---- 10. resets during writes -------------------------------------------------------------

def test_10_resets_of_peers_that_never_read_leave_the_loop_responsive():
    """20 clients in a row: a 4 KiB receive buffer, up to 4 MiB sent without reading (the
    native echo stops reading them at high water: backpressure, so a send may stall), then a
    reset (SO_LINGER 0).  After each, a new client is echoed at once, and nothing is left."""
    server = kqfast.Server(kqfast.ECHO, port=0).start()
    blob = memoryview(b"x" * (4 << 20))
    try:
        for i in range(20):
            hog = connect_to(server, rcvbuf=4096)
            hog.setblocking(False)
            sent = 0
            # Send until done or until the kernel's buffers are full (the server stopped
            # reading a peer that does not read its echo).
            while sent < len(blob) and select.select([], [hog], [], 0.2)[1]:
                try:
                    sent += hog.send(blob[sent:])
                except BlockingIOError:
                    pass
            hog.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            hog.close()
            with connect_to(server, timeout=5) as probe:
                assert roundtrip(probe, b"ok\n") == b"ok\n", f"round {i}"
        assert wait_until(lambda: server.stats()["connections_current"] == 0)
    finally:
        server.stop()


# ---- 11. kqueue's queued changes -------------------------------------------------------

QUEUED_CHANGES_PAST_CAP = 200  # two changes each: past the backend's queue of 256


def test_11_a_change_that_fails_later_is_its_own_fds_error():
    """An add for fd A is queued (kqueue sends changes with the next wait) and A is closed;
    B's changes then fill the queue, which is applied early: B's change succeeds, and A's
    failure comes back from the next wait as A's ERROR event (on epoll the add was applied at
    once, and the closed A is simply gone)."""
    from kqfast._core import ERROR, READABLE, WRITABLE, Poller
    poller = Poller()
    a1, a2 = socket.socketpair()
    b1, b2 = socket.socketpair()
    both = READABLE | WRITABLE
    try:
        poller.set(b1.fileno(), 0, READABLE)
        poller.wait(0)
        fd_a = a1.fileno()
        poller.set(fd_a, 0, READABLE)
        a1.close()
        for _ in range(QUEUED_CHANGES_PAST_CAP):  # must not raise for A's sake
            poller.set(b1.fileno(), READABLE, both)
            poller.set(b1.fileno(), both, READABLE)
        events = [event for event in poller.wait(0) if event[0] == fd_a]
        if kqfast.BACKEND == "kqueue":
            assert events == [(fd_a, ERROR, errno.EBADF)], events
        else:
            assert events == [], events
    finally:
        poller.close()
        for s in (a2, b1, b2):
            s.close()


def test_11_a_reset_seen_by_the_write_filter_is_a_reset(serve):
    """A reset while the server waits to write, its reading paused (so only write interest is
    registered), is connection_lost(ConnectionResetError), never a BrokenPipeError: kqueue's
    write filter carries the socket error in fflags, and libkqueue cleared SO_ERROR to get it."""
    book = Book()

    class Stalled(Recorder):
        def connection_made(self, transport):
            transport.pause_reading()
            transport.write(bytes(8 << 20))  # far more than the socket buffers hold
            super().connection_made(transport)

    server = serve(book.factory(Stalled), max_output=64 << 20)
    client = connect_to(server, rcvbuf=4096)
    assert book.wait_for(lambda: book.protocols)
    reset_close(client)
    assert book.wait_for(lambda: "lost" in book.protocols[0].calls)
    assert isinstance(book.protocols[0].exc, ConnectionResetError), book.protocols[0].exc


def test_11_a_listener_error_event_is_not_accept_readiness():
    """An ERROR event on the listener is counted and nothing is accepted for it."""
    server = kqfast.Server(kqfast.ECHO, port=0)
    reactor = server._reactors[0]
    try:
        with connect_to(server) as client:
            reactor._feed_events([(reactor.listen_fileno, kqfast._core.ERROR, errno.EINVAL)])
            stats = server.stats()
            assert stats["connections_total"] == 0 and stats["errors"] == 1
            reactor._feed_events([(reactor.listen_fileno, kqfast._core.READABLE, 0)])
            assert server.stats()["connections_total"] == 1
            assert client.fileno() >= 0
    finally:
        server.stop()


# ---- 12. the tutorial EventLoop at the fd limit --------------------------------------------

TUTORIAL_AT_FD_LIMIT = CHILD_PRELUDE + """
import resource
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (32, hard))
sock = kqfast.listen("127.0.0.1", 0)
loop = kqfast.EventLoop(sock)
def echo(conn):
    data = conn.read(4096)
    if data:
        conn.write(data)
print("READY", sock.getsockname()[1], flush=True)
loop.handle(echo)
"""


def test_12_tutorial_event_loop_survives_the_fd_limit():
    """At RLIMIT_NOFILE=32 the tutorial loop keeps serving the clients it has, lets the next
    one wait in the backlog without spinning, and serves it once fds are free (a1341b0: it
    died on EMFILE)."""
    proc = subprocess.Popen([sys.executable, "-c", TUTORIAL_AT_FD_LIMIT],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    clients: list[socket.socket] = []
    try:
        port = int(proc.stdout.readline().split()[1])
        while True:
            client = socket.create_connection(("127.0.0.1", port), timeout=5)
            client.settimeout(0.5)
            client.sendall(b"ping")
            try:
                answered = client.recv(4) == b"ping"
            except socket.timeout:
                answered = False
            if not answered:
                waiting = client
                break
            clients.append(client)
            assert len(clients) < 32, "never ran out of fds"
        assert proc.poll() is None, proc.communicate()
        spent = cpu_seconds(proc.pid)
        for client in clients:
            assert roundtrip(client, b"still") == b"still"
        assert cpu_seconds(proc.pid) - spent < 0.2, "the loop spins at the fd limit"
        clients.pop().close()
        waiting.settimeout(5)
        assert waiting.recv(4) == b"ping"  # accepted once an fd was free, its data intact
        waiting.close()
    finally:
        for client in clients:
            client.close()
        kill_child(proc)


# ---- 13. settings that are no number of seconds -------------------------------------------

@pytest.mark.parametrize("setting", ["idle_timeout", "linger_timeout"])
@pytest.mark.parametrize("value", [math.nan, -1.0, math.inf * -1])
def test_13_nan_and_negative_timeouts_are_refused(setting, value):
    with pytest.raises(ValueError, match=setting):
        kqfast.Server(kqfast.ECHO, port=0, **{setting: value})


def test_13_stop_timeout_must_be_a_number_of_seconds():
    server = kqfast.Server(kqfast.ECHO, port=0).start()
    try:
        with pytest.raises(ValueError, match="timeout"):
            server.stop(math.nan)
    finally:
        server.stop()


# ---- 15. handler errors, BufferedProtocol on kqfast.Server -------------------------------

def test_15_handler_errors_are_counted_and_logged_with_the_peer(caplog):
    class Failing(asyncio.Protocol):
        def data_received(self, data):
            raise ValueError("handler bug")

    server = kqfast.Server(Failing, port=0).start()
    try:
        with connect_to(server) as client:
            client.sendall(b"x")
            assert recv_until_closed(client)[0] == b""
            peer = client.getsockname()
        assert wait_until(lambda: server.stats()["handler_errors"] == 1)
        assert server.stats()["errors"] >= 1
        record = next(r for r in caplog.records if r.name == "kqfast" and r.exc_info)
        assert str(peer) in record.getMessage() and "handler bug" in str(record.exc_info[1])
    finally:
        server.stop()


class _RaisesAfterReplying(asyncio.Protocol):
    """Replies to the first data, then raises in the same callback."""

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.transport.write(b"reply\n")
        raise ValueError("handler bug")


def _first_reply_then_how_it_ended(address) -> tuple[bytes, str]:
    with connect_to(address) as client:
        client.sendall(b"x")
        return recv_until_closed(client)


def test_15_a_handler_that_raises_closes_its_client_as_asyncio_does(caplog):
    """asyncio's transport closes (FIN) the connection of a callback that raised; so does
    kqfast.Server's, after sending what the socket took: never a reset."""
    async def on_asyncio():
        server = await asyncio.get_running_loop().create_server(
            _RaisesAfterReplying, "127.0.0.1", 0)
        address = server.sockets[0].getsockname()
        async with server:
            return await asyncio.to_thread(_first_reply_then_how_it_ended, address)

    oracle = asyncio.run(on_asyncio())
    server = kqfast.Server(_RaisesAfterReplying, port=0).start()
    try:
        assert _first_reply_then_how_it_ended(server.address) == oracle == (b"reply\n", "eof")
    finally:
        server.stop()


def test_15_a_protocol_factory_that_raises_is_logged_with_the_peer(caplog):
    def factory():
        raise RuntimeError("factory bug")

    server = kqfast.Server(factory, port=0).start()
    try:
        with socket.socket() as client:
            client.settimeout(5)
            client.bind(("127.0.0.1", 0))
            peer = client.getsockname()
            try:  # the server resets a connection it has no protocol for, maybe mid-connect
                client.connect(server.address)
                recv_until_closed(client)
            except ConnectionResetError:
                pass
        # The count goes up just before the line is logged, on the loop's thread.
        assert wait_until(lambda: any(r.name == "kqfast" for r in caplog.records))
        assert server.stats()["handler_errors"] == 1
        record = next(r for r in caplog.records if r.name == "kqfast" and r.exc_info)
        assert f"(peer {peer})" in record.getMessage()
        assert "factory bug" in str(record.exc_info[1])
    finally:
        server.stop()


def test_15_buffered_protocol_on_server():
    """asyncio.BufferedProtocol works on kqfast.Server (a1341b0 failed it per connection)."""

    class Upper(asyncio.BufferedProtocol):
        def connection_made(self, transport):
            self.transport = transport
            self.buf = bytearray(64)

        def get_buffer(self, sizehint):
            return self.buf

        def buffer_updated(self, nbytes):
            self.transport.write(bytes(self.buf[:nbytes]).upper())

    server = kqfast.Server(Upper, port=0).start()
    try:
        with connect_to(server) as client:
            payload = b"buffered protocol " * 1000
            client.sendall(payload)
            assert recv_exactly(client, len(payload)) == payload.upper()
    finally:
        server.stop()
