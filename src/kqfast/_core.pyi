# Type stubs for kqfast's C core (_core.pyx: poller.pxi, core/*.pxi, reactor.pxi, handle.pxi,
# transport.pxi, dispatch.pxi, aio.pxi).
# Keep them true: `python -m mypy.stubtest kqfast._core` compares them with the built module.
import asyncio
import collections
import contextvars
import selectors
import socket
import ssl
from asyncio import sslproto, transports
from collections.abc import Callable, Coroutine, Iterable
from types import TracebackType
from typing import Any, Literal, final

from _typeshed import ReadableBuffer
from typing_extensions import Self, disjoint_base

BACKEND: Literal["kqueue", "epoll"]
"""What this build really calls."""

# Poller interest and event masks.
READABLE: int
WRITABLE: int
HANGUP: int
ERROR: int

@disjoint_base
class NativeHandler:
    """A handler that runs entirely in C, never taking the GIL: ECHO or LINE_ECHO."""

    @property
    def name(self) -> str: ...

ECHO: NativeHandler
"""Raw echo: every byte goes back; at EOF, flush and close."""
LINE_ECHO: NativeHandler
"""The tutorial's line echo: each line back with its terminator; a blank line closes."""

@disjoint_base
class Poller:
    """The kernel poller behind the loop (kqueue or epoll)."""

    def set(self, fd: int, old_mask: int, new_mask: int) -> None: ...
    def wait(self, timeout: float | None = None) -> list[tuple[int, int, int]]:
        """Waits with the GIL released; returns [(fd, mask, errno)]."""
    def wake(self) -> None: ...
    def close(self) -> None: ...

@disjoint_base
class Socket:
    """A non-blocking socket by its fd, as in the tutorial."""

    @property
    def fd(self) -> int: ...
    at_eof: bool
    _owner: Any
    def __new__(cls, fd: int) -> Self: ...
    def fileno(self) -> int: ...
    def read(self, n: int = 65536) -> bytes:
        """What is there (up to n bytes), b"" at EOF; BlockingIOError if nothing is."""
    def write(self, data: ReadableBuffer) -> int:
        """Sends what the socket takes now and returns the count."""
    def accept(self) -> Socket | None:
        """One client as a non-blocking Socket, or None if none is waiting."""
    def getsockname(self) -> Any: ...
    def close(self) -> None: ...
    def __enter__(self) -> Self: ...
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
        /,
    ) -> None: ...

def _listen_fd(host: str, port: int, backlog: int, reuse_port: bool) -> tuple[int, int]: ...

class LineProtocol(asyncio.Protocol):
    """An asyncio.Protocol whose input is framed into lines in C."""

    max_line: int
    def line_received(self, line: bytes) -> None:
        """Each complete line with its b"\\n" (and a last line without one at EOF)."""
    def data_received(self, data: bytes) -> None: ...
    def _kq_end_of_input(self) -> None: ...

class Transport(transports._FlowControlMixin):
    """asyncio's transport over one kqfast stream; made by the loop, handed to the protocol's
    connection_made().  A call from a thread other than the loop's raises RuntimeError."""

    def __init__(self, *args: Any, **kwargs: Any) -> None: ...
    def write(self, data: ReadableBuffer) -> None: ...
    def writelines(self, list_of_data: Iterable[ReadableBuffer]) -> None: ...
    def write_eof(self) -> None: ...
    def can_write_eof(self) -> bool: ...
    def get_write_buffer_size(self) -> int: ...
    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None: ...
    def get_write_buffer_limits(self) -> tuple[int, int]: ...
    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def is_reading(self) -> bool: ...
    def close(self) -> None: ...
    def abort(self) -> None: ...
    def _force_close(self, exc: BaseException | None) -> None: ...
    def is_closing(self) -> bool: ...
    def get_protocol(self) -> asyncio.BaseProtocol: ...
    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None: ...
    def get_extra_info(self, name: str, default: Any = None) -> Any: ...

@final
class RareState:
    """What only some streams need, kept apart from their handle (internal)."""

@final
class StreamHandle:
    """The Python side of one stream of the core's table (internal)."""

    def deliver_held(self) -> None: ...
    def call_connection_lost(self, exc: BaseException | None) -> None: ...

@disjoint_base
class Source:
    """What a listener or inbox makes streams for (internal)."""

    @property
    def sock(self) -> socket.socket | None: ...
    @property
    def protocol_factory(self) -> Callable[[], asyncio.BaseProtocol] | None: ...
    @property
    def server(self) -> asyncio.Server | None: ...
    @property
    def served(self) -> bool: ...
    @property
    def context(self) -> contextvars.Context | None: ...
    @property
    def tls(self) -> tuple[ssl.SSLContext, float | None, float | None] | None: ...
    def __new__(
        cls,
        sock: socket.socket | None,
        protocol_factory: Callable[[], asyncio.BaseProtocol] | None,
        server: asyncio.Server | None,
        served: bool,
        context: contextvars.Context | None = None,
        tls: tuple[ssl.SSLContext, float | None, float | None] | None = None,
    ) -> Self: ...

@final
class Reactor:
    """A poller and the fd table of everything it watches (internal: kqfast.Server's native
    loops and every kqfast.Loop are built on one)."""

    thread_id: int
    closed: bool
    debug: bool
    # An asyncio loop's own state (kqfast.Loop's _ready, _scheduled, _stopping and
    # _timer_cancelled_count are properties over these), and whether run_forever runs it.
    ready_queue: collections.deque[asyncio.Handle]
    scheduled: list[asyncio.TimerHandle]
    stopping: bool
    timer_cancelled_count: int
    in_run_forever: bool
    @property
    def io_handle(self) -> asyncio.Handle: ...
    @property
    def listen_fileno(self) -> int: ...
    def configure(
        self,
        handler: NativeHandler | Callable[[], asyncio.BaseProtocol],
        *,
        # Sizes and counts are ints; typed float because Server passes them all from one dict.
        max_line: float,
        high_water: float,
        low_water: float,
        max_output: float,
        idle_timeout: float,
        linger_timeout: float,
        max_connections: float,
        ssl: ssl.SSLContext | None = None,
    ) -> None: ...
    def add_listener(self, sock: socket.socket, source: Source) -> None: ...
    def remove_listener(self, fd: int) -> None: ...
    def open_inbox(self, source: Source) -> None: ...
    def hand_off_to(self, reactors: list[Reactor]) -> None: ...
    def attach(
        self, loop: asyncio.AbstractEventLoop, selector_keys: dict[int, selectors.SelectorKey]
    ) -> None: ...
    def watch(self, fd: int, mask: int) -> None: ...
    def unwatch(self, fd: int) -> None: ...
    def poll(self, timeout: float | None) -> list[tuple[selectors.SelectorKey, int]]: ...
    def take_error(self, fd: int) -> int: ...
    def transport_of(self, fd: int) -> Transport | None: ...
    def when_drained(self, callback: Callable[[], object]) -> None: ...
    def close_streams(self) -> None: ...
    def abort_streams(self, exc: BaseException) -> None: ...
    def release_streams(self) -> None: ...
    @property
    def inherited(self) -> bool: ...
    def stop_serving(self) -> bool: ...
    def _feed_events(self, events: list[tuple[int, int, int]]) -> None: ...
    def run(self) -> None: ...
    def close(self) -> None: ...
    def request_stop(self, timeout: float) -> None: ...
    def call_soon_threadsafe(self, callback: Callable[..., object], *args: Any) -> None: ...
    def wake(self) -> None: ...
    def stats(self) -> dict[str, Any]: ...

class KqSelector(selectors._BaseSelectorImpl):
    """The selectors interface over a Reactor's poller."""

    def __init__(self, reactor: Reactor) -> None: ...
    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]: ...

def native_tls() -> str | None:
    """None when native handlers can serve TLS here, else why not."""

def tls_engine() -> str | None:
    """None when the TLS engine runs TLS on kqfast.Loop here, else why not."""

def tls_library() -> str | None:
    """The OpenSSL the engine calls, by its version string."""

@final
class TlsLink:
    """One asyncio SSLProtocol tied to the core (internal)."""

    def deliver_held(self, protocol: asyncio.BaseProtocol) -> None: ...

class CoreSSLProtocol(sslproto.SSLProtocol):
    """asyncio's SSLProtocol on a core stream (internal: instances are upgraded in place)."""

class LoopThreadSSLTransport(sslproto._SSLProtocolTransport):
    """asyncio's SSL app transport on a core stream, refusing other threads (internal)."""

class CoreSSLTransport(LoopThreadSSLTransport):
    """The engine's SSL app transport on a core stream (internal)."""

def monotonic() -> float:
    """The loop's clock: CLOCK_MONOTONIC, as time.monotonic()."""

def run_once(self: asyncio.AbstractEventLoop) -> None:
    """kqfast.Loop._run_once: from asyncio's run_forever, every iteration until the loop
    stops; called on its own, one."""

def timer_handle_cancelled(self: asyncio.AbstractEventLoop, handle: asyncio.TimerHandle) -> None:
    """kqfast.Loop._timer_handle_cancelled: counts a cancelled scheduled timer."""

# kqfast.Loop's methods of these names (asyncio's signatures; type checkers see asyncio's).
def call_soon(
    self: asyncio.AbstractEventLoop,
    callback: Callable[..., object],
    *args: Any,
    context: contextvars.Context | None = None,
) -> asyncio.Handle: ...
def call_at(
    self: asyncio.AbstractEventLoop,
    when: float,
    callback: Callable[..., object],
    *args: Any,
    context: contextvars.Context | None = None,
) -> asyncio.TimerHandle: ...
def call_later(
    self: asyncio.AbstractEventLoop,
    delay: float,
    callback: Callable[..., object],
    *args: Any,
    context: contextvars.Context | None = None,
) -> asyncio.TimerHandle: ...
def create_future(self: asyncio.AbstractEventLoop) -> asyncio.Future[Any]: ...
def create_task(
    self: asyncio.AbstractEventLoop,
    coro: Coroutine[Any, Any, Any],
    *,
    name: object = None,
    **context: Any,
) -> asyncio.Task[Any]: ...

def adopt(
    R: Reactor,
    sock: socket.socket,
    protocol: asyncio.BaseProtocol,
    waiter: asyncio.Future[None] | None,
    extra: dict[str, Any] | None,
    server: asyncio.Server | None,
    context: contextvars.Context | None,
) -> Transport: ...
def dispatch_handle(R: Reactor) -> None: ...
