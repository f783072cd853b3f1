"""Helpers for the tests: kqfast-echo in a subprocess, reading sockets, counting fds."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass

READY = re.compile(r"listening on (\[(?P<v6>[^\]]+)\]|(?P<v4>[^\s:]+)):(?P<port>\d+) ")


@dataclass
class EchoProcess:
    """A running kqfast-echo: its process, the ready line and the address it bound."""
    proc: subprocess.Popen
    ready_line: str
    host: str
    port: int

    def connect(self, timeout: float = 5.0) -> socket.socket:
        """A client socket connected to the server."""
        return socket.create_connection((self.host, self.port), timeout=timeout)

    def stop(self, sig=signal.SIGTERM, timeout: float = 10.0) -> tuple[int, str]:
        """Sends sig and returns (exit code, rest of stderr)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        _, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, err


def start_echo(*args: str, env: dict | None = None) -> EchoProcess:
    """Starts kqfast-echo on a free port and waits for its ready line on stderr."""
    cmd = [sys.executable, "-m", "kqfast.cli", "--port", "0", *args]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    line = proc.stderr.readline()
    match = READY.search(line)
    if match is None:
        proc.kill()
        _, err = proc.communicate()
        raise AssertionError(f"no ready line from kqfast-echo: {line!r} {err!r}")
    host = match.group("v6") or match.group("v4")
    return EchoProcess(proc, line, host, int(match.group("port")))


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


def fd_count(pid: int | None = None) -> int:
    """Open fds of a process (this one by default), from /proc."""
    return len(os.listdir(f"/proc/{pid or os.getpid()}/fd"))
