"""Helpers for the tests: kqfast-echo in a subprocess, reading sockets, counting fds."""
from __future__ import annotations

import os
import queue
import re
import resource
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

READY = re.compile(r"listening on (?:(?P<path>/\S+) |(\[(?P<v6>[^\]]+)\]|(?P<v4>[^\s:]+)):(?P<port>\d+) )")


@dataclass
class EchoProcess:
    """A running kqfast-echo: its process, the ready line and the address it bound."""
    proc: subprocess.Popen
    ready_line: str
    host: str
    port: int
    path: str | None = None  # a Unix socket server's path (host is then the path, port 0)

    def connect(self, timeout: float = 5.0) -> socket.socket:
        """A client socket connected to the server."""
        if self.path is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            sock.connect(self.path)
            return sock
        return socket.create_connection((self.host, self.port), timeout=timeout)

    def stop(self, sig=signal.SIGTERM, timeout: float = 10.0) -> tuple[int, str]:
        """Sends sig (None: sends nothing, the process was already told) and returns (exit
        code, rest of stderr) once it exits."""
        if sig is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
        _, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, err


def echo_command(*args: str) -> list[str]:
    """The command line that runs kqfast-echo with args, in this interpreter."""
    return [sys.executable, "-m", "kqfast.cli", *args]


def run_echo(*args: str, timeout: float = 10.0) -> subprocess.CompletedProcess:
    """Runs kqfast-echo to its end (for arguments or setups that must make it exit)."""
    return subprocess.run(echo_command(*args), stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=timeout)


def run_echo_expecting_exit(*args: str, timeout: float = 10.0) -> subprocess.CompletedProcess:
    """run_echo for setups that must make kqfast-echo exit; if it prints the ready line
    instead, it is stopped (SIGTERM, which also ends any children) and the test fails."""
    proc = subprocess.Popen(echo_command(*args), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = proc.stderr.readline()
    if READY.search(first):
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=timeout)
        raise AssertionError(f"kqfast-echo started instead of exiting: {first!r}")
    # Read on through the same file objects: communicate() reads the fds themselves and
    # would miss what readline() left in stderr's buffer.
    rest, out = proc.stderr.read(), proc.stdout.read()
    proc.wait(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, first + rest)


def start_echo(*args: str, env: dict | None = None) -> EchoProcess:
    """Starts kqfast-echo on a free port and waits for its ready line on stderr."""
    cmd = echo_command("--port", "0", *args)
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    line = proc.stderr.readline()
    match = READY.search(line)
    if match is None:
        proc.kill()
        _, err = proc.communicate()
        raise AssertionError(f"no ready line from kqfast-echo: {line!r} {err!r}")
    if match.group("path"):
        return EchoProcess(proc, line, match.group("path"), 0, match.group("path"))
    host = match.group("v6") or match.group("v4")
    return EchoProcess(proc, line, host, int(match.group("port")))


def start_python(code: str, ready: str = "READY") -> tuple[subprocess.Popen, list[str]]:
    """Runs code in a child interpreter and waits for the stdout line that starts with ready;
    returns the process and that line's words after the first."""
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line.startswith(ready):
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"child never said {ready}: {line!r} {out!r} {err!r}")
    return proc, line.split()[1:]


def recv_until_eof(sock: socket.socket, limit: int = 1 << 30) -> bytes:
    """Reads until the peer closes; returns everything read."""
    chunks = []
    total = 0
    while total < limit:
        data = sock.recv(1 << 16)
        if not data:
            break
        chunks.append(data)
        total += len(data)
    return b"".join(chunks)


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    """Reads exactly n bytes, failing if the peer closes first."""
    buf = bytearray()
    while len(buf) < n:
        data = sock.recv(n - len(buf))
        if not data:
            raise AssertionError(f"EOF after {len(buf)} of {n} bytes: {bytes(buf)!r}")
        buf += data
    return bytes(buf)


def recv_until_closed(sock: socket.socket, limit: int = 1 << 30) -> tuple[bytes, str]:
    """Reads until the peer closes; returns (everything read, "eof" or "reset")."""
    chunks = []
    total = 0
    while total < limit:
        try:
            data = sock.recv(1 << 16)
        except ConnectionResetError:
            return b"".join(chunks), "reset"
        if not data:
            break
        chunks.append(data)
        total += len(data)
    return b"".join(chunks), "eof"


def echo_through(sock: socket.socket, data: bytes) -> bytes:
    """Sends data from a thread (the peer may echo while we send), shuts down the write side,
    and returns everything read until the peer closes."""
    failure: list[BaseException] = []

    def send() -> None:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except BaseException as exc:  # reported by the caller
            failure.append(exc)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    try:
        received = recv_until_eof(sock)
    finally:
        sender.join(timeout=10)
    assert not failure, f"sending failed: {failure[0]!r}"
    return received


def roundtrip(sock: socket.socket, data: bytes) -> bytes:
    """Sends data and reads back as many bytes."""
    sock.sendall(data)
    return recv_exactly(sock, len(data))


def connect_refused(address, family: int = socket.AF_INET) -> bool:
    """True when a connection to address is refused (nothing listens there)."""
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(5.0)
        try:
            sock.connect(address)
        except (ConnectionRefusedError, FileNotFoundError):
            return True
        except ConnectionResetError:
            return False  # queued as the listener closed: the next try is refused
    return False


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """A connected pair of TCP sockets over loopback."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname(), timeout=5.0)
        server, _ = listener.accept()
    server.settimeout(5.0)
    return server, client


def fd_count(pid: int | None = None) -> int:
    """Open sockets of a process (this one by default), from /proc.  Only sockets: libkqueue
    opens and closes its own internal fds lazily, from a thread of its own."""
    fd_dir = f"/proc/{pid or os.getpid()}/fd"
    count = 0
    for name in os.listdir(fd_dir):
        try:
            count += os.readlink(f"{fd_dir}/{name}").startswith("socket:")
        except FileNotFoundError:
            pass  # closed while we looked
    return count


# -- in-process kqfast.Server clients ----------------------------------------------------------

def server_family(address) -> int:
    """The socket family of a kqfast.Server address: a Unix path, an IPv6 or an IPv4 pair."""
    if isinstance(address, str):
        return socket.AF_UNIX
    return socket.AF_INET6 if ":" in address[0] else socket.AF_INET


def connect_to(address, timeout: float = 5.0, rcvbuf: int | None = None,
               retry: float = 0.0) -> socket.socket:
    """A client socket connected to a kqfast.Server address (TCP v4/v6 or Unix path).
    rcvbuf (set before connecting) caps what the client's kernel buffers for a client
    that does not read; retry keeps trying that long while nothing listens yet."""
    if not isinstance(address, (str, tuple)):
        address = address.address  # a kqfast.Server
    family = server_family(address)
    deadline = time.monotonic() + retry
    while True:
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        try:
            sock.connect(address)
            return sock
        except (ConnectionRefusedError, FileNotFoundError):
            sock.close()
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.01)


def reset_close(sock: socket.socket) -> None:
    """Closes with SO_LINGER (1, 0): the peer gets a reset (RST), not a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def wait_until(predicate, timeout: float = 5.0) -> bool:
    """Polls predicate() until it is true or timeout passes; returns its last value."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            return bool(predicate())
        time.sleep(0.002)
    return True


def process_cpu_seconds() -> float:
    """CPU time (user + system) this process has used so far, all threads together."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# -- reliability suite helpers (tests/test_reliability.py, tests/test_fuzz.py) -----------------

LONG_TESTS = os.environ.get("KQFAST_LONG_TESTS") == "1"


def scaled(short, long):
    """The short (default) or long (KQFAST_LONG_TESTS=1) value of a test parameter."""
    return long if LONG_TESTS else short


def cpu_seconds(pid: int | None = None) -> float:
    """CPU time (user + system) a whole process has used (this one by default)."""
    import psutil
    times = psutil.Process(pid or os.getpid()).cpu_times()
    return times.user + times.system


def rss_bytes(pid: int | None = None) -> int:
    """Resident memory of a process (this one by default)."""
    import psutil
    return psutil.Process(pid or os.getpid()).memory_info().rss


class LineReader:
    """Reads a child's text stream line by line in a thread, so a test can wait for a line
    with a timeout instead of blocking forever on a hung child."""

    def __init__(self, stream):
        import queue
        self.lines: queue.Queue = queue.Queue()
        self.seen: list[str] = []
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream) -> None:
        for line in stream:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def expect(self, prefix: str, timeout: float = 5.0) -> str:
        """The next line starting with prefix (other lines are kept in seen); fails on EOF or
        timeout."""
        import queue
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no line starting with {prefix!r} within {timeout} s; "
                                     f"saw {self.seen[-5:]!r}") from None
            if line is None:
                raise AssertionError(f"stream ended before a line starting with {prefix!r}; "
                                     f"saw {self.seen[-5:]!r}")
            self.seen.append(line)
            if line.startswith(prefix):
                return line


def start_child(code: str) -> tuple[subprocess.Popen, LineReader, list[str]]:
    """start_python(code), then a LineReader on the child's stdout; returns (process, reader,
    the READY line's words after the first)."""
    proc, words = start_python(code)
    return proc, LineReader(proc.stdout), words


def socket_fds(pid: int | None = None) -> dict[int, str]:
    """{fd: "socket:[inode]"} for the sockets a process has open."""
    base = f"/proc/{pid or os.getpid()}/fd"
    found = {}
    for name in os.listdir(base):
        try:
            link = os.readlink(f"{base}/{name}")
        except FileNotFoundError:
            continue
        if link.startswith("socket:"):
            found[int(name)] = link
    return found


def fds_sharing(sock: socket.socket) -> list[int]:
    """The other fds of this process that name the same socket as sock (e.g. the server-side
    fd behind a dup from get_extra_info("socket"))."""
    link = os.readlink(f"/proc/self/fd/{sock.fileno()}")
    return sorted(fd for fd, other in socket_fds().items()
                  if other == link and fd != sock.fileno())


def fd_flags(fd: int, pid: int | None = None) -> int:
    """The open-file flags of a process's fd, from /proc/<pid>/fdinfo (octal "flags:")."""
    with open(f"/proc/{pid or os.getpid()}/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith("flags:"):
                return int(line.split()[1], 8)
    raise AssertionError(f"no flags for fd {fd}")


def tcp_sockets(port: int) -> list[tuple[str, int, str]]:
    """(local address, local port, state) of the IPv4 TCP sockets whose local port is port,
    from /proc/net/tcp; state is the kernel's hex code ("0A" LISTEN, "06" TIME_WAIT)."""
    found = []
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split()
            addr, port_hex = fields[1].split(":")
            if int(port_hex, 16) == port:
                ip = socket.inet_ntoa(struct.pack("<I", int(addr, 16)))
                found.append((ip, port, fields[3]))
    return found


def percentile(values, fraction: float) -> float:
    """The fraction-th percentile (0..1) of values, nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def server_fd(transport) -> int:
    """The fd number of a kqfast transport's connection."""
    return transport.get_extra_info("socket").fileno()


def open_fds(pid: int | None = None) -> set[tuple[int, str]]:
    """(fd, what it names) for every open fd of a process, from /proc; fds of /proc itself
    (this listing's own) left out."""
    fd_dir = f"/proc/{pid or os.getpid()}/fd"
    found = set()
    for name in os.listdir(fd_dir):
        try:
            link = os.readlink(f"{fd_dir}/{name}")
        except FileNotFoundError:
            continue  # closed while we looked
        if not link.startswith("/proc/"):
            found.add((int(name), link))
    return found


def new_fds(before: set[tuple[int, str]], pid: int | None = None) -> set[tuple[int, str]]:
    """The fds open now that were not in the snapshot before (an fd closed meanwhile by
    someone else does not hide a leak, as with counts).  On the kqueue backend libkqueue's
    own anonymous fds, opened and closed lazily from its own thread, are left out."""
    import kqfast
    fresh = open_fds(pid) - before
    if kqfast.BACKEND == "kqueue":
        fresh = {(fd, link) for fd, link in fresh if not link.startswith("anon_inode:")}
    return fresh


def on_loop(server, fn, *args):
    """Runs fn(*args) on the server's loop thread; returns its result or raises its error."""
    result: queue.Queue = queue.Queue()

    def call():
        try:
            result.put((True, fn(*args)))
        except BaseException as exc:  # handed to the test thread
            result.put((False, exc))

    server.call_soon_threadsafe(call)
    ok, value = result.get(timeout=5)
    if not ok:
        raise value
    return value


def serve_forever_in_thread(server) -> tuple[threading.Thread, list[BaseException]]:
    """Runs server.serve_forever() in a new thread; returns the thread and a list that gets
    what serve_forever() raised."""
    raised: list[BaseException] = []

    def run() -> None:
        try:
            server.serve_forever()
        except BaseException as exc:
            raised.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, raised


def memory_bio_client(context: ssl.SSLContext, address) -> tuple[
        socket.socket, ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO]:
    """A client that does TLS by hand over a blocking socket, verifying the server as
    localhost: (sock, sslobj, incoming, outgoing), handshake done."""
    sock = socket.create_connection(address, timeout=10)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    sslobj = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    while True:
        try:
            sslobj.do_handshake()
            break
        except ssl.SSLWantReadError:
            sock.sendall(outgoing.read())
            incoming.write(sock.recv(65536))
    sock.sendall(outgoing.read())
    return sock, sslobj, incoming, outgoing
