"""Pre-forked server processes: the way to use N cores with Python handlers, whose callbacks
one process's GIL serialises.  Each child builds its own server (and so its own poller) after
fork; the kernel spreads connections over their SO_REUSEPORT listeners.  Also the checks
kqfast-echo makes before it shares a port that way."""
from __future__ import annotations

import collections
import os
import signal
import socket
import threading
import time
from typing import Callable

from kqfast._addresses import bind_each, bound_socket, check_port_free, resolve

STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}

# More replacements than RESTART_BURST within RESTART_WINDOW seconds: the children are dying
# in a loop (a bug, a resource gone), and forking more would only spin.
RESTART_BURST = 5
RESTART_WINDOW = 10.0

def reserve_port(host: str | None, port: int) -> list[socket.socket]:
    """Checks that no other server holds the port on any of host's addresses, then binds
    each (port 0: one free port for all) with SO_REUSEPORT but never listens on them: the
    children can share them, no connection is ever queued on these sockets, and a port in
    use is found once, here, rather than in every child."""
    addresses = resolve(host, port)
    check_port_free(addresses, port)
    return bind_each(addresses, port, lambda address, p: bound_socket(address, p, share=True))


class ProcessGroup:
    """N forked children, each running serve_child(ready) -> exit status; ready() says that
    the child listens.  The caller's SIGINT/SIGTERM handlers call stop(); a child has the
    default ones until serve_child installs its own, and stops (SIGTERM) when the parent is
    gone, even SIGKILLed.  A child that dies while the group serves is logged and replaced,
    up to RESTART_BURST times in RESTART_WINDOW seconds; one more death, and the group
    stops."""

    def __init__(self, processes: int, serve_child: Callable[[Callable[[], None]], int],
                 log: Callable[[str], None]):
        self.processes = processes
        self.serve_child = serve_child
        self.log = log
        self.pids: set[int] = set()
        self.stopping = False
        self.failure: str | None = None  # why the group failed, for its last line
        self._restarts: collections.deque[float] = collections.deque(maxlen=RESTART_BURST)
        # Only the parent keeps the write end: a child reads EOF once the parent is gone.
        self._parent_alive_r, self._parent_alive_w = os.pipe()

    def start(self) -> bool:
        """Forks the children; returns True once every one listens, False when the group
        stopped first (stop(), or a child that died before it was ready)."""
        pending: list[tuple[int, int]] = []  # (read end of a child's ready pipe, its pid)
        for _ in range(self.processes):
            ready_r, ready_w = os.pipe()
            inherited = [fd for fd, _ in pending] + [ready_r]
            pid = self._fork(_ready_reporter(ready_w), inherited)
            os.close(ready_w)  # the child's is now the only write end: EOF means it is gone
            pending.append((ready_r, pid))
        for ready_r, pid in pending:
            if not self.stopping and not os.read(ready_r, 1):
                self._lost_before_ready(pid)
            os.close(ready_r)
        return not self.stopping

    def _lost_before_ready(self, pid: int) -> None:
        if self.stopping:
            return  # stop() ended it: supervise() collects it with the others
        _, status = os.waitpid(pid, 0)
        self.pids.discard(pid)
        self.failure = f"process {pid} {_how_it_ended(status)} before it was ready"
        self.stop()

    def supervise(self) -> int:
        """Waits for the children until the group has stopped, replacing those that die while
        it serves; returns 0 when it stopped on request and every child ended cleanly, else 1
        (self.failure says why)."""
        while self.pids:
            pid, status = os.wait()
            if pid not in self.pids:
                continue
            self.pids.remove(pid)
            if not self.stopping:
                self._replace(pid, status)
            elif not _stopped_cleanly(status) and self.failure is None:
                self.failure = f"process {pid} {_how_it_ended(status)} while stopping"
        os.close(self._parent_alive_r)
        os.close(self._parent_alive_w)
        return 0 if self.failure is None else 1

    def _replace(self, pid: int, status: int) -> None:
        now = time.monotonic()
        if len(self._restarts) == RESTART_BURST and now - self._restarts[0] < RESTART_WINDOW:
            self.failure = (f"process {pid} {_how_it_ended(status)}: {RESTART_BURST + 1} "
                            f"children died within {RESTART_WINDOW:g} s; stopping")
            self.stop()
            return
        self._restarts.append(now)
        # Nothing waits for a replacement's readiness: its siblings serve meanwhile.
        new_pid = self._fork(lambda: None, [])
        self.log(f"process {pid} {_how_it_ended(status)}; replaced by process {new_pid}")

    def stop(self) -> None:
        """Asks every child for a graceful stop (SIGTERM); idempotent, and safe to call from a
        signal handler."""
        self.stopping = True
        for pid in self.pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def _fork(self, ready: Callable[[], None], inherited: list[int]) -> int:
        """Forks a child running serve_child(ready), which first closes the inherited fds."""
        # Blocked until the child has its own handlers: the parent's, run in a child, would
        # signal its siblings.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            pid = os.fork()
            if pid == 0:
                self._child(ready, inherited)
            self.pids.add(pid)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        if self.stopping:
            os.kill(pid, signal.SIGTERM)  # a stop() came before this child was in self.pids
        return pid

    def _child(self, ready: Callable[[], None], inherited: list[int]) -> None:
        code = 1
        try:
            for signum in STOP_SIGNALS:
                signal.signal(signum, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
            for fd in [self._parent_alive_w, *inherited]:
                os.close(fd)
            _stop_when_parent_is_gone(self._parent_alive_r)
            code = self.serve_child(ready)
        finally:
            os._exit(code)  # never return into the parent's code


def _how_it_ended(status: int) -> str:
    """How a child ended, from its wait status: "exited with status 1", "killed by SIGKILL"."""
    code = os.waitstatus_to_exitcode(status)
    if code >= 0:
        return f"exited with status {code}"
    try:
        return f"killed by {signal.Signals(-code).name}"
    except ValueError:
        return f"killed by signal {-code}"


def _ready_reporter(ready_w: int) -> Callable[[], None]:
    def report_ready() -> None:
        os.write(ready_w, b".")
        os.close(ready_w)
    return report_ready


def _stopped_cleanly(status: int) -> bool:
    """Exited 0, or killed by a stop signal before it had handlers of its own."""
    code = os.waitstatus_to_exitcode(status)
    return code == 0 or -code in STOP_SIGNALS


def _stop_when_parent_is_gone(parent_alive_r: int) -> None:
    """In a child: a thread that stops it gracefully (SIGTERM) at EOF on the parent's pipe,
    so that no child serves on, unsupervised, after the parent died."""
    def watch() -> None:
        os.read(parent_alive_r, 1)
        os.kill(os.getpid(), signal.SIGTERM)
    threading.Thread(target=watch, name="kqfast-parent-watch", daemon=True).start()
