"""kqfast.Server: listeners, loops and their threads, behind asyncio-like lifecycle calls.

Native handlers run on bare Reactors (the nogil cycle never leaves C); a protocol factory's
streams run on kqfast.Loop, one per worker, so protocols have a running asyncio loop."""
from __future__ import annotations

import asyncio
import logging
import os
import resource
import socket
import ssl as ssl_module
import stat
import sys
import threading
from typing import Any, Callable, Tuple, TypedDict, Union

from kqfast import _arguments
from kqfast._addresses import Address, bind_each, check_port_free, resolve
from kqfast._core import ECHO, LINE_ECHO, NativeHandler, Reactor, Source, _listen_fd, native_tls
from kqfast.loop import Loop

_log = logging.getLogger("kqfast")

# fds kept back from max_connections for listeners, the poller, the reserve fd and the rest
# of the process.
_FD_HEADROOM = 32


def default_balance(unix_path: str | None) -> str:
    """Linux and FreeBSD (SO_REUSEPORT_LB) spread TCP connections over SO_REUSEPORT
    listeners; elsewhere (macOS), and for a Unix socket path that only one listener can
    hold, one loop accepts and hands connections to the others."""
    if unix_path is not None or not sys.platform.startswith(("linux", "freebsd")):
        return "handoff"
    return "reuseport"


def default_max_connections() -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    return max(1, soft - _FD_HEADROOM)


class LoopStats(TypedDict):
    """One loop's counters (Server.stats()["loops"] lists them)."""
    connections_current: int
    connections_total: int
    connections_rejected: int  # accepted and closed at once: over max_connections
    timeouts: int              # closed by idle_timeout
    errors: int                # connections that failed (resets, ...), and handler errors
    bytes_in: int
    bytes_out: int


class ServerStats(LoopStats):
    """Server.stats(): the counters summed over the loops, and each loop's own."""
    handler_errors: int        # protocol callbacks that raised (each closed its connection)
    loops: list[LoopStats]


# What Server.address holds: the (host, port) bound, or a Unix socket's path.
ServerAddress = Union[Tuple[str, int], str]


class Server:
    """A TCP (or Unix socket) server on kqfast's core, bound when constructed.

    Server(handler, host="127.0.0.1", port=8080, *, workers=1, backlog=1024,
           max_connections=None, idle_timeout=60.0, max_line=65536, high_water=65536,
           low_water=16384, reuse_port=False, max_output=16 MiB, linger_timeout=2.0,
           balance=None, ssl=None)

    handler         kqfast.ECHO or kqfast.LINE_ECHO (native: run in C, never take the GIL),
                    or a protocol factory: any callable returning an asyncio.Protocol (a
                    class such as an asyncio.Protocol or kqfast.LineProtocol subclass).
    host            an IP address, a host name or a Unix socket path (a str with "/", or an
                    os.PathLike).  A name binds every address it resolves to (localhost:
                    127.0.0.1 and ::1) and None every interface (0.0.0.0 and ::), as
                    asyncio's create_server does; an address family this machine does not
                    have is left out.  Default 127.0.0.1: other interfaces only when asked.
    port            0..65535; 0 picks a free port (the same one for every address).
    workers         event loops, one thread each (>= 1).  Python protocols share the GIL:
                    for several cores with them, use processes (kqfast-echo --processes).
    backlog         listen() backlog.
    max_connections open connections per loop; over it new clients are accepted and closed at
                    once.  None: the fd limit less 32.
    idle_timeout    seconds without input or output progress before a connection is closed;
                    None or 0 disables.
    max_line        longest line for LINE_ECHO and kqfast.LineProtocol; longer closes.
    high_water,     output-buffer marks: pause_writing() once over high_water,
    low_water       resume_writing() at or under low_water (asyncio's rules).
    reuse_port      SO_REUSEPORT on the listener, so other processes can bind the port.
    max_output      hard cap on one Python connection's queued output (>= high_water).
    linger_timeout  seconds a closing connection waits for its peer to read and close.
    balance         with workers > 1: "reuseport" (a listener per loop) or "handoff" (one
                    loop accepts and hands connections on); None: the platform's best.
    ssl             an ssl.SSLContext (server side) to serve TLS with; native handlers then
                    run the handshake and records in C too, never taking the GIL.

    Bad arguments raise TypeError or ValueError naming the parameter; an address that cannot
    be bound raises OSError naming it.  serve_forever() serves in this thread, start() from
    background threads, stop() ends either; `with Server(...) as server:` stops on exit.
    """

    address: ServerAddress
    """The first (host, port) really bound, or the Unix socket's path."""
    addresses: list[ServerAddress]
    """Every address bound: several for a name such as localhost, or for host=None."""

    def __init__(self, handler: NativeHandler | Callable[[], asyncio.BaseProtocol],
                 host: str | os.PathLike[str] | None = "127.0.0.1", port: int = 8080, *,
                 workers: int = 1, backlog: int = 1024, max_connections: int | None = None,
                 idle_timeout: float | None = 60.0, max_line: int = 65536,
                 high_water: int = 65536, low_water: int = 16384, reuse_port: bool = False,
                 max_output: int = 16 * 1024 * 1024, linger_timeout: float = 2.0,
                 balance: str | None = None, ssl: ssl_module.SSLContext | None = None) -> None:
        native = handler is ECHO or handler is LINE_ECHO
        if not native and not callable(handler):
            raise TypeError(f"handler must be kqfast.ECHO, kqfast.LINE_ECHO or a protocol "
                            f"factory, not {handler!r}")
        ssl = _arguments.server_tls(ssl, native)
        if ssl is not None and native and native_tls() is not None:
            raise RuntimeError(f"native handlers cannot serve TLS here: {native_tls()}")
        name = _arguments.host(host, every_interface=True)
        port = _arguments.port(port)
        workers = _arguments.integer("workers", workers, 1, _arguments.MAX_COUNT)
        backlog = _arguments.integer("backlog", backlog, 0, _arguments.MAX_COUNT)
        if max_connections is not None:
            _arguments.integer("max_connections", max_connections, 1, _arguments.MAX_COUNT)
        max_line = _arguments.integer("max_line", max_line, 1)
        high_water = _arguments.integer("high_water", high_water, 0)
        low_water = _arguments.integer("low_water", low_water, 0)
        max_output = _arguments.integer("max_output", max_output, 0)
        reuse_port = _arguments.flag("reuse_port", reuse_port)
        if low_water > high_water:
            raise ValueError(f"low_water must be <= high_water ({high_water}), not {low_water}")
        if max_output < high_water:
            raise ValueError(f"max_output must be >= high_water ({high_water}), not "
                             f"{max_output}")
        unix_path = name if name is not None and "/" in name else None
        if balance is None:
            balance = default_balance(unix_path)
        balance = _arguments.choice("balance", balance, ("reuseport", "handoff"))
        if unix_path is not None and balance == "reuseport" and workers > 1:
            raise ValueError("balance must be 'handoff' for a Unix socket path (one listener "
                             "holds it), not 'reuseport'")
        limits = dict(max_line=max_line, high_water=high_water, low_water=low_water,
                      max_output=max_output,
                      idle_timeout=_arguments.seconds("idle_timeout", idle_timeout,
                                                      allow_none=True),
                      linger_timeout=_arguments.seconds("linger_timeout", linger_timeout),
                      max_connections=max_connections or default_max_connections(),
                      ssl=ssl)
        self._native = native
        self._reactors: list[Reactor] = []
        self._loops: list[Loop] = []
        self._threads: list[threading.Thread] = []
        self._handler_errors = 0
        self._failure: BaseException | None = None
        self._started = self._stopped = False
        self._serving: set[int] = set()   # idents of the threads running a loop now
        self._unix_path = unix_path
        self._unix_inode: int | None = None
        # With "reuseport" each loop owns a listener per address on the shared port and the
        # kernel spreads new connections; with "handoff" the first loop owns the only ones.
        per_loop_listener = balance == "reuseport"
        share_port = reuse_port or (workers > 1 and per_loop_listener)
        factory = None if native else handler
        # Protocols get asyncio's TLS (on the engine, where it runs) with its default timeouts.
        tls = (ssl, None, None) if ssl is not None and not native else None
        addresses: list[Address] = []
        if unix_path is None:
            addresses = resolve(name, port)  # a name that does not resolve says so
            if share_port and not reuse_port:
                # The loops' SO_REUSEPORT listeners would join another server's on this port.
                check_port_free(addresses, port)
        try:
            for i in range(workers):
                reactor = self._new_reactor(handler, limits)
                if i == 0:
                    socks = self._listen_first(unix_path, addresses, port, backlog, share_port)
                    self.addresses = [_address_of(sock) for sock in socks]
                    self.address = self.addresses[0]
                    if unix_path is None:  # the other loops bind what the first could
                        port = socks[0].getsockname()[1]
                        addresses = [Address(s.family, s.getsockname()[0]) for s in socks]
                elif per_loop_listener:
                    socks = [self._listen(a.host, port, backlog, share_port) for a in addresses]
                else:
                    reactor.open_inbox(Source(None, factory, None, True, tls=tls))
                    continue
                for sock in socks:
                    reactor.add_listener(sock, Source(sock, factory, None, True, tls=tls))
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

    def _listen_first(self, unix_path: str | None, addresses: list[Address], port: int,
                      backlog: int, share_port: bool) -> list[socket.socket]:
        """The first loop's listeners: the Unix path, or every address it can bind."""
        if unix_path is not None:
            _remove_stale_socket(unix_path)
            sock = self._listen(unix_path, 0, backlog, share_port)
            self._unix_inode = os.stat(unix_path).st_ino
            return [sock]
        return bind_each(addresses, port,
                         lambda a, p: self._listen(a.host, p, backlog, share_port))

    @staticmethod
    def _listen(host: str, port: int, backlog: int, share_port: bool) -> socket.socket:
        fd, family = _listen_fd(host, port, backlog, share_port)
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

    def start(self) -> Server:
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
        timeout = _arguments.seconds("timeout", timeout)
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

    def call_soon_threadsafe(self, callback: Callable[..., object], *args: Any) -> None:
        """Runs callback(*args) on the (first) loop's thread."""
        _arguments.function("callback", callback)
        if self._native:
            self._reactors[0].call_soon_threadsafe(callback, *args)
        else:
            self._loops[0].call_soon_threadsafe(callback, *args)

    def stats(self) -> ServerStats:
        """Counters summed over the loops, and each loop's own under "loops" (see
        ServerStats)."""
        per_loop = [reactor.stats() for reactor in self._reactors]

        def total(key: str) -> int:
            return sum(int(counters[key]) for counters in per_loop)

        return ServerStats(
            connections_current=total("connections_current"),
            connections_total=total("connections_total"),
            connections_rejected=total("connections_rejected"),
            timeouts=total("timeouts"),
            errors=total("errors") + self._handler_errors,
            bytes_in=total("bytes_in"),
            bytes_out=total("bytes_out"),
            handler_errors=self._handler_errors,
            loops=[LoopStats(**counters) for counters in per_loop])

    def _rejected(self) -> int:
        """stats()["connections_rejected"] for a fraction of its cost (kqfast-echo's warning
        thread asks every second, in a process whose cost per request is measured)."""
        return sum(int(reactor.stats()["connections_rejected"]) for reactor in self._reactors)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc_info: object) -> None:
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
        peer = (transport.get_extra_info("peername") if transport is not None else
                context.get("peername"))
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


def _address_of(sock: socket.socket) -> ServerAddress:
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


def serve(handler: NativeHandler | Callable[[], asyncio.BaseProtocol],
          host: str | os.PathLike[str] | None = "127.0.0.1", port: int = 8080,
          **kwargs: Any) -> None:
    """Server(handler, host, port, **kwargs).serve_forever(): serves in this thread until
    Ctrl-C (which raises KeyboardInterrupt after a clean stop).  The keyword arguments are
    Server's."""
    Server(handler, host, port, **kwargs).serve_forever()
