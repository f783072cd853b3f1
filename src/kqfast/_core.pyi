# Type stubs for kqfast's C core (_core.pyx: poller.pxi, core/*.pxi, loop.pxi, dispatch.pxi, transport.pxi).
# Keep them true: `python -m mypy.stubtest kqfast._core` compares them with the built module.
import asyncio
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Any, Literal

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

def listen(
    host: str = "127.0.0.1", port: int = 8080, backlog: int = 1024, *, reuse_port: bool = False
) -> Socket:
    """Binds and listens on an IPv4/IPv6 address, a name or a Unix path (a host with "/")."""

def _listen_fd(host: str, port: int, backlog: int, reuse_port: bool) -> tuple[int, int]: ...

class LineProtocol(asyncio.Protocol):
    """An asyncio.Protocol whose input is framed into lines in C."""

    def line_received(self, line: bytes) -> None:
        """Each complete line with its b"\\n" (and a last line without one at EOF)."""

@disjoint_base
class Transport:
    """asyncio's transport interface over one connection of a kqfast loop; made by the
    server, handed to the protocol's connection_made()."""

    @property
    def protocol(self) -> asyncio.BaseProtocol: ...
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
    def is_closing(self) -> bool: ...
    def get_extra_info(self, name: str, default: Any = None) -> Any: ...

@disjoint_base
class Loop:
    """One event loop (internal: kqfast.Server builds and drives these)."""

    @property
    def listen_fileno(self) -> int: ...
    def configure(
        self,
        listen_fd: int,
        family: int,
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
    ) -> None: ...
    def open_inbox(self) -> None: ...
    def hand_off_to(self, loops: list[Loop]) -> None: ...
    def _feed_events(self, events: list[tuple[int, int, int]]) -> None: ...
    def run(self) -> None: ...
    def close(self) -> None: ...
    def request_stop(self, timeout: float) -> None: ...
    def call_soon_threadsafe(self, callback: Callable[..., object], *args: Any) -> None: ...
    def stats(self) -> dict[str, Any]: ...
