"""kqfast.Server: listeners, loops and their threads, behind asyncio-like lifecycle calls.

Native handlers run on bare Reactors (the nogil cycle never leaves C); a protocol factory's
streams run on kqfast.Loop, one per worker, so protocols have a running asyncio loop."""
from __future__ import annotations

import asyncio
import logging
import math
import os
import resource
import socket
import stat
import sys
import threading

from kqfast._core import ECHO, LINE_ECHO, Reactor, Source, _listen_fd
from kqfast.addresses import check_port_free, resolve
from kqfast.loop import Loop

_log = logging.getLogger("kqfast")

# fds kept back from max_connections for listeners, the poller, the reserve fd and the rest
# of the process.
_FD_HEADROOM = 32


def default_balance(host: str) -> str:
    """Linux and FreeBSD (SO_REUSEPORT_LB) spread TCP connections over SO_REUSEPORT
    listeners; elsewhere (macOS), and for a Unix socket path that only one listener can
    hold, one loop accepts and hands connections to the others."""
    if "/" in host or not sys.platform.startswith(("linux", "freebsd")):
        return "handoff"
    return "reuseport"


def default_max_connections() -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    return max(1, soft - _FD_HEADROOM)


def _seconds(name: str, value, allow_none: bool = False) -> float:
    if value is None and allow_none:
        return 0.0
    if not isinstance(value, (int, float)) or math.isnan(value) or value < 0:
        raise ValueError(f"{name} must be a number of seconds >= 0, not {value!r}")
    return float(value)


class Server:
    """A TCP (or Unix socket) server.  handler is kqfast.ECHO or kqfast.LINE_ECHO (native,
    never take the GIL) or a protocol factory: anything returning an asyncio.Protocol-like
    object.  The socket is bound here, so `address` is known before serving."""

    def __init__(self, handler, host: str = "127.0.0.1", port: int = 8080, *, workers: int = 1,
                 backlog: int = 1024, max_connections: int | None = None,
                 idle_timeout: float | None = 60.0, max_line: int = 65536,
                 high_water: int = 65536, low_water: int = 16384, reuse_port: bool = False,
                 max_output: int = 16 * 1024 * 1024, linger_timeout: float = 2.0,
                 balance: str | None = None):
        native = handler is ECHO or handler is LINE_ECHO
        if not native and not callable(handler):
            raise TypeError(f"handler must be kqfast.ECHO, kqfast.LINE_ECHO or a protocol "
                            f"factory, not {handler!r}")
        balance = balance or default_balance(host)
        if balance not in ("reuseport", "handoff"):
            raise ValueError(f"balance must be 'reuseport' or 'handoff', not {balance!r}")
        if workers < 1:
            raise ValueError(f"workers must be at least 1, not {workers}")
        if max_line < 1:
            raise ValueError(f"max_line must be at least 1, not {max_line}")
        if not high_water >= low_water >= 0:
            raise ValueError("high_water must be >= low_water >= 0")
        if max_output < high_water:
            raise ValueError("max_output must be >= high_water")
        if max_connections is None:
            max_connections = default_max_connections()
        if max_connections < 1:
            raise ValueError(f"max_connections must be at least 1, not {max_connections}")
        limits = dict(max_line=max_line, high_water=high_water, low_water=low_water,
                      max_output=max_output,
                      idle_timeout=_seconds("idle_timeout", idle_timeout, allow_none=True),
                      linger_timeout=_seconds("linger_timeout", linger_timeout),
                      max_connections=max_connections)
        self._native = native
        self._reactors: list[Reactor] = []
        self._loops: list[Loop] = []
        self._threads: list[threading.Thread] = []
        self._handler_errors = 0
        self._failure: BaseException | None = None
        self._started = self._stopped = False
        self._serving: set[int] = set()   # idents of the threads running a loop now
        self._unix_path = host if "/" in host else None
        self._unix_inode: int | None = None
        # With "reuseport" each loop owns a listener on the shared port and the kernel spreads
        # new connections; with "handoff" the first loop owns the only listener.
        per_loop_listener = balance == "reuseport"
        share_port = reuse_port or (workers > 1 and per_loop_listener)
        factory = None if native else handler
        if self._unix_path is None:
            resolve(host, port)  # a name that does not resolve says so
            if share_port and not reuse_port:
                # The loops' SO_REUSEPORT listeners would join another server's on this port.
                check_port_free(host, port)
        try:
            for i in range(workers):
                reactor = self._new_reactor(handler, limits)
                if i == 0 or per_loop_listener:
                    sock = self._listen(host, port, backlog, share_port)
                    if port == 0:
                        port = sock.getsockname()[1]
                    reactor.add_listener(sock, Source(sock, factory, None, True))
                    if i == 0:
                        self.address = _address_of(sock)
                else:
                    reactor.open_inbox(Source(None, factory, None, True))
            if workers > 1 and not per_loop_listener:
                self._reactors[0].hand_off_to(self._reactors)
        except BaseException:
            self._release()
            raise

    def _new_reactor(self, handler, limits) -> Reactor:
        if self._native:
            reactor = Reactor()
        else:
            loop = Loop()
            loop.set_exception_handler(self._report)
            self._loops.append(loop)
            reactor = loop._reactor
        reactor.configure(handler, **limits)
        self._reactors.append(reactor)
        return reactor

    def _listen(self, host: str, port: int, backlog: int, share_port: bool) -> socket.socket:
        if self._unix_path is not None:
            _remove_stale_socket(self._unix_path)
        fd, family = _listen_fd(host, port, backlog, share_port)
        if self._unix_path is not None:
            self._unix_inode = os.stat(self._unix_path).st_ino
        return socket.socket(family, socket.SOCK_STREAM, 0, fileno=fd)

    # ---- serving ---------------------------------------------------------------------

    def serve_forever(self) -> None:
        """Serves in this thread (and one more thread per extra worker) until stop().
        Ctrl-C stops cleanly, then raises KeyboardInterrupt; so does a handler's
        KeyboardInterrupt or SystemExit, on any loop.  After stop() it returns at once."""
        if self._stopped:
            return
        # This thread serves from now on: a stop() from its signal handlers only asks.
        self._serving.add(threading.get_ident())
        try:
            self._check_not_started()
        except RuntimeError:
            self._serving.discard(threading.get_ident())
            raise
        if self._stopped:
            # A signal handler's stop() ran before the server counted as started, and
            # released everything: nothing is left to serve.
            self._serving.discard(threading.get_ident())
            return
        try:
            self._spawn(range(1, len(self._reactors)))
            self._serve(0)
        finally:
            self._serving.discard(threading.get_ident())
            self._stop_loops(0.0)
            for thread in self._threads:
                thread.join()
            self._release()
        if self._failure is not None:
            raise self._failure

    def start(self) -> "Server":
        """Serves from background threads; returns at once, already listening (after stop(),
        it serves nothing)."""
        if self._stopped:
            return self
        self._check_not_started()
        self._spawn(range(len(self._reactors)))
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Thread-safe and idempotent: stop accepting, let pending output flush for up to
        timeout seconds, then close.  From a loop's own thread (a callback, a signal
        handler) it only asks; elsewhere it also waits for the loops to finish."""
        timeout = _seconds("timeout", timeout)
        if not self._started:
            self._stopped = True  # so serve_forever(), should it come, returns at once
            self._release()
            return
        self._stop_loops(timeout)
        if threading.get_ident() in self._serving:
            return  # joining here would stall this loop while the others drain
        for thread in self._threads:
            thread.join()
        self._release()

    def call_soon_threadsafe(self, callback, *args) -> None:
        """Runs callback(*args) on the (first) loop's thread."""
        if self._native:
            self._reactors[0].call_soon_threadsafe(callback, *args)
        else:
            self._loops[0].call_soon_threadsafe(callback, *args)

    def stats(self) -> dict:
        """Counters summed over the loops, and each loop's own under "loops"."""
        per_loop = [reactor.stats() for reactor in self._reactors]
        total = {key: sum(s[key] for s in per_loop) for key in per_loop[0]}
        total["handler_errors"] = self._handler_errors
        total["errors"] += self._handler_errors
        total["loops"] = per_loop
        return total

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    # ---- the loops' threads ----------------------------------------------------------

    def _check_not_started(self) -> None:
        if self._started:
            raise RuntimeError("this server is already serving (or has served)")
        self._started = True

    def _spawn(self, indices) -> None:
        for i in indices:
            thread = threading.Thread(target=self._serve_in_thread, args=(i,),
                                      name=f"kqfast-loop-{i}", daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve_in_thread(self, i: int) -> None:
        try:
            self._serve(i)
        except BaseException as exc:
            # A dead loop must not go unnoticed: the server stops, and serve_forever()
            # re-raises what stopped it (start() callers find it logged).
            if self._failure is None:
                self._failure = exc
            _log.error("kqfast: loop %d stopped on %r; stopping the server", i, exc,
                       exc_info=not isinstance(exc, (KeyboardInterrupt, SystemExit)))
            self._stop_loops(0.0)

    def _serve(self, i: int) -> None:
        ident = threading.get_ident()
        self._serving.add(ident)
        try:
            if self._native:
                self._reactors[i].run()
            else:
                self._serve_loop(self._loops[i])
        finally:
            self._serving.discard(ident)

    @staticmethod
    def _serve_loop(loop: Loop) -> None:
        try:
            loop.run_forever()
        finally:
            _finish(loop)

    def _stop_loops(self, timeout: float) -> None:
        """Thread-safe: every loop stops accepting, flushes for up to timeout, stops."""
        if self._native:
            for reactor in self._reactors:
                reactor.request_stop(timeout)
            return
        for loop in self._loops:
            try:
                loop.call_soon_threadsafe(self._begin_stop, loop, timeout)
            except RuntimeError:
                pass  # that loop is closed already

    def _begin_stop(self, loop: Loop, timeout: float) -> None:
        """On loop's thread: stop accepting, close the streams gracefully, and stop the loop
        once they are all gone or timeout has passed."""
        reactor = loop._reactor
        if reactor.stop_serving():
            reactor.close_streams()
            reactor.when_drained(loop.stop)
            loop.call_later(timeout, self._force_stop, loop)

    @staticmethod
    def _force_stop(loop: Loop) -> None:
        loop._reactor.abort_streams(ConnectionAbortedError(
            "kqfast.Server stopped: its shutdown timeout passed before this connection "
            "closed, so it was reset"))
        loop.stop()

    def _report(self, loop: asyncio.AbstractEventLoop, context: dict) -> None:
        """A protocol callback failed: logged with the peer's address and counted; the
        transport has closed that connection only."""
        self._handler_errors += 1
        transport = context.get("transport")
        peer = transport.get_extra_info("peername") if transport is not None else None
        _log.error("kqfast: %s (peer %s); closing its connection", context.get("message"), peer,
                   exc_info=context.get("exception"))

    def _release(self) -> None:
        """Closes what a server that will not serve (again) still holds."""
        for reactor in self._reactors:
            if self._native:
                reactor.close()
        for loop in self._loops:
            if not loop.is_closed() and not loop.is_running():
                _finish(loop)
        # (A forked child's copy of a server leaves its parent's socket file alone.)
        if self._unix_path is not None and not self._reactors[0].inherited:
            _unlink_own_socket(self._unix_path, self._unix_inode)
        self._unix_path = None


def _finish(loop: Loop) -> None:
    """Closes what is left on a loop that has stopped: the protocols still get their
    connection_lost(), then the loop closes.  (A forked child's copy only closes.)"""
    if loop._reactor.inherited:
        loop.close()
        return
    loop._reactor.stop_serving()
    loop._reactor.abort_streams(ConnectionAbortedError(
        "kqfast.Server stopped: its loop ended with this connection open, so it was reset"))
    loop.call_soon(loop.stop)
    loop.run_forever()
    loop.close()


def _address_of(sock: socket.socket):
    name = sock.getsockname()
    return name if isinstance(name, str) else (name[0], name[1])


def _remove_stale_socket(path: str) -> None:
    """A Unix socket file that nothing listens on (left by a server that did not clean up)
    would make bind() fail: remove it.  A live one is left for bind() to report."""
    try:
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            return
    except FileNotFoundError:
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)
    except OSError:
        pass
    finally:
        probe.close()


def _unlink_own_socket(path: str, inode: int | None) -> None:
    """Removes the socket file this server bound, unless another has replaced it."""
    try:
        if os.stat(path).st_ino == inode:
            os.unlink(path)
    except FileNotFoundError:
        pass


def serve(handler, host: str = "127.0.0.1", port: int = 8080, **kwargs) -> None:
    """Server(handler, host, port, **kwargs).serve_forever()."""
    Server(handler, host, port, **kwargs).serve_forever()
