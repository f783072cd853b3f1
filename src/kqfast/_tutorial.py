"""The tutorial's level (seed/kqueue-tcp-server-tutorial.md), made correct: listen() and its
EventLoop, a poller over one listening Socket with non-blocking client sockets, readiness for
data and EOF alike, errors contained, Ctrl-C and a thread-safe stop().  This EventLoop is not
an asyncio event loop: that is kqfast.Loop (kqfast.new_event_loop())."""
from __future__ import annotations

import errno
import logging
import signal
import socket
import threading
import time

from typing import Any, Callable

from kqfast import _arguments
from kqfast._addresses import resolve
from kqfast._core import READABLE, Poller, Socket, _listen_fd

_ACCEPT_BACKOFF = 0.1  # seconds accepting rests at the fd limit

# What EventLoop() and EventLoop(wrong) say: its name reads like asyncio's event loop, and
# the asyncio loop is what a caller without a listening Socket most likely wanted.
_NOT_ASYNCIO = ("kqfast.EventLoop is the tutorial's poller over a listening kqfast.Socket: "
                "kqfast.EventLoop(kqfast.listen(host, port)).  For an asyncio event loop use "
                "kqfast.Loop() or kqfast.new_event_loop(), or kqfast.run(main())")
_NO_SOCKET: Any = object()  # EventLoop()'s sock when none is given: refused with _NOT_ASYNCIO


def listen(host: str = "127.0.0.1", port: int = 8080, backlog: int = 1024, *,
           reuse_port: bool = False) -> Socket:
    """A non-blocking listening Socket on host and port: an IPv4 or IPv6 address, a name (its
    first address), or a Unix socket path (a host containing "/"; port is then unused).
    Raises OSError naming the address when it cannot be resolved or bound."""
    name = _arguments.host(host)
    assert name is not None
    port = _arguments.port(port)
    backlog = _arguments.integer("backlog", backlog, 0, _arguments.MAX_COUNT)
    reuse_port = _arguments.flag("reuse_port", reuse_port)
    if "/" not in name:
        name = resolve(name, port)[0].host  # a name that does not resolve says so
    fd, _ = _listen_fd(name, port, backlog, reuse_port)
    return Socket(fd)


class EventLoop:
    """The tutorial's event loop: a poller over one listening kqfast.Socket that calls
    handler(conn) whenever one of its clients is readable.  Not an asyncio event loop (that
    is kqfast.Loop).

        loop = kqfast.EventLoop(kqfast.listen("127.0.0.1", 8080))
        loop.handle(handler)   # blocks; loop.stop() from another thread ends it
    """

    def __init__(self, sock: Socket = _NO_SOCKET) -> None:
        if sock is _NO_SOCKET:
            raise TypeError(f"EventLoop() needs the listening socket.  {_NOT_ASYNCIO}")
        if not isinstance(sock, Socket):
            raise TypeError(f"sock must be a kqfast.Socket from kqfast.listen(), not "
                            f"{sock!r}.  {_NOT_ASYNCIO}")
        self._sock = sock
        self._poller = Poller()
        self._poller.set(sock.fileno(), 0, READABLE)
        self._clients: dict[int, Socket] = {}
        self._stopping = False
        self._resume_accepting_at: float | None = None

    def handle(self, handler: Callable[[Socket], object]) -> None:
        """Blocks until stop(), calling handler(conn) whenever a client Socket is readable.
        conn.read(n) returns what is there and b"" at EOF; a client the handler leaves open
        after EOF is closed for it (or it would stay readable).  A stop() that came first
        (racing the thread that calls this) ends it at once."""
        _arguments.function("handler", handler)
        wakeup = self._watch_signals()
        try:
            while not self._stopping:
                for fd, _mask, _err in self._poller.wait(self._accept_pause_left()):
                    if fd == self._sock.fileno():
                        self._accept()
                    elif wakeup is not None and fd == wakeup[0].fileno():
                        wakeup[0].recv(4096)  # Python runs the signal handlers on return
                    elif fd in self._clients:
                        self._serve(handler, self._clients[fd])
        finally:
            self._stopping = False
            if wakeup is not None:
                self._unwatch_signals(wakeup)
            for conn in list(self._clients.values()):
                conn.close()

    def stop(self) -> None:
        """Thread-safe: handle() returns soon."""
        self._stopping = True
        self._poller.wake()

    def _accept(self) -> None:
        while True:
            try:
                conn = self._sock.accept()
            except OSError as exc:
                if exc.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    raise
                # Out of fds: the listener stays readable, and a level-triggered loop would
                # spin on it.  New clients wait in the backlog until fds are free again.
                self._poller.set(self._sock.fileno(), READABLE, 0)
                self._resume_accepting_at = time.monotonic() + _ACCEPT_BACKOFF
                return
            if conn is None:
                return
            conn._owner = self
            self._clients[conn.fileno()] = conn
            self._poller.set(conn.fileno(), 0, READABLE)

    def _accept_pause_left(self) -> float | None:
        """The wait's timeout: None, or what is left of a pause at the fd limit (after which
        accepting resumes)."""
        if self._resume_accepting_at is None:
            return None
        left = self._resume_accepting_at - time.monotonic()
        if left > 0:
            return left
        self._resume_accepting_at = None
        self._poller.set(self._sock.fileno(), 0, READABLE)
        return 0

    def _serve(self, handler, conn: Socket) -> None:
        try:
            handler(conn)
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception:
            logging.getLogger("kqfast").exception("kqfast: handler failed; closing %s", conn)
            conn.close()
        if conn.at_eof:
            conn.close()

    def _forget(self, conn: Socket) -> None:
        # Deregister before close: epoll would otherwise report a dup()ed description.
        self._poller.set(conn.fileno(), READABLE, 0)
        self._clients.pop(conn.fileno(), None)

    def _watch_signals(self):
        """Python's signal wakeup fd joins the poll set (main thread only), so Ctrl-C ends a
        wait that the signal did not interrupt."""
        if threading.current_thread() is not threading.main_thread():
            return None
        rsock, wsock = socket.socketpair()
        rsock.setblocking(False)
        wsock.setblocking(False)
        old = signal.set_wakeup_fd(wsock.fileno(), warn_on_full_buffer=False)
        self._poller.set(rsock.fileno(), 0, READABLE)
        return rsock, wsock, old

    def _unwatch_signals(self, wakeup) -> None:
        rsock, wsock, old = wakeup
        signal.set_wakeup_fd(old)
        self._poller.set(rsock.fileno(), READABLE, 0)
        rsock.close()
        wsock.close()
