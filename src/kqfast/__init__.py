"""kqfast: a TCP server whose hot loop calls kqueue (or epoll) directly, in C, with the GIL
released; native echo handlers, and any asyncio.Protocol on top."""
from kqfast._core import (
    BACKEND,
    ECHO,
    LINE_ECHO,
    LineProtocol,
    Socket,
    Transport,
    listen,
)
from kqfast.server import Server, serve
from kqfast.tutorial import EventLoop

__version__ = "0.1.0"

__all__ = [
    "BACKEND", "ECHO", "LINE_ECHO", "EventLoop", "LineProtocol", "Server", "Socket",
    "Transport", "listen", "serve", "__version__",
]
