"""kqfast.Loop: an asyncio event loop whose TCP and Unix stream transports live in kqfast's
nogil core.  It is the standard library's Unix selector loop with its hot parts replaced:
the selector is kqfast's poller, each iteration runs the core's pass (accept, read, write,
EOF and write buffering in C without the GIL, protocol callbacks batched under one GIL
acquisition), and stream sockets become core streams.  Everything else (timers, tasks,
executors, signals, subprocesses, pipes, datagrams, TLS on top of the streams) is the
standard library's own code, running unchanged.

The private methods replaced here are checked against the running standard library first
(_asyncio_hooks): one that is not what kqfast was written for stays the standard library's."""
from __future__ import annotations

import asyncio
import contextvars
import inspect
import operator
import signal
import sys
import threading
import warnings
from asyncio import base_events, sslproto
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

from kqfast import _asyncio_hooks, _core

__all__ = ["Loop", "new_event_loop", "run", "EventLoopPolicy"]

_T = TypeVar("_T")

# Python 3.15's asyncio.Server keeps the context it was made in and hands it to
# _start_serving; on older ones kqfast.Loop.create_server keeps it (_capture_context).
_SERVERS_KEEP_CONTEXT = "copy_context" in base_events.Server.__init__.__code__.co_names
_STDLIB_START_SERVING = inspect.signature(asyncio.SelectorEventLoop._start_serving)


def _reactor_attribute(name: str) -> property:
    return property(operator.attrgetter(f"_reactor.{name}"),
                    lambda loop, value: setattr(loop._reactor, name, value))


class Loop(asyncio.SelectorEventLoop):
    """kqfast's asyncio event loop: asyncio.AbstractEventLoop in full, with TCP and Unix
    stream I/O (accept, read, write, EOF, write buffering) run by kqfast's core in C without
    the GIL, and protocol callbacks batched under one GIL acquisition per wake.  Everything
    else (timers, tasks, executors, signals, subprocesses, datagrams, TLS) is the standard
    library's own code, so asyncio programs run unchanged.

    Ways to use it, most common first:

        kqfast.run(main())                                   # like asyncio.run / uvloop.run
        asyncio.run(main(), loop_factory=kqfast.new_event_loop)       # Python 3.12+
        with asyncio.Runner(loop_factory=kqfast.new_event_loop) as runner:   # 3.11+
            runner.run(main())
        uvicorn app:app --loop kqfast:new_event_loop         # uvicorn 0.36 or later
        loop = kqfast.Loop()                                 # by hand, as any event loop:
        loop.run_until_complete(main()); loop.close()

    A transport belongs to the loop's thread: called from another thread it raises
    RuntimeError (use loop.call_soon_threadsafe).  Not to be confused with kqfast.EventLoop,
    the tutorial's poller over a kqfast.Socket."""

    def __init__(self) -> None:
        self._reactor = _core.Reactor()
        selector = _core.KqSelector(self._reactor)
        super().__init__(selector)
        self._reactor.attach(self, selector._fd_to_key)

    # In C: the iteration (asyncio's _run_once plus the core's pass, every iteration of a
    # run_forever in one call), the handles of call_soon, call_at and call_later (made
    # directly), create_future and create_task.  Type checkers see asyncio's own signatures
    # for them, which these take as they are.
    _run_once = _core.run_once
    _timer_handle_cancelled = _core.timer_handle_cancelled
    if not TYPE_CHECKING:
        call_soon = _core._loop_call_soon
        call_at = _core._loop_call_at
        call_later = _core._loop_call_later
        create_future = _core.create_future
        create_task = _core._loop_create_task

    # The loop state asyncio's code reads and writes, kept in the Reactor, where the
    # iteration reads it without a dictionary lookup.
    _ready = _reactor_attribute("ready_queue")
    _scheduled = _reactor_attribute("scheduled")
    _stopping = _reactor_attribute("stopping")
    _timer_cancelled_count = _reactor_attribute("timer_cancelled_count")

    def set_debug(self, enabled: bool) -> None:
        super().set_debug(enabled)
        self._reactor.debug = self._debug

    def time(self) -> float:
        return _core.monotonic()

    # The thread that runs the loop: transports refuse calls from any other.
    @property
    def _thread_id(self):
        return self._reactor.thread_id or None

    @_thread_id.setter
    def _thread_id(self, ident) -> None:
        self._reactor.thread_id = ident

    def run_forever(self) -> None:
        """As asyncio's; in the main thread the signal wakeup fd is the loop's self-pipe
        while it runs (as uvloop does), so Ctrl-C ends a nogil wait at once.  Afterwards it
        stays the self-pipe while add_signal_handler() handlers are installed (as asyncio
        keeps it): a signal between two runs is handled by the next."""
        old = -1
        watch = threading.current_thread() is threading.main_thread() and not self.is_closed()
        outermost = not self._reactor.in_run_forever
        if watch:
            old = signal.set_wakeup_fd(self._csock.fileno())  # type: ignore[attr-defined]
        self._reactor.in_run_forever = True
        try:
            super().run_forever()
        finally:
            if outermost:
                self._reactor.in_run_forever = False
            if watch and not self._signal_handlers:  # type: ignore[attr-defined]
                signal.set_wakeup_fd(-1 if old == self._csock.fileno() else old)

    # ---- streams on the core ---------------------------------------------------------
    # Each stream's protocol callbacks run in a copy of the context current where the
    # stream's server or connection was made (context=, from Python 3.15's asyncio; made
    # here on older ones), so nothing one connection's callbacks set reaches another's.

    def _make_socket_transport(self, sock, protocol, waiter=None, *, extra=None, server=None,
                               context=None):
        self._ensure_fd_no_transport(sock)
        return _core.adopt(self._reactor, sock, protocol, waiter, extra, server, context)

    def _make_ssl_transport(self, rawsock, protocol, sslcontext, waiter=None, *,
                            server_side=False, server_hostname=None, extra=None, server=None,
                            context=None, **timeouts):
        """TLS is asyncio's SSLProtocol over a core stream, whose records the core reads and
        writes in C (kqfast.TLS_ENGINE; timeouts: what this Python's SSLProtocol takes)."""
        self._ensure_fd_no_transport(rawsock)
        ssl_protocol = sslproto.SSLProtocol(self, protocol, sslcontext, waiter, server_side,
                                            server_hostname, **timeouts)
        _core.adopt(self._reactor, rawsock, ssl_protocol, None, extra, server, context)
        return ssl_protocol._app_transport

    def _start_serving(self, *args, **kwargs):
        """Accepts in C, TLS servers too (asyncio's SSLProtocol over each stream drives its
        handshake: no task per connection).  The arguments are what this Python's
        asyncio.Server passes: the factory, the socket, TLS settings and (3.15) the server's
        context."""
        arguments = _STDLIB_START_SERVING.bind(self, *args, **kwargs).arguments
        context = arguments.get("context") or getattr(arguments.get("server"), "_context",
                                                       None) or contextvars.copy_context()
        tls = None
        if arguments.get("sslcontext"):
            tls = (arguments["sslcontext"], arguments.get("ssl_handshake_timeout"),
                   arguments.get("ssl_shutdown_timeout"))
        sock = arguments["sock"]
        self._reactor.add_listener(sock, _core.Source(sock, arguments["protocol_factory"],
                                                      arguments.get("server"), False, context,
                                                      tls))

    # The private methods below override the standard loop's own (typeshed does not list them).
    def _stop_serving(self, sock) -> None:
        # The core lets go of the listener, then the standard library does the rest: it
        # removes a Unix server's socket file (3.13+) and closes the socket.
        self._reactor.remove_listener(sock.fileno())
        super()._stop_serving(sock)  # type: ignore[misc]

    def _sock_connect_cb(self, fut, sock, address) -> None:
        err = self._reactor.take_error(sock.fileno())
        if err and not fut.done():
            fut.set_exception(OSError(err, f"Connect call failed {address}"))
            return
        super()._sock_connect_cb(fut, sock, address)  # type: ignore[misc]

    def _ensure_fd_no_transport(self, fd) -> None:
        super()._ensure_fd_no_transport(fd)  # type: ignore[misc]
        fileno = fd if isinstance(fd, int) else fd.fileno()
        transport = self._reactor.transport_of(fileno)
        if transport is not None and not transport.is_closing():
            raise RuntimeError(f"File descriptor {fd!r} is used by transport {transport!r}")

    def close(self) -> None:
        if self.is_running():
            raise RuntimeError("Cannot close a running event loop")
        if self.is_closed():
            return
        # As asyncio's loop, it resets nothing: open transports are left alone (see
        # Reactor.release_streams).
        self._reactor.release_streams()
        super().close()
        self._reactor.closed = True


def _capture_context(create):
    """create_server/create_unix_server keeping the caller's context on the Server, for
    _start_serving (which a start_serving=False server reaches later, from elsewhere)."""
    async def create_server(self, *args, **kwargs):
        context = contextvars.copy_context()
        server = await create(self, *args, **kwargs)
        server._context = context
        return server
    create_server.__name__ = create.__name__
    create_server.__qualname__ = f"Loop.{create.__name__}"
    create_server.__doc__ = create.__doc__
    return create_server


if not _SERVERS_KEEP_CONTEXT:
    Loop.create_server = _capture_context(asyncio.SelectorEventLoop.create_server)
    Loop.create_unix_server = _capture_context(asyncio.SelectorEventLoop.create_unix_server)

# What this Python's asyncio does not match stays the standard library's.
for _name in _asyncio_hooks.FALLBACK_METHODS:
    delattr(Loop, _name)


def new_event_loop() -> Loop:
    """A new kqfast.Loop: the loop factory to hand to asyncio.run, asyncio.Runner and uvicorn
    (--loop kqfast:new_event_loop)."""
    return Loop()


def _policy_class() -> type[asyncio.AbstractEventLoopPolicy]:
    """kqfast.EventLoopPolicy, made on first use: asyncio deprecates its policy classes from
    Python 3.14 (removal in 3.16), so merely importing kqfast must not touch them."""
    from asyncio import unix_events
    base = getattr(unix_events, "_UnixDefaultEventLoopPolicy")

    class EventLoopPolicy(base):  # type: ignore[misc, valid-type]
        """An event loop policy whose loops are kqfast.Loop, for code that still sets
        policies (asyncio.set_event_loop_policy(kqfast.EventLoopPolicy())); new code passes
        kqfast.new_event_loop as a loop factory instead."""

        _loop_factory = Loop

    EventLoopPolicy.__module__ = "kqfast"
    return EventLoopPolicy


_policy: type[asyncio.AbstractEventLoopPolicy] | None = None


def event_loop_policy(stacklevel: int) -> type[asyncio.AbstractEventLoopPolicy]:
    """kqfast.EventLoopPolicy, warning as asyncio's policies do from Python 3.14."""
    global _policy
    if sys.version_info >= (3, 14):
        warnings.warn("'kqfast.EventLoopPolicy' is deprecated, as asyncio's event loop "
                      "policies are, and slated for removal with them in Python 3.16; use "
                      "kqfast.run() or asyncio.Runner(loop_factory=kqfast.new_event_loop)",
                      DeprecationWarning, stacklevel=stacklevel + 1)
    if _policy is None:
        _policy = _policy_class()
    return _policy


def __getattr__(name: str) -> type[asyncio.AbstractEventLoopPolicy]:
    if name == "EventLoopPolicy":
        return event_loop_policy(stacklevel=2)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def run(main: Coroutine[Any, Any, _T], *, debug: bool | None = None, **run_kwargs: Any) -> _T:
    """Runs the coroutine main on a new kqfast.Loop and returns its result: asyncio.run, with
    kqfast's loop as the loop factory, as uvloop.run is uvloop's.

        async def main(): ...
        kqfast.run(main())

    debug is asyncio.run's; any other keyword goes to asyncio.run (3.12+) or asyncio.Runner
    (3.11) as it is, so what those take on this Python works here too (Python 3.10's
    asyncio.run takes debug only).  The loop is always kqfast's: for another factory, call
    asyncio.run itself."""
    awaitables = sys.version_info >= (3, 14)  # asyncio.run takes any awaitable from 3.14 on
    if awaitables and not inspect.isawaitable(main):
        raise TypeError(f"main must be a coroutine or an awaitable, not {main!r}")
    if not awaitables and not asyncio.iscoroutine(main):
        raise ValueError(f"main must be a coroutine, not {main!r}")  # asyncio.run's type
    if debug is not None and not isinstance(debug, bool):
        raise TypeError(f"debug must be None, True or False, not {debug!r}")
    if "loop_factory" in run_kwargs:
        raise TypeError("kqfast.run() always runs kqfast's loop: for another loop_factory, "
                        "call asyncio.run(main, loop_factory=...)")
    if sys.version_info >= (3, 12):
        return asyncio.run(main, debug=debug, loop_factory=new_event_loop, **run_kwargs)
    if sys.version_info >= (3, 11):
        with asyncio.Runner(loop_factory=new_event_loop, debug=debug, **run_kwargs) as runner:
            return runner.run(main)
    if run_kwargs:
        raise TypeError(f"kqfast.run() got {', '.join(map(repr, run_kwargs))}: asyncio.run of "
                        f"Python {sys.version_info[0]}.{sys.version_info[1]} takes debug only")
    # asyncio.run of Python 3.10, on kqfast's loop.
    if asyncio.events._get_running_loop() is not None:
        raise RuntimeError("kqfast.run() cannot be called from a running event loop")
    loop = new_event_loop()
    try:
        asyncio.set_event_loop(loop)
        if debug is not None:
            loop.set_debug(debug)
        return loop.run_until_complete(main)
    finally:
        try:
            _cancel_all_tasks(loop)
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            asyncio.set_event_loop(None)
            loop.close()


def _cancel_all_tasks(loop: Loop) -> None:
    """What asyncio.run does with the tasks main left: cancel them, let them finish, report
    the errors of those that raised."""
    tasks = asyncio.all_tasks(loop)
    for task in tasks:
        task.cancel()
    if not tasks:
        return
    loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
    for task in tasks:
        if not task.cancelled() and task.exception() is not None:
            loop.call_exception_handler({
                "message": "unhandled exception during kqfast.run() shutdown",
                "exception": task.exception(), "task": task})
