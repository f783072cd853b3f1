"""Item 28 of the reliability checklist, its fuzzing part, with hypothesis (bounded examples;
KQFAST_LONG_TESTS=1 runs many more): the native line framer and LineProtocol's framing
against a Python model, and the loop's dispatcher driven through Loop._feed_events with
synthetic events (EOF with data, errors, stale, closed and reused fds, closes inside
callbacks) between real client actions over loopback."""
from __future__ import annotations

import errno
import os
import select
import signal
import socket
import threading
import traceback

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import kqfast
from kqfast._core import ERROR, HANGUP, READABLE, WRITABLE
from support import connect_to, recv_until_closed, reset_close, scaled, server_fd

MAX_LINE = 64
WHITESPACE = b" \t\n\r\v\f"

FUZZ = settings(max_examples=scaled(60, 2000), deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])


# ---- models ------------------------------------------------------------------------------

def native_line_echo_model(stream: bytes, max_line: int) -> bytes:
    """What kqfast.LINE_ECHO sends back for stream followed by EOF: each line until the
    first blank one (which closes), stopping at a line longer than max_line; a last line
    without a newline is echoed at EOF unless blank or too long."""
    out = bytearray()
    pos = 0
    while True:
        nl = stream.find(b"\n", pos)
        if nl < 0:
            rest = stream[pos:]
            if len(rest) <= max_line and rest.strip(WHITESPACE):
                out += rest
            return bytes(out)
        line = stream[pos:nl + 1]
        if nl - pos > max_line or not line.strip(WHITESPACE):
            return bytes(out)
        out += line
        pos = nl + 1


def line_protocol_model(stream: bytes, max_line: int) -> list[bytes]:
    """The lines a LineProtocol receives for stream followed by EOF: each line with its
    b"\\n", stopping at one longer than max_line; a last partial line at EOF."""
    lines = []
    pos = 0
    while True:
        nl = stream.find(b"\n", pos)
        if nl < 0:
            rest = stream[pos:]
            if rest and len(rest) <= max_line:
                lines.append(rest)
            return lines
        if nl - pos > max_line:
            return lines
        lines.append(stream[pos:nl + 1])
        pos = nl + 1


def test_models_agree_with_the_contract():
    """The fuzzers' models agree with hand-picked cases of the kqfast-echo contract."""
    assert native_line_echo_model(b"a\nb\n\nc\n", 64) == b"a\nb\n"
    assert native_line_echo_model(b"a\r\n  \t\r\nb\n", 64) == b"a\r\n"
    assert native_line_echo_model(b"a\npartial", 64) == b"a\npartial"
    assert native_line_echo_model(b"a\n   ", 64) == b"a\n"
    assert native_line_echo_model(b"a\n" + b"x" * 65 + b"\nb\n", 64) == b"a\n"
    assert native_line_echo_model(b"x" * 64 + b"\n", 64) == b"x" * 64 + b"\n"
    assert line_protocol_model(b"a\n\nb", 64) == [b"a\n", b"\n", b"b"]
    assert line_protocol_model(b"a\n" + b"x" * 65, 64) == [b"a\n"]


# ---- strategies --------------------------------------------------------------------------

pieces = st.one_of(
    st.binary(max_size=40),
    st.sampled_from([b"\n", b"\r\n", b" \n", b"\t \r\n", b"\x0b\x0c\n", b"word", b" ",
                     b"x" * (MAX_LINE - 1), b"x" * MAX_LINE, b"x" * (MAX_LINE + 1)]),
)
streams = st.lists(pieces, max_size=24).map(b"".join)


@st.composite
def chunked(draw):
    """A byte stream and the sizes of the send()s that carry it."""
    stream = draw(streams)
    cuts = sorted(set(draw(st.lists(st.integers(0, len(stream)), max_size=12))))
    bounds = [0, *cuts, len(stream)]
    return stream, [stream[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]


def send_chunks(sock: socket.socket, chunks) -> None:
    """Sends every chunk in its own send() (TCP_NODELAY), then half-closes; a server that
    already gave up may reset us, which is allowed."""
    try:
        for chunk in chunks:
            sock.sendall(chunk)
        sock.shutdown(socket.SHUT_WR)
    except (BrokenPipeError, ConnectionResetError):
        pass


# ---- (a) the native line framer ----------------------------------------------------------

@pytest.fixture(scope="module")
def line_echo_server():
    server = kqfast.Server(kqfast.LINE_ECHO, port=0, max_line=MAX_LINE).start()
    yield server
    server.stop()


@FUZZ
@given(case=chunked())
def test_native_line_framer_matches_the_model(line_echo_server, case):
    """Item 28: LINE_ECHO's output for any stream cut into any send()s equals the model."""
    stream, chunks = case
    with connect_to(line_echo_server) as client:
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sender = threading.Thread(target=send_chunks, args=(client, chunks))
        sender.start()
        echoed, how = recv_until_closed(client)
        sender.join(10)
    assert echoed == native_line_echo_model(stream, MAX_LINE), (stream, chunks, how)


# ---- (b) LineProtocol framing ------------------------------------------------------------

class Lines(kqfast.LineProtocol):
    def __init__(self, done: dict):
        self.done = done
        self.lines = []
        self.lost = 0

    def connection_made(self, transport):
        self.peer = transport.get_extra_info("peername")[1]

    def line_received(self, line):
        self.lines.append(line)

    def connection_lost(self, exc):
        self.lost += 1
        with self.done["cond"]:
            self.done[self.peer] = self
            self.done["cond"].notify_all()


@pytest.fixture(scope="module")
def line_protocol_server():
    done = {"cond": threading.Condition()}
    server = kqfast.Server(lambda: Lines(done), port=0, max_line=MAX_LINE).start()
    yield server, done
    server.stop()


@FUZZ
@given(case=chunked())
def test_line_protocol_framing_matches_the_model(line_protocol_server, case):
    """Item 28: LineProtocol gets the model's lines for any stream cut into any send()s."""
    server, done = line_protocol_server
    stream, chunks = case
    with connect_to(server) as client:
        port = client.getsockname()[1]
        send_chunks(client, chunks)
        recv_until_closed(client)
    with done["cond"]:
        assert done["cond"].wait_for(lambda: port in done, 5)
    proto = done.pop(port)
    assert proto.lines == line_protocol_model(stream, MAX_LINE), (stream, chunks)
    assert proto.lost == 1


# ---- (c) the dispatcher, through synthetic events ----------------------------------------

class Fuzzed:
    """A protocol whose data drives it: A aborts, C closes, W echoes, P pauses reading,
    K aborts the oldest other live connection, E writes EOF.  It records every callback."""

    def __init__(self, world):
        self.world = world
        self.calls = []
        self.data = bytearray()
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport
        self.calls.append("made")
        self.peer = transport.get_extra_info("peername")[1]
        self.fd = server_fd(transport)
        self.world.protocols.append(self)

    def data_received(self, data):
        self.calls.append("data")
        self.data += data
        if b"W" in data:
            self.transport.write(data)
        if b"E" in data:
            self.transport.write_eof()
        if b"P" in data:
            self.transport.pause_reading()
        if b"K" in data:
            for other in self.world.protocols:
                if other is not self and "lost" not in other.calls:
                    other.transport.abort()
                    break
        if b"C" in data:
            self.transport.close()
        if b"A" in data:
            self.transport.abort()

    def eof_received(self):
        self.calls.append("eof")

    def pause_writing(self):
        pass

    def resume_writing(self):
        pass

    def connection_lost(self, exc):
        self.calls.append("lost")


class World:
    """The server under test (never started: only _feed_events drives its loop), its
    clients, and what each client sent."""

    def __init__(self):
        self.protocols: list[Fuzzed] = []
        self.server = kqfast.Server(lambda: Fuzzed(self), port=0)
        self.loop = self.server._reactors[0]
        self.clients: list[socket.socket] = []
        self.sent: dict[int, bytearray] = {}  # client port -> bytes it sent
        self.closed_fds: set[int] = set()

    def client(self, i: int) -> socket.socket | None:
        return self.clients[i % len(self.clients)] if self.clients else None

    def resolve(self, kind: str, i: int) -> int:
        """A fd for a synthetic event: a server connection's (live, closed or reused), the
        listener, a client's, one never opened, or out of range."""
        if kind == "server" and self.protocols:
            return self.protocols[i % len(self.protocols)].fd
        if kind == "client" and self.clients:
            sock = self.client(i)
            return sock.fileno() if sock.fileno() >= 0 else -1
        if kind == "listen":
            return self.loop.listen_fileno
        if kind == "never":
            return 3000 + i
        if kind == "huge":
            return (1 << 22) + i
        return -1

    def feed(self, events) -> None:
        self.loop._feed_events(events)

    def check(self) -> None:
        made = len(self.protocols)
        lost = sum(1 for p in self.protocols if "lost" in p.calls)
        current = self.server.stats()["connections_current"]
        assert current >= made - lost, (current, made, lost)
        for proto in self.protocols:
            calls = proto.calls
            assert calls[0] == "made" and calls.count("made") == 1, calls
            assert calls.count("lost") <= 1, calls
            if "lost" in calls:
                assert calls[-1] == "lost", calls
            if "eof" in calls:
                assert "data" not in calls[calls.index("eof"):], calls
            sent = self.sent.get(proto.peer, b"")
            assert bytes(proto.data) == bytes(sent[:len(proto.data)]), (proto.data, sent)


fd_kinds = st.sampled_from(["server", "server", "server", "client", "listen", "never",
                            "huge", "minus"])
masks = st.sampled_from([READABLE, WRITABLE, READABLE | WRITABLE, READABLE | HANGUP,
                         READABLE | WRITABLE | HANGUP, HANGUP, ERROR, ERROR | READABLE, 0])
errs = st.sampled_from([0, errno.ECONNRESET, errno.EPIPE, errno.ETIMEDOUT, errno.ENOMEM,
                        errno.ENOSPC])
events = st.lists(st.tuples(fd_kinds, st.integers(0, 7), masks, errs), max_size=8)
payloads = st.lists(st.sampled_from([b"a", b"bc", b"x" * 100, b"W", b"E", b"P", b"K", b"C",
                                     b"A", b"\n"]), min_size=1, max_size=5).map(b"".join)
operations = st.lists(st.one_of(
    st.tuples(st.just("connect"), st.just(0)),
    st.tuples(st.just("accept"), st.just(0)),
    st.tuples(st.just("send"), st.integers(0, 7), payloads),
    st.tuples(st.just("shutdown"), st.integers(0, 7)),
    st.tuples(st.just("close"), st.integers(0, 7)),
    st.tuples(st.just("reset"), st.integers(0, 7)),
    st.tuples(st.just("resume"), st.integers(0, 7)),
    st.tuples(st.just("events"), events),
), max_size=40)


def settle(world: World) -> None:
    """Waits (briefly) until the kernel has delivered what the clients did, so a fed event
    finds it."""
    fds = [p.fd for p in world.protocols if "lost" not in p.calls]
    if fds:
        select.select(fds, [], [], 0.01)


def run_forked(fn, log_path) -> None:
    """Runs fn() in a forked child, so that a crash (a segfault in the extension) fails
    this test with the example that caused it instead of killing the test session."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            fn()
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        last = log_path.read_text() if log_path.exists() else "?"
        raise AssertionError(f"the fuzzed loop crashed ({signal.Signals(os.WTERMSIG(status)).name})"
                             f" on this example:\n{last}")
    assert os.WEXITSTATUS(status) == 0, "the dispatcher fuzz failed: see the captured stderr"


def test_dispatcher_survives_synthetic_events(tmp_path):
    """Item 28: random synthetic events and client actions never break the dispatcher invariants."""
    log_path = tmp_path / "last-example.txt"

    @settings(FUZZ, max_examples=scaled(300, 5000))
    @given(ops=operations)
    # Found by this fuzzer: close() then abort() in one callback (a NULL transport freed).
    @example(ops=[("connect", 0), ("send", 0, b"CA"), ("accept", 0), ("events", [])])
    def fuzz(ops):
        log_path.write_text(repr(ops))
        run_dispatcher_example(ops)

    run_forked(fuzz, log_path)


def run_dispatcher_example(ops) -> None:
    world = World()
    try:
        for op in ops:
            kind = op[0]
            if kind == "connect" and len(world.clients) < 8:
                sock = connect_to(world.server)
                world.clients.append(sock)
                world.sent[sock.getsockname()[1]] = bytearray()
            elif kind == "accept":
                world.feed([(world.loop.listen_fileno, READABLE, 0)])
            elif kind in ("send", "shutdown", "close", "reset"):
                sock = world.client(op[1])
                if sock is None or sock.fileno() < 0:
                    continue
                port = sock.getsockname()[1]
                try:
                    if kind == "send":
                        sock.sendall(op[2])
                        world.sent[port] += op[2]
                    elif kind == "shutdown":
                        sock.shutdown(socket.SHUT_WR)
                    elif kind == "close":
                        sock.close()
                    else:
                        reset_close(sock)
                except OSError:
                    pass  # the server side is gone or half-closed: a client's lot
                settle(world)
            elif kind == "resume" and world.protocols:
                proto = world.protocols[op[1] % len(world.protocols)]
                proto.transport.resume_reading()
            elif kind == "events":
                world.feed([(world.resolve(k, i), mask, err) for k, i, mask, err in op[1]])
            world.check()
        # Wind down: every client goes, every connection is read to its end.
        for proto in world.protocols:
            proto.transport.resume_reading()
        for sock in world.clients:
            if sock.fileno() >= 0:
                sock.close()
        world.feed([(world.loop.listen_fileno, READABLE, 0)])
        for _ in range(20):
            fds = [p.fd for p in world.protocols]
            settle(world)
            world.feed([(fd, READABLE | WRITABLE, 0) for fd in fds])
            world.check()
            made = len(world.protocols)
            lost = sum(1 for p in world.protocols if "lost" in p.calls)
            if world.server.stats()["connections_current"] == made - lost == 0:
                break
    finally:
        world.server.stop()
        for sock in world.clients:
            sock.close()
    world.check()
    for proto in world.protocols:
        assert proto.calls.count("lost") == 1, proto.calls
    assert world.server.stats()["connections_current"] == 0
