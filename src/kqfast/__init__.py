"""kqfast: TCP serving from Python with the hot loop in C, kqueue (or epoll) called directly
with the GIL released.  kqfast.Loop is an asyncio event loop whose stream transports run on
that core; kqfast.Server serves native handlers (never taking the GIL) or any protocol."""
from kqfast._core import (
    BACKEND,
    ECHO,
    LINE_ECHO,
    LineProtocol,
    Socket,
    Transport,
    listen,
)
from kqfast.loop import Loop, new_event_loop, run
from kqfast.server import Server, serve
from kqfast.tutorial import EventLoop

__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "EventLoopPolicy":  # made on first use: see kqfast.loop
        from kqfast import loop
        return loop.event_loop_policy(stacklevel=2)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BACKEND", "ECHO", "LINE_ECHO", "EventLoop", "EventLoopPolicy", "LineProtocol", "Loop",
    "Server", "Socket", "Transport", "listen", "new_event_loop", "run", "serve",
    "__version__",
]
