"""The reliability checklist (reference/reliability-checklist.md §9), item by item, over real
loopback sockets.  Each test's docstring names its item.  The defaults are scaled down to keep
the file fast; KQFAST_LONG_TESTS=1 runs the checklist's full sizes (scaled(), support.py).
The hypothesis fuzzers of item 28 live in test_fuzz.py."""
from __future__ import annotations

import asyncio
import errno
import gc
import hashlib
import os
import random
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import weakref

import pytest

import kqfast
from support import (
    LineReader, connect_refused, connect_to, cpu_seconds, echo_through, fd_flags, fds_sharing, on_loop,
    new_fds, open_fds, percentile, recv_exactly, recv_until_closed, recv_until_eof,
    reset_close, roundtrip, rss_bytes, scaled, serve_forever_in_thread, server_fd, socket_fds,
    start_child, tcp_sockets, wait_until,
)

MiB = 1 << 20
KiB = 1 << 10


# ---- shared protocol scaffolding ---------------------------------------------------------

class Book:
    """What every protocol of one server saw, behind one condition variable, so a test can
    wait for callbacks instead of sleeping."""

    def __init__(self):
        self.cond = threading.Condition()
        self.protocols: list[Recorder] = []

    def changed(self) -> None:
        with self.cond:
            self.cond.notify_all()

    def wait_for(self, predicate, timeout: float = 5.0) -> bool:
        with self.cond:
            return self.cond.wait_for(predicate, timeout)

    def lost(self) -> list[Recorder]:
        return [p for p in self.protocols if "lost" in p.calls]

    def factory(self, cls=None, **kwargs):
        cls = cls or Recorder
        return lambda: cls(self, **kwargs)


class Recorder(asyncio.Protocol):
    """Records every callback in order, the bytes received and connection_lost's argument."""

    def __init__(self, book: Book):
        self.book = book
        self.calls: list[str] = []
        self.data = bytearray()
        self.exc = None
        self.transport = None
        self.peer = None

    def connection_made(self, transport):
        self.transport = transport
        self.peer = transport.get_extra_info("peername")
        self.calls.append("made")
        with self.book.cond:
            self.book.protocols.append(self)
            self.book.cond.notify_all()

    def data_received(self, data):
        self.calls.append("data")
        self.data += data
        self.book.changed()

    def eof_received(self):
        self.calls.append("eof")
        self.book.changed()
        return None

    def connection_lost(self, exc):
        self.calls.append("lost")
        self.exc = exc
        self.book.changed()

    def check_lifecycle(self) -> None:
        """made first, connection_lost exactly once and last."""
        assert self.calls[0] == "made", self.calls
        assert self.calls.count("lost") == 1, self.calls
        assert self.calls[-1] == "lost", self.calls


def pattern(size: int, seed: int) -> bytes:
    """size reproducible pseudo-random bytes."""
    return random.Random(seed).randbytes(size)


def sha(data) -> str:
    return hashlib.sha256(data).hexdigest()


def loop_thread_id(server: kqfast.Server) -> int:
    """The native thread id of a started server's (first) loop."""
    return server._threads[0].native_id


def loop_cpu(server: kqfast.Server) -> float:
    """CPU time (user + system) the server's loop thread has used."""
    import psutil
    tid = loop_thread_id(server)
    for thread in psutil.Process().threads():
        if thread.id == tid:
            return thread.user_time + thread.system_time
    raise AssertionError("the loop thread is gone")


def idle_cpu_over(server: kqfast.Server, seconds: float) -> float:
    """CPU the server's loop thread burns over the next seconds (to prove it does not spin)."""
    before = loop_cpu(server)
    time.sleep(seconds)
    return loop_cpu(server) - before


def kill_child(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.communicate(timeout=10)


# A child started from a shell's background job inherits SIGINT ignored, and Python keeps
# it so: give Ctrl-C back its default, as an interactive run has it.
CHILD_PRELUDE = """
import asyncio, os, signal, socket, sys, time
import kqfast
signal.signal(signal.SIGINT, signal.default_int_handler)
"""


# ---- 1. no byte lost at EOF --------------------------------------------------------------

class Digest(asyncio.Protocol):
    """Counts and hashes what arrives; at EOF answers "count sha256" and closes."""

    def __init__(self, results):
        self.results = results
        self.hash = hashlib.sha256()
        self.count = 0
        self.eofs = 0
        self.after_eof = 0

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        if self.eofs:
            self.after_eof += 1
        self.count += len(data)
        self.hash.update(data)

    def eof_received(self):
        self.eofs += 1
        self.transport.write(f"{self.count} {self.hash.hexdigest()}\n".encode())
        return False

    def connection_lost(self, exc):
        self.results.append((self.count, self.hash.hexdigest(), self.eofs, self.after_eof))


@pytest.mark.parametrize("ending", ["shutdown", "close"])
def test_01_no_byte_lost_at_eof_python_protocol(serve, ending):
    """Item 1: every byte sent before EOF (SHUT_WR or close) reaches the protocol, then EOF."""
    results: list = []
    done = threading.Condition()

    class Counted(Digest):
        def connection_lost(self, exc):
            super().connection_lost(exc)
            with done:
                done.notify_all()

    server = serve(lambda: Counted(results))
    rng = random.Random(1)
    iterations, top = scaled((25, 2 * MiB), (500, 8 * MiB))
    for i in range(iterations):
        data = rng.randbytes(rng.randint(1, top))
        client = connect_to(server)
        client.sendall(data)
        if ending == "shutdown":
            client.shutdown(socket.SHUT_WR)
            answer = recv_until_eof(client)
            assert answer == f"{len(data)} {sha(data)}\n".encode(), f"iteration {i}"
        client.close()
        with done:
            assert done.wait_for(lambda: len(results) == i + 1, 5), f"iteration {i}"
        count, digest, eofs, after_eof = results[i]
        assert (count, digest) == (len(data), sha(data)), f"iteration {i}: {count} bytes"
        assert eofs == 1 and after_eof == 0, f"iteration {i}"


def test_01_no_byte_lost_at_eof_native_echo(serve):
    """Item 1: the native raw echo returns every byte sent before SHUT_WR, then EOF."""
    server = serve(kqfast.ECHO)
    rng = random.Random(2)
    iterations, top = scaled((20, 2 * MiB), (500, 8 * MiB))
    for i in range(iterations):
        data = rng.randbytes(rng.randint(1, top))
        with connect_to(server) as client:
            echoed = echo_through(client, data)
        assert len(echoed) == len(data) and sha(echoed) == sha(data), f"iteration {i}"


# ---- 2. reset is an error, not a crash ---------------------------------------------------

def test_02_reset_gives_one_connection_lost_with_connection_reset(serve):
    """Item 2: a peer RST: one connection_lost(ConnectionResetError), nothing after, fds freed."""
    book = Book()
    server = serve(book.factory())
    before = open_fds()
    rounds = scaled(40, 400)
    for i in range(rounds):
        first, second = pattern(1000, i), pattern(50_000, ~i)
        client = connect_to(server)
        assert book.wait_for(lambda: len(book.protocols) == i + 1)
        client.sendall(first)
        if i % 2:  # the reset comes mid-stream, or together with all the data, unread
            assert book.wait_for(lambda: len(book.protocols[i].data) >= 1)
        client.sendall(second)
        reset_close(client)
        assert book.wait_for(lambda: "lost" in book.protocols[i].calls), book.protocols[i].calls
    time.sleep(0.1)  # proves that nothing more arrives for the reset connections
    for i, proto in enumerate(book.protocols):
        proto.check_lifecycle()
        assert "eof" not in proto.calls, f"round {i}: a reset was reported as EOF: {proto.calls}"
        assert isinstance(proto.exc, ConnectionResetError), f"round {i}: {proto.exc!r}"
        sent = pattern(1000, i) + pattern(50_000, ~i)
        assert len(proto.data) <= len(sent) and bytes(proto.data) == sent[:len(proto.data)]
    assert wait_until(lambda: not new_fds(before)), new_fds(before)
    assert server.stats()["connections_current"] == 0


# ---- 3. stale-event safety ---------------------------------------------------------------

class Tagged(Recorder):
    """The first data to arrive anywhere aborts every other connection and opens as many new
    ones (to reuse their fds); every client sends its own port as its tag."""

    def __init__(self, book, state):
        super().__init__(book)
        self.state = state
        self.aborted = False

    def data_received(self, data):
        if self.aborted:
            self.calls.append("data-after-abort")
        if not self.state["closer"]:
            self.state["closer"] = self
            for other in list(self.book.protocols):
                if other is not self and "lost" not in other.calls:
                    other.aborted = True
                    other.transport.abort()
            for _ in range(self.state["reopen"]):
                sock = socket.create_connection(self.state["address"], timeout=5)
                port = sock.getsockname()[1]
                sock.sendall(b"%d\n" % port)
                self.state["new"].append(sock)
                self.state["new_ports"].add(port)
        super().data_received(data)


def test_03_closing_others_in_a_handler_never_misdelivers(serve):
    """Item 3: aborting batch-mates in a handler and reusing their fds never misdelivers data."""
    n = scaled(200, 1000)
    book = Book()
    state = {"closer": None, "reopen": n, "new": [], "new_ports": set()}
    server = kqfast.Server(lambda: Tagged(book, state), port=0, backlog=4096)
    state["address"] = server.address
    # Every client connects and sends before the loop runs: the first batches hold many
    # readable connections at once.
    first = []
    for _ in range(n):
        sock = connect_to(server)
        sock.sendall(b"%d\n" % sock.getsockname()[1])
        first.append(sock)
    server.start()
    try:
        def all_tagged():
            if len(state["new"]) < n:
                return False
            got = {int(p.data) for p in book.protocols if p.data.endswith(b"\n")}
            served_first = [p for p in book.protocols if not p.aborted]
            return state["new_ports"] <= got and all(p.data for p in served_first)

        assert book.wait_for(all_tagged, 10), len(book.protocols)
    finally:
        server.stop(timeout=1.0)
        for sock in first + state["new"]:
            sock.close()
    assert sum(p.aborted for p in book.protocols) > 0
    seen = {}
    for proto in book.protocols:
        proto.check_lifecycle()
        assert "data-after-abort" not in proto.calls
        if proto.data:
            # The tag is the client's port: it must be the peer of the connection it reached.
            assert bytes(proto.data) == b"%d\n" % proto.peer[1], (proto.data, proto.peer)
            assert proto.peer[1] not in seen
            seen[proto.peer[1]] = proto
    assert len(state["new_ports"]) == n and state["new_ports"] <= set(seen)


# ---- 4. deregister then close; a dup'ed fd brings no stale events --------------------------

def test_04_dup_of_a_closed_connection_brings_no_callbacks_or_spin(serve):
    """Item 4: a dup of a closed connection's fd brings no callbacks, no spin, no stray bytes."""
    book = Book()
    dups: list[socket.socket] = []

    class Duper(Recorder):
        def connection_made(self, transport):
            fd = transport.get_extra_info("socket").fileno()
            dups.append(socket.socket(fileno=os.dup(fd)))
            super().connection_made(transport)

        def data_received(self, data):
            super().data_received(data)
            if data == b"abort":
                self.transport.abort()

    server = serve(book.factory(Duper))
    old = connect_to(server)
    assert book.wait_for(lambda: len(book.protocols) == 1)
    dup = dups[0]
    server_fds = fds_sharing(dup)
    assert len(server_fds) == 1, server_fds
    # Take every free fd below the server's, and the new clients' fds now: an accept after
    # the abort then reuses the number it frees (collect first: a dead loop frees its
    # poller; libkqueue may still take a low fd for a while, hence several new clients).
    gc.collect()
    fillers = []
    while (fd := os.open(os.devnull, os.O_RDONLY)) < server_fds[0]:
        fillers.append(fd)
    os.close(fd)
    spares = [socket.socket() for _ in range(10)]
    old.sendall(b"abort")
    assert book.wait_for(lambda: "lost" in book.protocols[0].calls)
    assert fds_sharing(dup) == []  # the server's fd is closed; the socket lives in the dup
    old.sendall(b"to the dup")
    dup.settimeout(5)
    assert recv_exactly(dup, 10) == b"to the dup"
    old.sendall(b"unread")  # stays readable: a stale registration would make the loop spin
    spent = idle_cpu_over(server, 0.5)
    assert spent < 0.1, f"the loop thread burned {spent:.2f} s of CPU over 0.5 s"
    reused = None
    for i, new in enumerate(spares):
        new.settimeout(5)
        new.connect(server.address)
        assert book.wait_for(lambda: len(book.protocols) == i + 2)
        new.sendall(b"mine %d" % i)
        if fds_sharing(dups[i + 1]) == server_fds:
            reused = book.protocols[i + 1]
            break
    assert reused is not None, "no new connection reused the closed connection's fd"
    old.sendall(b"not yours")
    for j, proto in enumerate(book.protocols[1:]):
        assert book.wait_for(lambda: bytes(proto.data) == b"mine %d" % j)
    time.sleep(0.1)  # proves that the old peer's bytes never arrive
    for j, proto in enumerate(book.protocols[1:]):
        assert bytes(proto.data) == b"mine %d" % j
    assert book.protocols[0].calls == ["made", "data", "lost"]
    for sock in (old, *spares, *dups):
        sock.close()
    for fd in fillers:
        os.close(fd)


# ---- 5. a failed registration fails that connection only ---------------------------------

SHIM_PRELUDE = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stddef.h>
#include <sys/types.h>
#include <sys/socket.h>

/* A connected socket (not a listener): the registrations the shim fails. */
static int is_connection(int fd) {
    int listening = 1;
    socklen_t len = sizeof(listening);
    struct sockaddr_storage peer;
    socklen_t peer_len = sizeof(peer);
    return getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &listening, &len) == 0 && !listening &&
           getpeername(fd, (struct sockaddr *)&peer, &peer_len) == 0;
}
"""

# epoll: every 10th epoll_ctl(ADD) of a connection fails with ENOSPC.
FAILING_EPOLL_CTL = SHIM_PRELUDE + r"""
#include <sys/epoll.h>

int epoll_ctl(int epfd, int op, int fd, struct epoll_event *ev) {
    static int (*real)(int, int, int, struct epoll_event *);
    static int count;
    if (real == NULL)
        real = (int (*)(int, int, int, struct epoll_event *))dlsym(RTLD_NEXT, "epoll_ctl");
    if (op == EPOLL_CTL_ADD && is_connection(fd) && ++count % 10 == 0) {
        errno = ENOSPC;
        return -1;
    }
    return real(epfd, op, fd, ev);
}
"""

# kqueue: every 10th EV_ADD of a connection's read filter fails as the BSD kernels fail a
# change: an EV_ERROR entry (data = ENOSPC) in the event list, and the call returns at once.
# (libkqueue itself drops a failed epoll_ctl without any EV_ERROR, so the shim sits on kevent.)
FAILING_KEVENT = SHIM_PRELUDE + r"""
#include <sys/time.h>
#include <sys/event.h>

typedef int (*kevent_fn)(int, const struct kevent *, int, struct kevent *, int,
                         const struct timespec *);

int kevent(int kq, const struct kevent *changes, int nchanges, struct kevent *events,
           int nevents, const struct timespec *timeout) {
    static kevent_fn real;
    static int count;
    struct kevent kept[nchanges > 0 ? nchanges : 1];
    struct timespec zero = {0, 0};
    int nkept = 0, nerrors = 0;
    if (real == NULL) {
        /* libkqueue comes with the extension (RTLD_LOCAL), out of RTLD_NEXT's reach. */
        void *lib = dlopen("libkqueue.so.0", RTLD_LAZY | RTLD_NOLOAD);
        real = (kevent_fn)dlsym(lib != NULL ? lib : RTLD_NEXT, "kevent");
    }
    for (int i = 0; i < nchanges; i++) {
        const struct kevent *c = &changes[i];
        if (c->filter == EVFILT_READ && (c->flags & EV_ADD) && is_connection((int)c->ident) &&
            ++count % 10 == 0 && nerrors < nevents) {
            events[nerrors] = *c;
            events[nerrors].flags = EV_ERROR;
            events[nerrors].data = ENOSPC;
            nerrors++;
            continue;
        }
        kept[nkept++] = *c;
    }
    if (nerrors == 0) return real(kq, changes, nchanges, events, nevents, timeout);
    if (real(kq, kept, nkept, NULL, 0, &zero) < 0) return -1;
    return nerrors;
}
"""


def build_failing_registration_shim(tmp_path) -> str:
    """Compiles the LD_PRELOAD shim for this build's backend; returns its path."""
    source = tmp_path / "failing_registration.c"
    shim = tmp_path / "failing_registration.so"
    flags = []
    if kqfast.BACKEND == "kqueue":
        source.write_text(FAILING_KEVENT)
        if sys.platform.startswith("linux"):
            flags = subprocess.run(["pkg-config", "--cflags", "libkqueue"], check=True,
                                   capture_output=True, text=True).stdout.split()
    else:
        source.write_text(FAILING_EPOLL_CTL)
    built = subprocess.run(["cc", "-shared", "-fPIC", "-O2", *flags, "-o", str(shim),
                            str(source), "-ldl"], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    return str(shim)


@pytest.mark.parametrize("handler", ["native", "python"])
def test_05_failed_registration_fails_only_that_connection(echo_server, tmp_path, handler):
    """Item 5: every 10th registration failing (LD_PRELOAD shim) closes only those clients."""
    shim = build_failing_registration_shim(tmp_path)
    env = dict(os.environ)
    env["LD_PRELOAD"] = " ".join(filter(None, [env.get("LD_PRELOAD"), shim]))
    server = echo_server("--mode", "raw", "--handler", handler, env=env)
    served = refused = 0
    for i in range(50):
        message = b"hello %d" % i
        try:
            with server.connect(timeout=5) as client:
                client.sendall(message)
                data, _ = recv_until_closed_or(client, len(message))
        except ConnectionResetError:  # the reset came before connect() or send() returned
            data = b""
        if data == message:
            served += 1
        else:
            assert data == b"", data
            refused += 1
    assert server.proc.poll() is None, server.proc.communicate()[1]
    assert 3 <= refused <= 6 and served == 50 - refused, (served, refused)
    code, err = server.stop()
    assert code == 0, err
    assert "Traceback" not in err, err


def recv_until_closed_or(sock: socket.socket, n: int) -> tuple[bytes, str]:
    """Reads until n bytes came or the peer closed; returns (bytes, "data"|"eof"|"reset")."""
    buf = bytearray()
    while len(buf) < n:
        try:
            chunk = sock.recv(n - len(buf))
        except ConnectionResetError:
            return bytes(buf), "reset"
        if not chunk:
            return bytes(buf), "eof"
        buf += chunk
    return bytes(buf), "data"


def test_05_error_event_is_never_readiness():
    """Item 5: an ERROR event fails its connection with that errno and is never read as data."""
    book = Book()
    server = kqfast.Server(book.factory(), port=0)
    loop = server._reactors[0]
    try:
        a, b = connect_to(server), connect_to(server)
        loop._feed_events([(loop.listen_fileno, kqfast._core.READABLE, 0)])
        assert len(book.protocols) == 2
        fa, fb = (server_fd(p.transport) for p in book.protocols)
        a.sendall(b"unread")
        b.sendall(b"served")
        assert select.select([fa, fb], [], [], 5)[0]
        loop._feed_events([(fa, kqfast._core.ERROR, errno.ENOSPC),
                           (fb, kqfast._core.READABLE, 0)])
        pa, pb = book.protocols
        assert pa.calls == ["made", "lost"], pa.calls
        assert isinstance(pa.exc, OSError) and pa.exc.errno == errno.ENOSPC, pa.exc
        assert bytes(pb.data) == b"served" and "lost" not in pb.calls
        assert server.stats()["connections_current"] == 1
        assert recv_until_closed(a)[0] == b""  # the failed connection was closed
    finally:
        server.stop()
        a.close()
        b.close()


# ---- 6. EINTR is benign ------------------------------------------------------------------

SIGNAL_COUNTER = CHILD_PRELUDE + """
count = 0
def on_usr1(signum, frame):
    global count
    count += 1
    os.write(1, b"SIGNAL\\n")
signal.signal(signal.SIGUSR1, on_usr1)
server = kqfast.Server(kqfast.ECHO, port=0)
signal.signal(signal.SIGTERM, lambda *a: server.stop(1.0))
print("READY", server.address[1], flush=True)
server.serve_forever()
print("COUNT", count, server.stats()["errors"], flush=True)
"""


def test_06_signals_during_load_are_all_handled_and_harmless():
    """Item 6: hundreds of SIGUSR1 during echo load all reach the handler; no connection errs."""
    proc, reader, (port,) = start_child(SIGNAL_COUNTER)
    stop = threading.Event()
    echoes = [0] * 4
    failures: list[BaseException] = []

    def load(i: int) -> None:
        try:
            with socket.create_connection(("127.0.0.1", int(port)), timeout=5) as client:
                message = pattern(512, i)
                while not stop.is_set():
                    assert roundtrip(client, message) == message
                    echoes[i] += 1
        except BaseException as exc:
            failures.append(exc)

    clients = [threading.Thread(target=load, args=(i,)) for i in range(len(echoes))]
    try:
        for thread in clients:
            thread.start()
        signals = scaled(500, 5000)
        interval = 1 / scaled(500, 1000)
        started = time.monotonic()
        for i in range(signals):
            os.kill(proc.pid, signal.SIGUSR1)
            reader.expect("SIGNAL", timeout=5)
            pause = started + (i + 1) * interval - time.monotonic()
            if pause > 0:
                time.sleep(pause)
        stop.set()
        for thread in clients:
            thread.join(10)
        assert not failures, failures
        assert all(echoes), echoes
        proc.send_signal(signal.SIGTERM)
        _, count, errors = reader.expect("COUNT", timeout=5).split()
        assert int(count) == signals
        assert int(errors) == 0
        assert proc.wait(5) == 0
    finally:
        stop.set()
        kill_child(proc)


# ---- 7. Ctrl-C works ---------------------------------------------------------------------

CTRL_C = CHILD_PRELUDE + """
from kqfast._echo import EchoProtocol
server = kqfast.Server(kqfast.ECHO if sys.argv[1] == "native" else EchoProtocol, port=0)
port = server.address[1]
print("READY", port, flush=True)
try:
    server.serve_forever()
except KeyboardInterrupt:
    probe = socket.socket()
    try:
        probe.connect(("127.0.0.1", port))
        print("STILL LISTENING", flush=True)
    except ConnectionRefusedError:
        print("REFUSED", flush=True)
    raise
"""


@pytest.mark.parametrize("handler", ["native", "python"])
@pytest.mark.parametrize("busy", [False, True], ids=["idle", "loaded"])
def test_07_ctrl_c_stops_the_loop_within_a_second(handler, busy):
    """Item 7: SIGINT stops an idle or busy loop within 1 s: KeyboardInterrupt, listener closed."""
    proc = subprocess.Popen([sys.executable, "-c", CTRL_C, handler], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    stop = threading.Event()
    clients = []
    try:
        line = proc.stdout.readline()
        assert line.startswith("READY"), (line, proc.stderr.read())
        port = int(line.split()[1])

        def load() -> None:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
                    while not stop.is_set():
                        roundtrip(client, b"x" * 4096)
            except OSError:
                pass  # the server goes away under us

        with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
            assert roundtrip(client, b"serving?") == b"serving?"  # the loop runs by now
        if busy:
            clients = [threading.Thread(target=load) for _ in range(4)]
            for thread in clients:
                thread.start()
            time.sleep(0.2)  # lets the load build up
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=5)
        elapsed = time.monotonic() - sent
        assert elapsed < 1.0, elapsed
        assert "KeyboardInterrupt" in err, err
        assert "REFUSED" in out, out
        assert proc.returncode != 0
        assert connect_refused(("127.0.0.1", port))
    finally:
        stop.set()
        for thread in clients:
            thread.join(10)
        kill_child(proc)


# ---- 8. handler exceptions are contained -------------------------------------------------

class Boom(Recorder):
    """Echoes; b"boom" raises ValueError, b"exit" SystemExit, b"interrupt" KeyboardInterrupt."""

    def data_received(self, data):
        super().data_received(data)
        if data == b"boom":
            raise ValueError("boom")
        if data == b"exit":
            raise SystemExit(3)
        if data == b"interrupt":
            raise KeyboardInterrupt
        self.transport.write(data)


def test_08_exception_closes_only_its_connection(serve, caplog):
    """Item 8: a handler's ValueError is logged once and closes only its own connection."""
    book = Book()
    server = serve(book.factory(Boom))
    b = connect_to(server)
    failures: list[BaseException] = []
    done = threading.Event()

    def echo_b() -> None:
        try:
            for i in range(scaled(2000, 10_000)):
                message = b"%d" % i
                assert roundtrip(b, message) == message
        except BaseException as exc:
            failures.append(exc)
        done.set()

    with caplog.at_level("ERROR", logger="kqfast"):
        thread = threading.Thread(target=echo_b)
        thread.start()
        a = connect_to(server)
        a.sendall(b"boom")
        assert recv_until_closed(a) == (b"", "eof")  # closed as asyncio closes it, no reset
        assert done.wait(30)
        thread.join()
    assert not failures, failures
    assert roundtrip(b, b"still here") == b"still here"
    errors = [r for r in caplog.records if r.name == "kqfast" and r.levelname == "ERROR"]
    assert len(errors) == 1, errors
    assert errors[0].exc_info and errors[0].exc_info[0] is ValueError
    victim = next(p for p in book.protocols if bytes(p.data) == b"boom")
    victim.check_lifecycle()
    assert isinstance(victim.exc, ValueError)
    a.close()
    b.close()


CLOSE_THEN = CHILD_PRELUDE + """
class CloseThen(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport
    def data_received(self, data):
        self.transport.close()  # nothing queued: the transport lets go of the fd at once
        if sys.argv[1] == "abort":
            self.transport.abort()
        else:
            raise ValueError("fails after close()")
    def connection_lost(self, exc):
        print("LOST", type(exc).__name__, flush=True)
server = kqfast.Server(CloseThen, port=0)
print("READY", server.address[1], flush=True)
server.serve_forever()
"""


@pytest.mark.parametrize("then", ["abort", "raise"])
def test_08_abort_or_exception_after_close_is_harmless(then):
    """Items 8, 3: abort() or raising after close() is harmless (run in a child: it may crash)."""
    proc = subprocess.Popen([sys.executable, "-c", CLOSE_THEN, then], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("READY"), (line, proc.communicate())
        reader = LineReader(proc.stdout)
        port = int(line.split()[1])
        for i in range(3):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
                client.sendall(b"x")
                assert recv_until_closed(client)[0] == b""
            reader.expect("LOST")
            assert proc.poll() is None, f"the server died: {proc.returncode}"
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
        reader.expect("LOST")  # the last client's, closed at its EOF
        time.sleep(0.1)  # proves that no connection is reported lost twice
        assert reader.lines.empty() and len(reader.seen) == 4, reader.seen
        assert proc.poll() is None, f"the server died: {proc.returncode}"
    finally:
        kill_child(proc)


@pytest.mark.parametrize("trigger, exc_type", [(b"exit", SystemExit),
                                               (b"interrupt", KeyboardInterrupt)])
def test_08_system_exit_and_interrupt_stop_serve_forever(trigger, exc_type):
    """Item 8: SystemExit/KeyboardInterrupt from a handler stop serve_forever(), which re-raises."""
    book = Book()
    server = kqfast.Server(book.factory(Boom), port=0)
    thread, raised = serve_forever_in_thread(server)
    try:
        bystander = connect_to(server, retry=5)
        assert roundtrip(bystander, b"hi") == b"hi"
        with connect_to(server) as client:
            client.sendall(trigger)
            thread.join(5)
        assert not thread.is_alive()
        assert len(raised) == 1 and type(raised[0]) is exc_type, raised
        assert connect_refused(server.address)
        assert recv_until_closed(bystander)[0] == b""
        bystander.close()
        for proto in book.protocols:
            proto.check_lifecycle()
    finally:
        server.stop()
        thread.join(5)


# ---- 9. no EMFILE spin -------------------------------------------------------------------

EMFILE_SERVER = CHILD_PRELUDE + """
import resource
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
server = kqfast.Server(kqfast.LINE_ECHO, port=0, max_connections=10_000, idle_timeout=0)
signal.signal(signal.SIGTERM, lambda *a: server.stop(0.5))
print("READY", server.address[1], flush=True)
server.serve_forever()
print("REJECTED", server.stats()["connections_rejected"], flush=True)
"""


def try_echo(port: int, message: bytes = b"ping\n", timeout: float = 2.0):
    """Connects and echoes one line; returns the open socket when served, else the close
    ("eof" or "reset") and how long it took to learn it."""
    started = time.monotonic()
    sock = socket.socket()
    sock.settimeout(timeout)
    try:
        sock.connect(("127.0.0.1", port))
        sock.sendall(message)
        data, how = recv_until_closed_or(sock, len(message))
    except ConnectionResetError:  # the reset may even beat connect() returning
        data, how = b"", "reset"
    if data == message:
        return sock
    sock.close()
    assert data == b"", data
    return how, time.monotonic() - started


def test_09_emfile_sheds_and_backs_off_without_spinning():
    """Item 9: at RLIMIT_NOFILE=64 the server sheds and backs off: no spin, no hang, recovers."""
    proc, reader, (port,) = start_child(EMFILE_SERVER)
    port = int(port)
    served: list[socket.socket] = []
    try:
        shed = 0
        while shed < 5:
            outcome = try_echo(port)
            if isinstance(outcome, socket.socket):
                served.append(outcome)
                assert len(served) < 64, "never ran out of fds"
            else:
                shed += 1
                assert outcome[1] < 1.0, outcome
        # At the limit, with clients still arriving: no spinning, and each learns quickly.
        window = scaled(1.0, 2.0)
        before = cpu_seconds(proc.pid)
        deadline = time.monotonic() + window
        while time.monotonic() < deadline:
            outcome = try_echo(port)
            assert not isinstance(outcome, socket.socket), "served beyond the fd limit"
            assert outcome[1] < 1.0, outcome
        spent = cpu_seconds(proc.pid) - before
        assert spent < 0.1 * window, f"{spent:.2f} s of CPU over {window} s at the fd limit"
        for i, sock in enumerate(served):
            assert roundtrip(sock, b"still %d\n" % i) == b"still %d\n" % i
        for sock in served:
            sock.close()
        served.clear()
        deadline = time.monotonic() + 5
        while not isinstance(outcome := try_echo(port), socket.socket):
            assert time.monotonic() < deadline, "never accepted again"
        served.append(outcome)
        proc.send_signal(signal.SIGTERM)
        assert int(reader.expect("REJECTED").split()[1]) >= 5
        assert proc.wait(5) == 0
    finally:
        for sock in served:
            sock.close()
        kill_child(proc)


def test_09_default_max_connections_stays_below_the_fd_limit():
    """Items 9, 17: the default max_connections keeps the server below its fd limit."""
    code = EMFILE_SERVER.replace("max_connections=10_000, ", "")
    proc, _, (port,) = start_child(code)
    served = []
    try:
        outcomes = [try_echo(int(port)) for _ in range(40)]
        served = [o for o in outcomes if isinstance(o, socket.socket)]
        refused = [o for o in outcomes if not isinstance(o, socket.socket)]
        cap = 64 - kqfast._server._FD_HEADROOM  # default_max_connections() at 64 fds
        assert len(served) == cap and len(refused) == 40 - cap, len(served)
        assert all(took < 1.0 for _, took in refused), refused
        assert roundtrip(served[0], b"ok\n") == b"ok\n"
    finally:
        for sock in served:
            sock.close()
        kill_child(proc)


# ---- 10. robust accept loop --------------------------------------------------------------

def test_10_reset_storm_does_not_stall_a_ping_client(echo_server):
    """Item 10: an RST storm keeps ping p99 low; all server sockets are non-blocking and CLOEXEC."""
    server = echo_server("--mode", "raw")
    storm_size = scaled(2000, 20_000)
    stop = threading.Event()
    latencies: list[float] = []
    failures: list[BaseException] = []

    def ping() -> None:
        try:
            with server.connect() as client:
                client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                while not stop.is_set() or len(latencies) < 100:
                    started = time.perf_counter()
                    assert roundtrip(client, b"ping") == b"ping"
                    latencies.append(time.perf_counter() - started)
        except BaseException as exc:
            failures.append(exc)

    def storm(n: int) -> None:
        try:
            for _ in range(n):
                sock = socket.socket()
                sock.settimeout(5)
                try:
                    sock.connect((server.host, server.port))
                finally:
                    reset_close(sock)
        except BaseException as exc:
            failures.append(exc)

    pinger = threading.Thread(target=ping)
    pinger.start()
    storms = [threading.Thread(target=storm, args=(storm_size // 2,)) for _ in range(2)]
    for thread in storms:
        thread.start()
    for thread in storms:
        thread.join(60)
    stop.set()
    pinger.join(10)
    assert not failures, failures
    assert server.proc.poll() is None
    p99 = percentile(latencies, 0.99)
    assert p99 < 0.2, f"ping p99 {p99 * 1000:.1f} ms during the storm"
    held = [server.connect() for _ in range(5)]
    try:
        for i, sock in enumerate(held):
            assert roundtrip(sock, b"held %d" % i) == b"held %d" % i
        sockets = socket_fds(server.proc.pid)
        assert len(sockets) >= 6, sockets  # the listener and the held connections at least
        for fd in sockets:
            flags = fd_flags(fd, server.proc.pid)
            assert flags & os.O_NONBLOCK, f"server fd {fd} is blocking"
            assert flags & os.O_CLOEXEC, f"server fd {fd} is inherited by exec"
    finally:
        for sock in held:
            sock.close()


def test_10_child_spawned_by_a_handler_inherits_no_sockets(serve):
    """Item 10: a process a handler spawns (close_fds=False) inherits no socket or poller fd."""
    class Spawner(asyncio.Protocol):
        def connection_made(self, transport):
            self.transport = transport

        def data_received(self, data):
            listing = subprocess.run(
                [sys.executable, "-c",
                 "import os; print(' '.join(os.readlink('/proc/self/fd/' + f) "
                 "for f in os.listdir('/proc/self/fd') if os.path.exists('/proc/self/fd/' + f)))"],
                close_fds=False, capture_output=True, text=True, timeout=10)
            self.transport.write(listing.stdout.encode())
            self.transport.close()

    server = serve(Spawner)
    others = [connect_to(server) for _ in range(3)]
    with connect_to(server) as client:
        client.sendall(b"spawn")
        inherited = recv_until_eof(client).decode().split()
    for sock in others:
        sock.close()
    assert inherited, "the child listed no fds"
    assert not [fd for fd in inherited if fd.startswith("socket:")], inherited
    assert not [fd for fd in inherited if "eventpoll" in fd or "eventfd" in fd], inherited


# ---- 11. SIGPIPE-proof writes ------------------------------------------------------------

SIGPIPE_SERVER = CHILD_PRELUDE + """
signal.signal(signal.SIGPIPE, signal.SIG_DFL)
BIG = b"x" * (16 << 20)

class Blaster(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport
    blasting = False
    def data_received(self, data):
        if data == b"blast":
            self.blasting = True
            # Not reading on: after the client's FIN and RST only the write path is left,
            # and the kernel answers it with EPIPE (SIGPIPE without MSG_NOSIGNAL).
            self.transport.pause_reading()
            self.transport.write(BIG)
        else:
            self.transport.write(data)
    def eof_received(self):
        return self.blasting
    def connection_lost(self, exc):
        print("LOST", type(exc).__name__, flush=True)

python = kqfast.Server(Blaster, port=0, max_output=64 << 20)
native = kqfast.Server(kqfast.ECHO, port=0)
native.start()
print("READY", python.address[1], native.address[1], flush=True)
python.serve_forever()
"""


def test_11_sigpipe_default_disposition_cannot_kill_the_server():
    """Item 11: with SIGPIPE at SIG_DFL, resets during a 16 MiB write never kill the server."""
    proc, reader, (python_port, native_port) = start_child(SIGPIPE_SERVER)
    try:
        for _ in range(scaled(3, 20)):
            for fin_first in (False, True):
                client = connect_to(("127.0.0.1", int(python_port)), rcvbuf=64 * KiB)
                client.sendall(b"blast")
                if fin_first:
                    client.shutdown(socket.SHUT_WR)
                assert recv_exactly(client, 1) == b"x"
                reset_close(client)
                lost = reader.expect("LOST", timeout=5).split()[1]
                assert lost in ("ConnectionResetError", "BrokenPipeError"), lost
                assert proc.poll() is None, proc.communicate()
            # The native echo: the client sends without reading until the server stops
            # reading, half-closes, reads 1 byte, resets.
            client = connect_to(("127.0.0.1", int(native_port)), rcvbuf=64 * KiB)
            client.setblocking(False)
            while select.select([], [client], [], 0.3)[1]:
                client.send(b"y" * 65536)
            client.settimeout(5)
            client.shutdown(socket.SHUT_WR)
            assert recv_exactly(client, 1) == b"y"
            reset_close(client)
            with connect_to(("127.0.0.1", int(native_port))) as probe:
                assert roundtrip(probe, b"alive?") == b"alive?"
            with connect_to(("127.0.0.1", int(python_port))) as probe:
                assert roundtrip(probe, b"next") == b"next"
            assert reader.expect("LOST").split()[1] == "NoneType"
            assert proc.poll() is None, proc.communicate()
    finally:
        kill_child(proc)


# ---- 12. write errors --------------------------------------------------------------------

BIG_32 = b"z" * (32 * MiB)


def malloc_trim() -> None:
    """Asks glibc to give freed memory back, so RSS shows what is really still held."""
    import ctypes
    ctypes.CDLL(None).malloc_trim(0)


@pytest.mark.measurement
def test_12_reset_with_32_mib_queued_frees_it_and_goes_idle(serve):
    """Item 12: a reset with 32 MiB queued: one connection_lost, memory freed, loop idle."""
    book = Book()

    class Flood(Recorder):
        def data_received(self, data):
            super().data_received(data)
            self.transport.write(BIG_32)
            self.queued = self.transport.get_write_buffer_size()
            self.book.changed()

    server = serve(book.factory(Flood), max_output=64 * MiB)
    malloc_trim()
    baseline = rss_bytes()
    client = connect_to(server, rcvbuf=64 * KiB)
    client.sendall(b"go")
    assert book.wait_for(lambda: book.protocols and hasattr(book.protocols[0], "queued"))
    proto = book.protocols[0]
    assert proto.queued > 24 * MiB, proto.queued
    assert rss_bytes() - baseline > 20 * MiB  # the queue is really there
    reset_close(client)
    assert book.wait_for(lambda: "lost" in proto.calls)
    assert isinstance(proto.exc, (ConnectionResetError, BrokenPipeError)), proto.exc
    spent = idle_cpu_over(server, 1.0)
    assert spent < 0.05, f"the loop burned {spent:.2f} s of CPU after the reset"
    proto.check_lifecycle()
    assert proto.calls.count("lost") == 1
    malloc_trim()
    grown = rss_bytes() - baseline
    assert grown < 4 * MiB, f"RSS is still {grown / MiB:.1f} MiB over the baseline"


# ---- 13. output backpressure -------------------------------------------------------------

CHUNKS = [pattern(MiB, 1300 + i) for i in range(4)]


class Producer(Recorder):
    """On b"go", writes 1 MiB chunks while not paused, then closes."""

    def __init__(self, book, total):
        super().__init__(book)
        self.total = total
        self.produced = 0
        self.paused = False
        self.pauses = self.resumes = 0
        self.buffered_at_pause: list[int] = []

    def data_received(self, data):
        super().data_received(data)
        self.produce()

    def produce(self):
        while not self.paused and self.produced < self.total:
            self.transport.write(CHUNKS[(self.produced // MiB) % len(CHUNKS)])
            self.produced += MiB
        if self.produced >= self.total and not self.paused:
            self.transport.close()

    def pause_writing(self):
        self.paused = True
        self.pauses += 1
        self.buffered_at_pause.append(self.transport.get_write_buffer_size())
        self.book.changed()

    def resume_writing(self):
        self.paused = False
        self.resumes += 1
        self.produce()


@pytest.mark.measurement
def test_13_pause_writing_stops_the_producer_and_resume_restarts_it(serve):
    """Item 13: pause_writing stops the producer at high water, resume_writing restarts it."""
    total = scaled(16, 256) * MiB
    book = Book()
    server = serve(book.factory(Producer, total=total))
    baseline = rss_bytes()
    client = connect_to(server, rcvbuf=64 * KiB)
    client.sendall(b"go")
    assert book.wait_for(lambda: book.protocols and book.protocols[0].pauses == 1)
    proto = book.protocols[0]
    produced = proto.produced
    time.sleep(0.2)  # proves that the producer stays stopped while the client reads nothing
    assert proto.produced == produced < total
    assert proto.buffered_at_pause[0] >= 64 * KiB
    assert rss_bytes() - baseline < 2 * MiB + 10 * MiB
    digest = hashlib.sha256()
    received = 0
    while data := client.recv(1 << 16):
        digest.update(data)
        received += len(data)
    expected = hashlib.sha256()
    for i in range(total // MiB):
        expected.update(CHUNKS[i % len(CHUNKS)])
    assert received == total and digest.hexdigest() == expected.hexdigest()
    assert book.wait_for(lambda: "lost" in proto.calls)
    assert proto.resumes >= 1 and proto.pauses in (proto.resumes, proto.resumes + 1)
    assert proto.exc is None
    client.close()


def test_13_output_over_max_output_closes_the_connection(serve):
    """Item 13: a producer ignoring pause_writing is cut off at max_output with ENOBUFS."""
    book = Book()

    class Ignorer(Recorder):
        def data_received(self, data):
            super().data_received(data)
            for i in range(8):
                self.transport.write(CHUNKS[i % len(CHUNKS)])

    server = serve(book.factory(Ignorer), max_output=2 * MiB)
    client = connect_to(server, rcvbuf=64 * KiB)
    client.sendall(b"go")
    assert book.wait_for(lambda: book.protocols and "lost" in book.protocols[0].calls)
    proto = book.protocols[0]
    assert isinstance(proto.exc, OSError) and proto.exc.errno == errno.ENOBUFS, proto.exc
    data, how = recv_until_closed(client)
    assert len(data) < 8 * MiB and how in ("eof", "reset")
    client.close()


# ---- 14. input backpressure --------------------------------------------------------------

class Pauser(Recorder):
    """Pauses reading on the first data; hashes everything; reports at EOF."""

    def __init__(self, book):
        super().__init__(book)
        self.hash = hashlib.sha256()
        self.count = 0

    def data_received(self, data):
        self.count += len(data)
        self.hash.update(data)
        if "data" not in self.calls:
            self.transport.pause_reading()
        self.calls.append("data")
        self.book.changed()

    def eof_received(self):
        self.calls.append("eof")
        self.book.changed()


@pytest.mark.measurement
def test_14_pause_reading_holds_a_blast_without_memory_or_cpu(serve):
    """Item 14: a 64 MiB blast at a paused protocol stays in the kernel; intact after resume."""
    total_mib = scaled(64, 256)
    base = pattern(MiB, 14)
    chunk = lambda i: struct.pack(">Q", i) + base[8:]
    expected = hashlib.sha256()
    for i in range(total_mib):
        expected.update(chunk(i))
    book = Book()
    server = serve(book.factory(Pauser))
    baseline = rss_bytes()
    client = connect_to(server)
    client.setblocking(False)
    stalled = threading.Event()
    failures: list[BaseException] = []

    def blast() -> None:
        try:
            deadline = time.monotonic() + 60
            for i in range(total_mib):
                data, offset = chunk(i), 0
                while offset < len(data):
                    assert time.monotonic() < deadline, "the blast never finished"
                    if not select.select([], [client], [], 0.3)[1]:
                        stalled.set()
                        continue
                    offset += client.send(data[offset:])
            client.shutdown(socket.SHUT_WR)
        except BaseException as exc:
            failures.append(exc)
            stalled.set()

    sender = threading.Thread(target=blast)
    sender.start()
    try:
        assert stalled.wait(10) and not failures, failures
        proto = book.protocols[0]
        assert not on_loop(server, proto.transport.is_reading)
        grown = rss_bytes() - baseline
        assert grown < 16 * MiB, f"RSS grew {grown / MiB:.1f} MiB while paused"
        spent = idle_cpu_over(server, 0.5)
        assert spent < 0.05, f"the paused loop burned {spent:.2f} s"
        server.call_soon_threadsafe(proto.transport.resume_reading)
        assert book.wait_for(lambda: "eof" in proto.calls, 60), proto.count
    finally:
        sender.join(60)
    assert not failures, failures
    assert proto.count == total_mib * MiB
    assert proto.hash.hexdigest() == expected.hexdigest()
    client.close()


# ---- 15. frame-size limits and linear parsing --------------------------------------------

class LineRecorder(kqfast.LineProtocol, Recorder):
    """A LineProtocol that records its lines."""

    def __init__(self, book):
        Recorder.__init__(self, book)
        self.lines: list[bytes] = []

    def line_received(self, line):
        self.calls.append("line")
        self.lines.append(line)
        self.book.changed()


@pytest.mark.measurement
@pytest.mark.parametrize("handler", ["native", "python"])
def test_15_ten_mib_without_newline_closes_early_with_bounded_memory(serve, handler):
    """Item 15: 10 MiB without a newline closes after max_line plus two reads, memory bounded."""
    book = Book()
    server = serve(kqfast.LINE_ECHO if handler == "native" else book.factory(LineRecorder))
    payload = b"a" * (10 * MiB)
    baseline = rss_bytes()
    client = connect_to(server)
    failures: list[BaseException] = []

    def send() -> None:
        try:
            client.sendall(payload)
        except (ConnectionResetError, BrokenPipeError):
            pass  # the server gave up on us: allowed
        except BaseException as exc:
            failures.append(exc)

    sender = threading.Thread(target=send)
    sender.start()
    data, how = recv_until_closed(client)
    sender.join(10)
    assert not failures, failures
    assert data == b"" and how in ("eof", "reset")
    assert server.stats()["bytes_in"] <= 65536 + 2 * 65536, server.stats()["bytes_in"]
    assert rss_bytes() - baseline < 8 * MiB
    if handler == "python":
        assert book.wait_for(lambda: book.protocols and "lost" in book.protocols[0].calls)
        assert book.protocols[0].lines == []
    client.close()


@pytest.mark.parametrize("handler", ["native", "python"])
def test_15_long_line_one_byte_per_send_is_linear(serve, handler):
    """Item 15: a 64 KiB line sent one byte per send() is echoed within 2 s (linear framing)."""
    from kqfast._echo import LineEchoProtocol
    server = serve(kqfast.LINE_ECHO if handler == "native" else LineEchoProtocol)
    line = b"q" * (64 * KiB - 1) + b"\n"
    client = connect_to(server)
    client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    started = time.monotonic()
    for i in range(len(line)):
        client.send(line[i:i + 1])
    assert recv_exactly(client, len(line)) == line
    elapsed = time.monotonic() - started
    assert elapsed < 2.0, f"{elapsed:.2f} s"
    client.close()


# ---- 16. idle timeouts (slowloris) -------------------------------------------------------

def test_16_slow_clients_are_closed_by_the_idle_timeout(serve):
    """Item 16: slow clients close ~1 s after their last byte; a normal one is served; fds freed."""
    n = scaled(100, 1000)
    server = serve(kqfast.LINE_ECHO, idle_timeout=1.0)
    gc.collect()
    before = open_fds()
    slow = [connect_to(server) for _ in range(n)]
    for sock in slow:
        sock.sendall(b"a")  # the next byte would come after 5 s
    last_byte = time.monotonic()
    normal = connect_to(server)
    open_slow = {sock.fileno(): sock for sock in slow}
    poller = select.poll()
    for fd in open_slow:
        poller.register(fd, select.POLLIN)
    while open_slow:
        assert time.monotonic() - last_byte < 2.5, f"{len(open_slow)} slow clients still open"
        assert roundtrip(normal, b"ping\n") == b"ping\n"
        for fd, _ in poller.poll(100):
            assert open_slow[fd].recv(16) == b""
            poller.unregister(fd)
            open_slow.pop(fd).close()
    closed_after = time.monotonic() - last_byte
    assert closed_after >= 0.9, f"closed after {closed_after:.2f} s, before the idle timeout"
    assert roundtrip(normal, b"still here\n") == b"still here\n"
    assert server.stats()["timeouts"] == n
    normal.close()
    assert wait_until(lambda: server.stats()["connections_current"] == 0)
    assert not new_fds(before), new_fds(before)


def test_16_idle_python_connections_get_timeout_error(serve):
    """Item 16: a silent Python-protocol connection is lost with TimeoutError after idle_timeout."""
    book = Book()
    server = serve(book.factory(), idle_timeout=0.5)
    clients = [connect_to(server) for _ in range(10)]
    started = time.monotonic()
    assert book.wait_for(lambda: len(book.lost()) == 10, 3)
    assert time.monotonic() - started >= 0.4
    for proto in book.protocols:
        proto.check_lifecycle()
        assert isinstance(proto.exc, TimeoutError), proto.exc
    for sock in clients:
        assert recv_until_closed(sock)[0] == b""
        sock.close()


def test_16_client_that_never_reads_is_closed_after_idle_plus_linger(serve):
    """Item 16: a client that never reads, with output pending, is reset after idle + linger."""
    server = serve(kqfast.ECHO, idle_timeout=0.5, linger_timeout=0.5)
    client = connect_to(server, rcvbuf=64 * KiB)
    client.setblocking(False)
    while select.select([], [client], [], 0.3)[1]:
        client.send(b"w" * 65536)
        last_send = time.monotonic()  # the server's last progress was before this
    assert server.stats()["connections_current"] == 1
    assert wait_until(lambda: server.stats()["connections_current"] == 0, 5)
    took = time.monotonic() - last_send
    assert took <= 0.5 + 0.5 + 1.0, f"closed {took:.2f} s after the last progress"
    stats = server.stats()
    # Both stages ran: the idle timeout began a graceful close, the linger timeout reset it.
    assert stats["timeouts"] == 1 and stats["errors"] == 1, stats
    client.settimeout(5)
    assert recv_until_closed(client)[1] == "reset"
    client.close()


# ---- 17. connection cap ------------------------------------------------------------------

def test_17_max_connections_refuses_the_excess_at_once(serve):
    """Item 17: max_connections=10 serves 10 of 50, refuses 40 at once, admits after a close."""
    server = serve(kqfast.LINE_ECHO, max_connections=10)
    port = server.address[1]
    outcomes = [try_echo(port, timeout=1.0) for _ in range(50)]
    served = [o for o in outcomes if isinstance(o, socket.socket)]
    refused = [o for o in outcomes if not isinstance(o, socket.socket)]
    try:
        assert len(served) == 10 and len(refused) == 40
        assert all(took < 1.0 for _, took in refused), refused
        assert server.stats()["connections_rejected"] == 40
        served.pop().close()
        assert wait_until(lambda: server.stats()["connections_current"] == 9)
        again = try_echo(port)
        assert isinstance(again, socket.socket), again
        served.append(again)
        assert not isinstance(try_echo(port), socket.socket)  # full again
    finally:
        for sock in served:
            sock.close()


# ---- 18. half-close both ways ------------------------------------------------------------

RESPONSE = pattern(4 * MiB, 18)


def test_18a_server_answers_after_the_client_half_closes(serve):
    """Item 18: after a request and SHUT_WR, a 4 MiB answer written at EOF arrives whole."""
    book = Book()

    class AnswerAtEof(Recorder):
        def eof_received(self):
            super().eof_received()
            self.transport.write(RESPONSE)
            self.transport.close()
            return True

    server = serve(book.factory(AnswerAtEof))
    for _ in range(scaled(3, 20)):
        client = connect_to(server)
        client.sendall(b"request")
        client.shutdown(socket.SHUT_WR)
        answer, how = recv_until_closed(client)
        assert how == "eof" and len(answer) == len(RESPONSE) and answer == RESPONSE
        client.close()
    assert book.wait_for(lambda: len(book.lost()) == len(book.protocols))
    for proto in book.protocols:
        proto.check_lifecycle()
        assert bytes(proto.data) == b"request" and proto.exc is None
        assert proto.calls.index("eof") > proto.calls.index("data")


def test_18b_server_write_eof_while_the_client_keeps_sending(serve):
    """Item 18: write_eof() after 4 MiB: the client gets it all then EOF, and can still upload."""
    book = Book()
    upload = pattern(MiB, 181)

    class HalfCloser(Recorder):
        def data_received(self, data):
            first = not self.data
            super().data_received(data)
            if first:
                self.transport.write(RESPONSE)
                self.transport.write_eof()

        def eof_received(self):
            super().eof_received()
            return False

    server = serve(book.factory(HalfCloser))
    client = connect_to(server)
    client.sendall(b"start")
    assert book.wait_for(lambda: book.protocols and book.protocols[0].data)
    failures: list[BaseException] = []

    def upload_then_close() -> None:
        try:
            client.sendall(upload)
            client.shutdown(socket.SHUT_WR)
        except BaseException as exc:
            failures.append(exc)

    sender = threading.Thread(target=upload_then_close)
    sender.start()
    answer, how = recv_until_closed(client)
    sender.join(10)
    assert not failures, failures
    assert how == "eof" and answer == RESPONSE
    proto = book.protocols[0]
    assert book.wait_for(lambda: "lost" in proto.calls)
    assert bytes(proto.data) == b"start" + upload
    proto.check_lifecycle()
    assert proto.exc is None
    client.close()


# ---- 19. graceful close never truncates --------------------------------------------------

def test_19_close_with_unread_input_still_delivers_everything(serve):
    """Item 19: 4 MiB then close() with input unread: the client gets all, then EOF, no reset."""
    class AnswerAndClose(asyncio.Protocol):
        def connection_made(self, transport):
            self.transport = transport

        def data_received(self, data):
            self.transport.write(RESPONSE)
            self.transport.close()

    server = serve(AnswerAndClose)
    junk = b"j" * (100 * KiB)
    for i in range(scaled(20, 100)):
        client = connect_to(server)
        client.sendall(b"request\n" + junk)
        answer, how = recv_until_closed(client)
        assert how == "eof", f"run {i}: reset after {len(answer)} bytes"
        assert answer == RESPONSE, f"run {i}: {len(answer)} bytes"
        client.close()


def test_19_native_blank_line_close_with_unread_input(serve):
    """Item 19: the native line echo closing on a blank line with input unread delivers all."""
    server = serve(kqfast.LINE_ECHO)
    lines = b"".join(b"line %d %s\n" % (i, b"x" * 100) for i in range(scaled(20_000, 40_000)))
    junk = b"j" * (100 * KiB)
    for i in range(scaled(5, 50)):
        client = connect_to(server)
        answer = echo_through(client, lines + b"\n" + junk)
        assert answer == lines, f"run {i}: {len(answer)} of {len(lines)} bytes"
        client.close()


# ---- 20. graceful shutdown ---------------------------------------------------------------

def test_20_stop_lets_in_flight_responses_finish(serve):
    """Item 20: stop(timeout=5) mid-response: all bytes + EOF for all, no accepts, no fd leak."""
    n = scaled(20, 100)
    gc.collect()
    before = open_fds()

    class Answer(Recorder):
        def data_received(self, data):
            super().data_received(data)
            self.transport.write(RESPONSE)

    book = Book()
    server = kqfast.Server(book.factory(Answer), port=0).start()
    clients = [connect_to(server, rcvbuf=64 * KiB) for _ in range(n)]
    received = []
    for client in clients:
        client.sendall(b"go")
        received.append(recv_exactly(client, len(RESPONSE) // 2))
    stopper = threading.Thread(target=server.stop, kwargs={"timeout": 5.0})
    started = time.monotonic()
    stopper.start()
    assert wait_until(lambda: connect_refused(server.address)), "still accepting"
    results: list = [None] * n

    def finish(i: int) -> None:
        results[i] = recv_until_closed(clients[i])

    readers = [threading.Thread(target=finish, args=(i,)) for i in range(n)]
    for thread in readers:
        thread.start()
    for thread in readers:
        thread.join(10)
    stopper.join(10)
    took = time.monotonic() - started
    assert not stopper.is_alive() and took < 5.5, took
    for i, (rest, how) in enumerate(results):
        assert how == "eof" and received[i] + rest == RESPONSE, f"client {i}: {how}"
    for client in clients:
        client.close()
    for proto in book.protocols:
        proto.check_lifecycle()
    assert server.stats()["connections_current"] == 0
    del server, book, proto  # the protocols' transports hold the loop, and so its poller
    gc.collect()
    assert wait_until(lambda: not new_fds(before)), new_fds(before)


# ---- 21. cross-thread wakeup -------------------------------------------------------------

@pytest.mark.parametrize("handler", ["native", "python"])
def test_21_stop_from_another_thread_is_prompt(handler):
    """Item 21: stop() from another thread wakes an idle loop out of its infinite wait at once."""
    from kqfast._echo import EchoProtocol
    server = kqfast.Server(kqfast.ECHO if handler == "native" else EchoProtocol, port=0,
                           idle_timeout=0).start()
    with connect_to(server) as client:
        assert roundtrip(client, b"up") == b"up"
    time.sleep(0.2)  # lets the loop settle into its infinite wait
    started = time.monotonic()
    server.stop()
    took = time.monotonic() - started
    assert took < 0.5, f"stop() took {took:.3f} s"
    assert connect_refused(server.address)


def test_21_many_threads_posting_callbacks(serve):
    """Item 21: 100k callbacks from 4 threads all run on the loop; fds constant; idle afterwards."""
    total = scaled(100_000, 1_000_000)
    server = serve(kqfast.ECHO)
    gc.collect()
    before = open_fds()
    ran = []
    threads_seen = set()

    def callback(i):
        ran.append(i)
        threads_seen.add(threading.get_ident())

    def post(start: int) -> None:
        for i in range(start, total, 4):
            server.call_soon_threadsafe(callback, i)

    posters = [threading.Thread(target=post, args=(k,)) for k in range(4)]
    for thread in posters:
        thread.start()
    for thread in posters:
        thread.join(60)
    done = threading.Event()
    server.call_soon_threadsafe(done.set)
    assert done.wait(30)
    assert len(ran) == total and sorted(ran) == list(range(total))
    assert len(threads_seen) == 1  # all on the loop's one thread...
    assert threading.get_ident() not in threads_seen  # ...which is not this one
    assert {thread.ident for thread in posters}.isdisjoint(threads_seen)
    assert not new_fds(before), new_fds(before)
    spent = idle_cpu_over(server, 0.5)
    assert spent < 0.05, f"the loop burned {spent:.2f} s after the queue emptied"


@pytest.mark.parametrize("method", ["close", "abort"])
def test_21_transport_calls_posted_from_another_thread_complete(serve, method):
    """Items 21, 2: close()/abort() posted with call_soon_threadsafe() take full effect at once."""
    book = Book()
    server = serve(book.factory())
    client = connect_to(server)
    assert book.wait_for(lambda: len(book.protocols) == 1)
    proto = book.protocols[0]
    server.call_soon_threadsafe(getattr(proto.transport, method))
    data, how = recv_until_closed(client)
    assert data == b"" and how == ("eof" if method == "close" else "reset")
    client.close()
    assert book.wait_for(lambda: "lost" in proto.calls, 2), proto.calls
    proto.check_lifecycle()


# ---- 22. signal ownership ----------------------------------------------------------------

SIGNAL_OWNER = CHILD_PRELUDE + """
r, w = socket.socketpair()
w.setblocking(False)
signal.set_wakeup_fd(w.fileno())
count = 0
def on_term(signum, frame):
    global count
    count += 1
    os.write(1, b"TERM\\n")
signal.signal(signal.SIGTERM, on_term)
before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
server = kqfast.Server(kqfast.ECHO, port=0)
signal.signal(signal.SIGUSR2, lambda *a: server.stop(0))
print("READY", server.address[1], flush=True)
server.serve_forever()
after = signal.set_wakeup_fd(-1)
same = all(signal.getsignal(s) is h for s, h in before.items())
print("RESULT", w.fileno(), after, count, same, flush=True)
"""


def blocked_signals(pid: int) -> int:
    """The blocked-signal mask of a process's main thread (SigBlk in /proc/<pid>/status)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("SigBlk:"):
                return int(line.split()[1], 16)
    raise AssertionError("no SigBlk")


def test_22_the_loop_leaves_signal_dispositions_and_wakeup_fd_alone():
    """Item 22: wakeup fd restored, no signal blocked, handlers kept; 100 SIGTERMs all handled."""
    proc, reader, (port,) = start_child(SIGNAL_OWNER)
    try:
        with socket.create_connection(("127.0.0.1", int(port)), timeout=5) as client:
            assert roundtrip(client, b"up") == b"up"
            assert blocked_signals(proc.pid) == 0, "signals blocked (signalfd-style)"
            for _ in range(100):
                proc.send_signal(signal.SIGTERM)
                reader.expect("TERM", timeout=5)
            assert proc.poll() is None
            assert roundtrip(client, b"still up") == b"still up"
        proc.send_signal(signal.SIGUSR2)
        _, wakeup_fd, after, count, same = reader.expect("RESULT").split()
        assert after == wakeup_fd, "the wakeup fd was not restored"
        assert count == "100" and same == "True"
        assert proc.wait(5) == 0
    finally:
        kill_child(proc)


# ---- 23. fork safety ---------------------------------------------------------------------

def fork_and_wait(child) -> int:
    """Runs child() in a forked child and returns its exit code (child() returns it)."""
    pid = os.fork()
    if pid == 0:
        code = 99
        try:
            code = child()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def serve_echoes(server: kqfast.Server, n: int) -> None:
    """n distinct echoes through one client, every one checked."""
    with connect_to(server) as client:
        for i in range(n):
            message = b"%08d" % i
            assert roundtrip(client, message) == message


def test_23_forked_child_cannot_serve_and_the_parent_is_unharmed(tmp_path):
    """Item 23: a forked child can't serve (RuntimeError) nor close its files; the parent serves."""
    path = tmp_path / "child-file"
    path.write_bytes(b"the child's own file")
    server = kqfast.Server(kqfast.ECHO, port=0)

    def child() -> int:
        nonlocal server
        try:
            server.serve_forever()
            return 2
        except RuntimeError as exc:
            if "another process" not in str(exc):
                return 3
        with open(path, "rb") as f:
            del server
            gc.collect()  # the child's copy of the loop goes away
            try:
                os.fstat(f.fileno())
                return 0 if f.read() == b"the child's own file" else 4
            except OSError:
                return 5

    assert fork_and_wait(child) == 0
    server.start()
    try:
        serve_echoes(server, 1000)
    finally:
        server.stop()


@pytest.mark.parametrize("started", [False, True], ids=["created", "started"])
def test_23_child_cleaning_up_its_copy_leaves_the_parent_serving(started):
    """Item 23: a forked child calling stop() on its copy leaves the parent's poller intact."""
    server = kqfast.Server(kqfast.ECHO, port=0)
    if started:
        server.start()
        serve_echoes(server, 10)

    def child() -> int:
        server.stop()  # what a `with` block or a finally: clause does in the child
        return 0

    try:
        assert fork_and_wait(child) == 0
        if not started:
            server.start()
        serve_echoes(server, 1000)
    finally:
        server.stop()


# ---- 24. reuse semantics -----------------------------------------------------------------

def test_24_restart_binds_over_time_wait():
    """Item 24: a new server binds at once over its predecessor's TIME_WAIT connection."""
    server = kqfast.Server(kqfast.LINE_ECHO, port=0).start()
    port = server.address[1]
    with connect_to(server) as client:
        assert roundtrip(client, b"hi\n") == b"hi\n"
        client.sendall(b"\n")  # a blank line: the server closes first
        assert recv_until_eof(client) == b""
    assert wait_until(lambda: ("127.0.0.1", port, "06") in tcp_sockets(port)), \
        tcp_sockets(port)
    server.stop()
    again = kqfast.Server(kqfast.LINE_ECHO, port=port).start()
    try:
        assert again.address[1] == port
        with connect_to(again) as client:
            assert roundtrip(client, b"again\n") == b"again\n"
    finally:
        again.stop()


def test_24_reuse_port_spreads_connections_over_two_servers():
    """Item 24: two reuse_port=True servers each take 30-70% of 200 connections."""
    first = kqfast.Server(kqfast.ECHO, port=0, reuse_port=True).start()
    second = kqfast.Server(kqfast.ECHO, port=first.address[1], reuse_port=True).start()
    try:
        n = 200
        for i in range(n):
            with connect_to(first) as client:
                assert roundtrip(client, b"%d" % i) == b"%d" % i
        shares = [s.stats()["connections_total"] for s in (first, second)]
        assert sum(shares) == n and all(0.3 * n <= share <= 0.7 * n for share in shares), shares
    finally:
        first.stop()
        second.stop()


@pytest.mark.parametrize("first_reuse, second_reuse", [(False, False), (True, False),
                                                       (False, True)])
def test_24_second_bind_without_reuse_port_is_refused(first_reuse, second_reuse):
    """Item 24: a second bind fails with EADDRINUSE unless both servers ask for reuse_port."""
    first = kqfast.Server(kqfast.ECHO, port=0, reuse_port=first_reuse)
    try:
        with pytest.raises(OSError) as info:
            kqfast.Server(kqfast.ECHO, port=first.address[1], reuse_port=second_reuse)
        assert info.value.errno == errno.EADDRINUSE
    finally:
        first.stop()


# ---- 25. secure defaults -----------------------------------------------------------------

def test_25_defaults_bind_loopback_with_limits_on():
    """Item 25: the default host is loopback (only loopback listens); every default limit is on."""
    import inspect
    server = kqfast.Server(kqfast.ECHO, port=0).start()
    try:
        host, port = server.address
        assert host == "127.0.0.1"
        listening = [s for s in tcp_sockets(port) if s[2] == "0A"]
        assert listening == [("127.0.0.1", port, "0A")], listening
        assert not [line for line in open("/proc/net/tcp6").read().splitlines()[1:]
                    if int(line.split()[1].split(":")[1], 16) == port]
    finally:
        server.stop()
    defaults = {name: p.default for name, p in
                inspect.signature(kqfast.Server.__init__).parameters.items()}
    assert defaults["host"] == "127.0.0.1"
    for limit in ("idle_timeout", "max_line", "high_water", "max_output", "linger_timeout"):
        assert defaults[limit] and defaults[limit] > 0, limit
    assert kqfast._server.default_max_connections() > 0
    assert inspect.signature(kqfast.listen).parameters["host"].default == "127.0.0.1"
    assert inspect.signature(kqfast.serve).parameters["host"].default == "127.0.0.1"


def test_25_default_limits_are_enforced(serve):
    """Item 25: with no options, max_line and max_output are enforced."""
    book = Book()
    line_server = serve(kqfast.LINE_ECHO)
    with connect_to(line_server) as client:
        client.sendall(b"x" * (70 * KiB))
        assert recv_until_closed(client)[0] == b""

    class Hoarder(Recorder):
        def data_received(self, data):
            super().data_received(data)
            for _ in range(20):
                self.transport.write(CHUNKS[0])

    server = serve(book.factory(Hoarder))
    with connect_to(server, rcvbuf=64 * KiB) as client:
        client.sendall(b"go")
        assert book.wait_for(lambda: book.protocols and "lost" in book.protocols[0].calls)
        assert book.protocols[0].exc.errno == errno.ENOBUFS


# ---- 26. GIL discipline ------------------------------------------------------------------

LATENCY_CLIENT = """
import socket, sys, time
port, n = int(sys.argv[1]), int(sys.argv[2])
s = socket.create_connection(("127.0.0.1", port), timeout=5)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
message = b"x" * 64
samples = []
for i in range(n):
    started = time.perf_counter()
    s.sendall(message)
    got = 0
    while got < len(message):
        got += len(s.recv(4096))
    samples.append(time.perf_counter() - started)
samples.sort()
print(samples[int(0.99 * len(samples))])
"""


def echo_p99(port: int, n: int) -> float:
    """The p99 round-trip time of n echoes from a separate client process."""
    done = subprocess.run([sys.executable, "-c", LATENCY_CLIENT, str(port), str(n)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return float(done.stdout)


def test_26_native_echo_latency_ignores_a_spinning_python_thread(serve):
    """Item 26: a spinning Python thread adds at most 2 x switch interval to native echo p99."""
    server = serve(kqfast.ECHO)
    n = scaled(2000, 20_000)
    echo_p99(server.address[1], 200)  # warm-up
    baseline = echo_p99(server.address[1], n)
    stop = threading.Event()

    def spin() -> None:
        x = 0
        while not stop.is_set():
            x += 1

    spinner = threading.Thread(target=spin)
    spinner.start()
    try:
        contended = echo_p99(server.address[1], n)
    finally:
        stop.set()
        spinner.join()
    bound = 2 * sys.getswitchinterval() + baseline
    assert contended <= bound, (f"p99 {contended * 1e3:.2f} ms with a spinning thread, "
                                f"baseline {baseline * 1e3:.2f} ms")


# ---- 28. leak gates (the fuzzers are in test_fuzz.py) -------------------------------------

@pytest.mark.parametrize("handler", ["native", "python"])
def test_28_no_fd_leak_after_many_connect_close_cycles(serve, handler):
    """Item 28: 10,000 connect/close cycles (half FIN, half RST) leave the fd count unchanged."""
    from kqfast._echo import EchoProtocol
    server = serve(kqfast.ECHO if handler == "native" else EchoProtocol)
    gc.collect()
    before = open_fds()
    cycles = scaled(10_000, 100_000)
    for i in range(cycles):
        sock = socket.create_connection(server.address, timeout=5)
        if i % 2:
            reset_close(sock)
        else:
            sock.close()
    assert wait_until(lambda: server.stats()["connections_current"] == 0, 10), server.stats()
    assert server.stats()["connections_total"] >= cycles // 2  # a reset may beat accept()
    # libkqueue lets go of a closed socket from its own thread, a little later.
    assert wait_until(lambda: not new_fds(before), 10), new_fds(before)


@pytest.mark.measurement
def test_28_memory_returns_after_many_connections():
    """Item 28: after 20,000 connections, RSS is back near the baseline and no protocol survives."""
    waves = scaled(20, 100)
    alive = weakref.WeakSet()

    class Tracked(asyncio.Protocol):
        def connection_made(self, transport):
            alive.add(self)
            self.transport = transport

        def data_received(self, data):
            self.transport.write(data)

    server = kqfast.Server(Tracked, port=0, max_connections=5000).start()

    def wave() -> None:
        clients = [connect_to(server) for _ in range(1000)]
        for client in clients:
            client.sendall(b"x")
        for client in clients:
            assert client.recv(1) == b"x"
        for i, client in enumerate(clients):
            if i % 2:
                reset_close(client)
            else:
                client.close()
        assert wait_until(lambda: server.stats()["connections_current"] == 0, 10)

    try:
        for _ in range(2):
            wave()  # warm-up: the fd table's pages, the arena, allocator pools
        gc.collect()
        malloc_trim()
        baseline = rss_bytes()
        for _ in range(waves - 2):
            wave()
        gc.collect()
        malloc_trim()
        grown = rss_bytes() - baseline
        assert grown < 4 * MiB, f"RSS grew {grown / MiB:.1f} MiB"
        assert len(alive) == 0, f"{len(alive)} protocols still alive"
    finally:
        server.stop()
