"""Pre-forked server processes: the way to use N cores with Python handlers, whose callbacks
one process's GIL serialises.  Each child builds its own server (and so its own poller) after
fork; the kernel spreads connections over their SO_REUSEPORT listeners."""
from __future__ import annotations

import os
import signal
import socket
from typing import Callable


def reserve_port(host: str, port: int) -> tuple[socket.socket, int]:
    """Binds the port (0: a free one) with SO_REUSEPORT but never listens on it: the children
    can share it, no connection is ever queued on this socket, and a port already in use is
    found once, here, rather than in every child."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    holder = socket.socket(family, socket.SOCK_STREAM)
    try:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        holder.bind((host, port))
    except OSError as exc:
        holder.close()
        raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror}") from None
    return holder, holder.getsockname()[1]


class ProcessGroup:
    """N forked children, each running serve_child(ready) -> exit status; ready() says that
    the child listens."""

    def __init__(self, processes: int, serve_child: Callable[[Callable[[], None]], int]):
        self.processes = processes
        self.serve_child = serve_child
        self.pids: list[int] = []

    def start(self) -> bool:
        """Forks the children and returns once all are ready (True) or one failed (False)."""
        ready_r, ready_w = os.pipe()

        def report_ready() -> None:
            os.write(ready_w, b".")

        self.forward_signals()
        for _ in range(self.processes):
            pid = os.fork()
            if pid == 0:
                os.close(ready_r)
                self._child(report_ready)
            self.pids.append(pid)
        os.close(ready_w)
        ready = 0
        # EOF before every child said ready: all write ends closed, so one of them died.
        while ready < self.processes and (got := os.read(ready_r, self.processes)):
            ready += len(got)
        os.close(ready_r)
        return ready == self.processes

    def _child(self, ready: Callable[[], None]) -> None:
        code = 1
        try:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            code = self.serve_child(ready)
        finally:
            os._exit(code)  # never return into the parent's code

    def terminate(self) -> None:
        """Asks every child for a graceful stop (SIGTERM)."""
        for pid in self.pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def forward_signals(self) -> None:
        """From now on SIGINT/SIGTERM to this process stop the children gracefully."""
        forward = lambda signum, frame: self.terminate()  # noqa: E731
        signal.signal(signal.SIGINT, forward)
        signal.signal(signal.SIGTERM, forward)

    def wait(self) -> int:
        """Waits for every child; returns 0 when they all exited 0, else 1."""
        status = 0
        for pid in self.pids:
            _, code = os.waitpid(pid, 0)
            if os.waitstatus_to_exitcode(code) != 0:
                status = 1
        return status
