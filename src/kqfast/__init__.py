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
from kqfast.loop import EventLoopPolicy, Loop, new_event_loop, run
from kqfast.server import Server, serve
from kqfast.tutorial import EventLoop

__version__ = "0.2.0.dev0"

__all__ = [
    "BACKEND", "ECHO", "LINE_ECHO", "EventLoop", "EventLoopPolicy", "LineProtocol", "Loop",
    "Server", "Socket", "Transport", "listen", "new_event_loop", "run", "serve",
    "__version__",
]
