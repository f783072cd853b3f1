"""The programs in examples/ do what their docstrings say: each runs in a subprocess on a free
port, is talked to over loopback, and exits 0 on Ctrl-C."""
from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
READY = re.compile(r"listening on (?P<host>[^\s:]+):(?P<port>\d+)")

pytestmark = pytest.mark.skipif(not EXAMPLES.is_dir(), reason="no examples/ beside tests/")


def _default_sigint() -> None:
    # A shell that starts jobs in the background ignores SIGINT in them, and Python then
    # installs no KeyboardInterrupt handler: give the example the usual Ctrl-C.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Example:
    """One example program, serving on a free port."""

    def __init__(self, script: str, *args: str):
        self.proc = subprocess.Popen(
            [sys.executable, str(EXAMPLES / script), *args, "--port", "0"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, preexec_fn=_default_sigint)
        line = self.proc.stderr.readline()
        match = READY.search(line)
        if match is None:
            self.proc.kill()
            _, rest = self.proc.communicate()
            pytest.fail(f"{script} did not start: {line}{rest}")
        self.address = (match["host"], int(match["port"]))
        self.ready_line = line

    def connect(self) -> socket.socket:
        return socket.create_connection(self.address, timeout=10)

    def interrupt(self) -> int:
        """Ctrl-C; returns the exit code."""
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()
            pytest.fail("the example did not stop on SIGINT")
        return self.proc.returncode


@pytest.fixture
def example():
    """Starts examples by script name; kills any still running at the end."""
    started: list[Example] = []

    def start(script: str, *args: str) -> Example:
        started.append(Example(script, *args))
        return started[-1]

    yield start
    for ex in started:
        if ex.proc.poll() is None:
            ex.proc.kill()
            ex.proc.communicate()


def read_until(sock: socket.socket, wanted: bytes, timeout: float = 10.0) -> bytes:
    """Reads until wanted has arrived (or the peer closes, or timeout); returns all read."""
    got = b""
    deadline = time.monotonic() + timeout
    while wanted not in got and time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            break
        if not chunk:
            break
        got += chunk
    return got


def read_to_eof(sock: socket.socket, timeout: float = 10.0) -> bytes:
    return read_until(sock, b"\0never\0", timeout)


def last_line_at_eof(server: Example, line: bytes) -> bytes:
    """Sends a line without its newline, then EOF; returns all the server sent back."""
    with server.connect() as sock:
        sock.sendall(line)
        sock.shutdown(socket.SHUT_WR)
        return read_to_eof(sock)


@pytest.mark.parametrize("args", [(), ("--python",)], ids=["native", "python"])
def test_echo(example, args):
    """Native and --python alike: lines echoed, a blank line closes (after what is owed), a
    last line without a newline is echoed at EOF."""
    server = example("echo.py", *args)
    with server.connect() as sock:
        sock.sendall(b"hello\nworld\n")
        assert read_until(sock, b"world\n") == b"hello\nworld\n"
        sock.sendall(b"last\n\nnever\n")
        assert read_to_eof(sock) == b"last\n"
    assert last_line_at_eof(server, b"partial") == b"partial"
    assert server.interrupt() == 0


def test_chat_broadcasts_every_line_to_every_client(example):
    server = example("chat.py")
    with server.connect() as alice:
        assert b"* you are user1\n" in read_until(alice, b"joined\n")
        with server.connect() as bob:
            assert b"* user2 joined\n" in read_until(alice, b"user2 joined\n")
            read_until(bob, b"user2 joined\n")
            alice.sendall(b"hi bob\r\n")
            assert b"user1: hi bob\n" in read_until(bob, b"user1: hi bob\n")
            assert b"user1: hi bob\n" in read_until(alice, b"user1: hi bob\n")
            bob.sendall(b"\n")  # blank lines are not sent on
            bob.sendall(b"hello alice\n")
            assert read_until(alice, b"alice\n") == b"user2: hello alice\n"
        assert b"* user2 left\n" in read_until(alice, b"left\n")
    assert server.interrupt() == 0


@pytest.mark.parametrize("loop", ["asyncio", "kqfast"])
def test_asyncio_port_runs_the_same_program_on_both_loops(example, loop):
    """The same asyncio program through asyncio.run and kqfast.run: the loop that serves is
    the one asked for, and it behaves the same."""
    server = example("asyncio_port.py", loop)
    assert server.ready_line.rstrip().endswith(f"(loop={loop})")
    with server.connect() as sock:
        sock.sendall(b"one\ntwo\n")
        assert read_until(sock, b"TWO\n") == b"ONE\nTWO\n"
        sock.sendall(b"quit\n")
        assert read_to_eof(sock) == b""
    assert last_line_at_eof(server, b"partial") == b"PARTIAL"
    assert server.interrupt() == 0
