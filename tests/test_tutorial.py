"""The Python API of design.md: the tutorial level (kqfast.listen, kqfast.Socket,
kqfast.EventLoop, as in the seed tutorial's line-echo main, made correct) and the production
level (kqfast.Server with the native handlers)."""
from __future__ import annotations

import errno
import gc
import importlib.metadata
import signal
import socket
import sys
import tempfile
import textwrap
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import kqfast
from support import (
    connect_refused, fd_count, recv_exactly, recv_until_closed, roundtrip, start_child,
    start_python, wait_until,
)


# ---- kqfast.listen and kqfast.Socket ---------------------------------------------------

def test_listen_ipv4_returns_a_socket_on_that_address():
    """listen("127.0.0.1", 0, backlog=...) gives a Socket bound there (not 0.0.0.0)."""
    sock = kqfast.listen("127.0.0.1", 0, backlog=16)
    try:
        assert isinstance(sock, kqfast.Socket)
        fd = sock.fileno()
        assert isinstance(fd, int) and fd >= 0
        assert str(sock) == str(fd)
        host, port = sock.getsockname()
        assert host == "127.0.0.1" and port > 0
        with socket.create_connection((host, port), timeout=5):
            pass  # the kernel completes the handshake: it listens
    finally:
        sock.close()
    assert connect_refused((host, port))


def test_listen_positional_backlog():
    """listen(host, port, backlog) takes the backlog positionally, as the tutorial does."""
    sock = kqfast.listen("127.0.0.1", 0, 8)
    try:
        assert sock.getsockname()[0] == "127.0.0.1"
    finally:
        sock.close()


def test_listen_ipv6():
    """listen("::1", ...) binds the IPv6 loopback."""
    sock = kqfast.listen("::1", 0, 16)
    try:
        assert str(sock) == str(sock.fileno())
        host, port = sock.getsockname()[:2]
        assert host == "::1" and port > 0
        with socket.create_connection(("::1", port), timeout=5) as client:
            assert client.family == socket.AF_INET6
    finally:
        sock.close()


def test_listen_unix_path():
    """A host containing "/" is a Unix socket path."""
    with tempfile.TemporaryDirectory(prefix="kqf", dir="/tmp") as tmp:
        path = str(Path(tmp) / "t.sock")
        sock = kqfast.listen(path, 0, 16)
        try:
            assert str(sock) == str(sock.fileno())
            assert sock.getsockname() == path
            with socket.socket(socket.AF_UNIX) as client:
                client.settimeout(5)
                client.connect(path)
        finally:
            sock.close()


def test_listen_on_a_port_in_use_raises_oserror():
    """Binding a port another socket listens on raises OSError(EADDRINUSE)."""
    with socket.create_server(("127.0.0.1", 0)) as squatter:
        with pytest.raises(OSError) as info:
            kqfast.listen("127.0.0.1", squatter.getsockname()[1], 16)
    assert info.value.errno == errno.EADDRINUSE


# ---- kqfast.EventLoop ------------------------------------------------------------------

class LineEcho:
    """The tutorial main's handler, non-blocking: echo each line, close at a blank one, and
    at EOF (read returns b"") echo the unfinished line, then close."""

    def __init__(self, fail_on: bytes | None = None):
        self.pending: dict = {}
        self.fail_on = fail_on

    def __call__(self, conn) -> None:
        buf = self.pending.setdefault(conn, bytearray())
        while True:
            try:
                data = conn.read(4096)
            except BlockingIOError:
                return
            if not data:
                self.pending.pop(conn)
                if buf.strip():
                    conn.write(bytes(buf))
                conn.close()
                return
            buf += data
            while b"\n" in buf:
                end = buf.index(b"\n") + 1
                line = bytes(buf[:end])
                del buf[:end]
                if line == self.fail_on:
                    raise RuntimeError("the handler failed on purpose")
                if not line.strip():
                    self.pending.pop(conn)
                    conn.close()
                    return
                assert conn.write(line) == len(line)


@dataclass
class RunningLoop:
    """An EventLoop serving a listening Socket from a thread."""
    sock: object
    loop: kqfast.EventLoop
    thread: threading.Thread
    errors: list = field(default_factory=list)

    @property
    def address(self):
        return self.sock.getsockname()

    def connect(self) -> socket.socket:
        return socket.create_connection(self.address[:2], timeout=5)


@pytest.fixture
def tutorial_loop():
    """Runs kqfast.EventLoop(kqfast.listen(...)).handle(handler) in threads, stopped at the
    end."""
    running: list[RunningLoop] = []

    def start(handler, host: str = "127.0.0.1") -> RunningLoop:
        sock = kqfast.listen(host, 0, 128)
        loop = kqfast.EventLoop(sock)
        errors: list = []

        def run():
            try:
                loop.handle(handler)
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        result = RunningLoop(sock, loop, thread, errors)
        running.append(result)
        return result

    yield start
    for r in running:
        r.loop.stop()
        r.thread.join(5)
        r.sock.close()


def test_event_loop_echoes_lines_until_a_blank_one(tutorial_loop):
    """The tutorial's protocol: every line back, \\n or \\r\\n, then a blank line closes."""
    server = tutorial_loop(LineEcho())
    with server.connect() as client:
        assert roundtrip(client, b"hello\n") == b"hello\n"
        assert roundtrip(client, b"one\r\ntwo\n") == b"one\r\ntwo\n"
        client.sendall(b"   \r\nnot echoed\n")
        assert recv_until_closed(client) == (b"", "eof")
    assert server.errors == []


@pytest.mark.parametrize("host", ["::1", "unix"])
def test_event_loop_on_ipv6_and_unix_listeners(tutorial_loop, host):
    """EventLoop serves a Socket from listen() on IPv6 and on a Unix path alike."""
    with tempfile.TemporaryDirectory(prefix="kqf", dir="/tmp") as tmp:
        if host == "unix":
            path = str(Path(tmp) / "loop.sock")
            server = tutorial_loop(LineEcho(), host=path)
            client = socket.socket(socket.AF_UNIX)
            client.settimeout(5)
            client.connect(path)
        else:
            server = tutorial_loop(LineEcho(), host=host)
            client = socket.create_connection(server.address[:2], timeout=5)
        with client:
            assert roundtrip(client, b"over " + host.encode() + b"\n") == \
                b"over " + host.encode() + b"\n"


def test_non_blocking_read_returns_empty_bytes_at_eof(tutorial_loop):
    """conn.read() returns b"" at EOF, so the handler can echo an unfinished last line."""
    server = tutorial_loop(LineEcho())
    with server.connect() as client:
        assert roundtrip(client, b"first\n") == b"first\n"
        client.sendall(b"no newline")
        client.shutdown(socket.SHUT_WR)
        assert recv_until_closed(client) == (b"no newline", "eof")


def test_a_client_mid_line_does_not_stall_the_others(tutorial_loop):
    """One client's unfinished line (the tutorial's blocking read) holds no one up."""
    server = tutorial_loop(LineEcho())
    with server.connect() as slow, server.connect() as fast:
        slow.sendall(b"half a li")
        assert roundtrip(fast, b"served meanwhile\n") == b"served meanwhile\n"
        slow.sendall(b"ne\n")
        assert slow.recv(100) == b"half a line\n"


def test_event_loop_serves_many_clients(tutorial_loop):
    """Twenty clients at once each get their own lines back, then close at a blank line."""
    server = tutorial_loop(LineEcho())
    clients = [server.connect() for _ in range(20)]
    try:
        for i, client in enumerate(clients):
            client.sendall(b"client %d\n" % i)
        for i, client in enumerate(clients):
            assert recv_exactly(client, len(b"client %d\n" % i)) == b"client %d\n" % i
        for client in clients:
            client.sendall(b"\n")
            assert recv_until_closed(client) == (b"", "eof")
    finally:
        for client in clients:
            client.close()


def test_stop_from_another_thread_returns_handle_promptly(tutorial_loop):
    """loop.stop() from another thread makes the blocked handle() return at once."""
    server = tutorial_loop(LineEcho())
    with server.connect() as client:
        assert roundtrip(client, b"serving\n") == b"serving\n"
        started = time.monotonic()
        stopper = threading.Thread(target=server.loop.stop)
        stopper.start()
        stopper.join(5)
        server.thread.join(5)
        assert not server.thread.is_alive()
        assert time.monotonic() - started < 2
    assert server.errors == []


def test_stop_before_handle_starts_is_not_lost():
    """A stop() that comes before handle() begins (it raced the thread's start) still ends
    it."""
    sock = kqfast.listen("127.0.0.1", 0, 16)
    try:
        loop = kqfast.EventLoop(sock)
        loop.stop()
        thread = threading.Thread(target=loop.handle, args=(LineEcho(),), daemon=True)
        thread.start()
        thread.join(3)
        alive = thread.is_alive()
        if alive:
            loop.stop()  # do not leave it running
            thread.join(3)
        assert not alive, "handle() ignored a stop() made just before it started"
    finally:
        sock.close()


def test_handler_exception_closes_only_that_client(tutorial_loop):
    """A handler that raises closes its client; the loop and other clients go on."""
    server = tutorial_loop(LineEcho(fail_on=b"boom\n"))
    with server.connect() as victim, server.connect() as bystander:
        assert roundtrip(victim, b"fine\n") == b"fine\n"
        assert roundtrip(bystander, b"fine too\n") == b"fine too\n"
        victim.sendall(b"boom\n")
        assert recv_until_closed(victim)[0] == b""
        assert roundtrip(bystander, b"still served\n") == b"still served\n"
        with server.connect() as newcomer:
            assert roundtrip(newcomer, b"new client\n") == b"new client\n"
    assert server.thread.is_alive()
    assert server.errors == []


# What Ctrl-C does in a terminal, even when the test run inherited SIGINT ignored (a shell's
# background job): Python then leaves SIGINT ignored in every child it starts.
CHILD_PREAMBLE = """
import signal
signal.signal(signal.SIGINT, signal.default_int_handler)
"""

CHILD_EVENT_LOOP = CHILD_PREAMBLE + textwrap.dedent("""
    import kqfast
    sock = kqfast.listen("127.0.0.1", 0, 16)
    loop = kqfast.EventLoop(sock)

    def echo(conn):
        try:
            data = conn.read(4096)
        except BlockingIOError:
            return
        if data:
            conn.write(data)

    print("READY", sock.getsockname()[1], flush=True)
    loop.handle(echo)
""")


def test_ctrl_c_stops_event_loop_handle():
    """SIGINT to a process blocked in EventLoop.handle() ends it with KeyboardInterrupt."""
    proc, words = start_python(CHILD_EVENT_LOOP)
    try:
        with socket.create_connection(("127.0.0.1", int(words[0])), timeout=5) as client:
            assert roundtrip(client, b"in the loop\n") == b"in the loop\n"
            started = time.monotonic()
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=5)
            assert time.monotonic() - started < 3
        assert proc.returncode != 0
        assert "KeyboardInterrupt" in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


CHILD_SERVER = CHILD_PREAMBLE + textwrap.dedent("""
    import sys
    import kqfast
    server = kqfast.Server(kqfast.LINE_ECHO, port=0)
    print("READY", server.address[1], flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("INTERRUPTED", flush=True)
        sys.stdin.read()  # alive until the parent has checked the port
        raise
""")


def test_ctrl_c_stops_serve_forever_and_closes_the_port():
    """SIGINT during Server.serve_forever(): KeyboardInterrupt, and the port is closed."""
    proc, stdout, words = start_child(CHILD_SERVER)
    port = int(words[0])
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
            assert roundtrip(client, b"serving\n") == b"serving\n"
            started = time.monotonic()
            proc.send_signal(signal.SIGINT)
            stdout.expect("INTERRUPTED", timeout=5)
            assert time.monotonic() - started < 3
        assert connect_refused(("127.0.0.1", port))  # while the process still lives
        proc.stdin.close()
        assert proc.wait(timeout=5) != 0
        err = proc.stderr.read()
        assert "KeyboardInterrupt" in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


# ---- kqfast.Server with native handlers ------------------------------------------------

def test_version_and_backend():
    """__version__ is the installed distribution's version; BACKEND names a real poller."""
    assert kqfast.__version__ == importlib.metadata.version("kqfast")
    assert kqfast.BACKEND in ("epoll", "kqueue")
    if not sys.platform.startswith("linux"):
        assert kqfast.BACKEND == "kqueue"


def test_server_start_gives_address_and_echoes(serve):
    """Server(ECHO, port=0).start() returns listening; address is ('127.0.0.1', port)."""
    server = serve(kqfast.ECHO)
    host, port = server.address
    assert (host, type(port)) == ("127.0.0.1", int) and port > 0
    with socket.create_connection(server.address, timeout=5) as client:
        assert client.getpeername() == ("127.0.0.1", port)
        assert roundtrip(client, b"raw bytes \x00\xff\n\n") == b"raw bytes \x00\xff\n\n"


def test_server_line_echo(serve):
    """Server(LINE_ECHO) echoes lines and closes at a blank one."""
    server = serve(kqfast.LINE_ECHO)
    with socket.create_connection(server.address, timeout=5) as client:
        assert roundtrip(client, b"a line\r\n") == b"a line\r\n"
        client.sendall(b"last\n\nnot echoed\n")
        assert recv_until_closed(client) == (b"last\n", "eof")


def test_default_host_is_loopback():
    """Without host, the server binds 127.0.0.1 (its real sockname), not every address."""
    with kqfast.Server(kqfast.ECHO, port=0) as server:
        server.start()
        assert server.address[0] == "127.0.0.1"
        with socket.create_connection(server.address, timeout=5) as client:
            assert client.getpeername()[0] == "127.0.0.1"
            assert roundtrip(client, b"x") == b"x"


def test_stop_from_another_thread_returns_and_closes(serve):
    """stop() from another thread returns; the port is then closed and clients end."""
    server = serve(kqfast.LINE_ECHO)
    with socket.create_connection(server.address, timeout=5) as client:
        assert roundtrip(client, b"before stop\n") == b"before stop\n"
        stopper = threading.Thread(target=server.stop, kwargs={"timeout": 2.0})
        started = time.monotonic()
        stopper.start()
        assert recv_until_closed(client)[0] == b""
    stopper.join(5)
    assert not stopper.is_alive()
    assert time.monotonic() - started < 4
    assert connect_refused(server.address)


def test_stop_is_idempotent(serve):
    """Calling stop() twice (and on a server never started) is harmless."""
    server = serve(kqfast.ECHO)
    server.stop()
    server.stop()
    assert connect_refused(server.address)
    idle = kqfast.Server(kqfast.ECHO, port=0)
    idle.stop()
    idle.stop()
    assert connect_refused(idle.address)


def test_context_manager_stops_on_exit():
    """`with Server(...) as s:` serves inside the block and is stopped after it."""
    with kqfast.Server(kqfast.LINE_ECHO, port=0) as server:
        assert server.start() is server
        with socket.create_connection(server.address, timeout=5) as client:
            assert roundtrip(client, b"inside\n") == b"inside\n"
        address = server.address
    assert connect_refused(address)


def test_stats_count_connections_and_bytes(serve):
    """stats() counts connections (current, total) and bytes in and out."""
    server = serve(kqfast.ECHO)
    before = server.stats()
    assert before["connections_total"] == 0
    assert before["bytes_in"] == before["bytes_out"] == 0
    payload = bytes(range(256)) * 40

    def bytes_out_reaches(n):
        # The loop counts a send just after it, so the echo may reach us first.
        assert wait_until(lambda: server.stats()["bytes_out"] >= n)
        return server.stats()["bytes_out"]

    with socket.create_connection(server.address, timeout=5) as a, \
            socket.create_connection(server.address, timeout=5) as b:
        assert roundtrip(a, payload) == payload
        assert roundtrip(b, payload) == payload
        during = server.stats()
        assert during["connections_current"] == 2
        assert during["connections_total"] == 2
        assert during["bytes_in"] == 2 * len(payload)  # counted before it is echoed
        assert bytes_out_reaches(2 * len(payload)) == 2 * len(payload)
    with socket.create_connection(server.address, timeout=5) as c:
        assert roundtrip(c, b"more") == b"more"
        after = server.stats()
    assert after["connections_total"] == 3
    assert after["bytes_in"] == 2 * len(payload) + 4
    assert bytes_out_reaches(2 * len(payload) + 4) == 2 * len(payload) + 4


def test_stats_count_rejected_connections(serve):
    """A client over max_connections is shed at once and counted as rejected."""
    server = serve(kqfast.ECHO, max_connections=1)
    with socket.create_connection(server.address, timeout=5) as first:
        assert roundtrip(first, b"one") == b"one"
        try:
            extra = socket.create_connection(server.address, timeout=5)
        except ConnectionResetError:
            pass  # shed before connect() returned
        else:
            with extra:
                assert recv_until_closed(extra)[0] == b""
        stats = server.stats()
    assert stats["connections_rejected"] == 1
    assert stats["connections_total"] == 1


@pytest.mark.parametrize("handler", ["echo", None, 42, object()],
                         ids=["str", "None", "int", "object"])
def test_bad_handler_raises_type_error(handler):
    """A handler that is neither kqfast.ECHO/LINE_ECHO nor callable raises TypeError."""
    with pytest.raises(TypeError):
        kqfast.Server(handler, port=0)


def test_bad_handler_leaves_no_socket_open():
    """After Server(bad handler) raised, no fd is left open and the port is not listening."""
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]
    gc.collect()  # no unrelated fd closes in the middle of the count
    before = fd_count()
    with pytest.raises(TypeError):
        kqfast.Server("not a handler", port=port)
    assert connect_refused(("127.0.0.1", port)), "the listening socket was left open"
    assert wait_until(lambda: fd_count() == before)  # libkqueue closes its own lazily
