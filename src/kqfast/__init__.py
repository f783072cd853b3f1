"""kqfast: an asyncio event loop and a TCP server whose hot loop (accept, read, write, and
kqueue or epoll) runs in C with the GIL released.

    kqfast.run(main())                     # asyncio.run, on kqfast's loop (kqfast.Loop)
    uvicorn app:app --loop kqfast:new_event_loop
    kqfast.Server(kqfast.LINE_ECHO, "127.0.0.1", 8080).serve_forever()

The asyncio event loop is kqfast.Loop.  kqfast.EventLoop is something else: the tutorial's
poller over a listening kqfast.Socket (kqfast.listen), kept under the tutorial's name."""
from __future__ import annotations

import asyncio

from kqfast._core import (
    BACKEND,
    ECHO,
    LINE_ECHO,
    LineProtocol,
    NativeHandler,
    Socket,
    Transport,
)
from kqfast._core import tls_engine as _tls_engine
from kqfast._core import tls_library as _tls_library
from kqfast._server import LoopStats, Server, ServerAddress, ServerStats, serve
from kqfast._tutorial import EventLoop, listen
from kqfast.loop import Loop, new_event_loop, run

__version__ = "0.2.0.dev0"

TLS_ENGINE = (f"kqfast: {_tls_library()} called from C" if _tls_engine() is None else
              f"asyncio SSLProtocol over the core ({_tls_engine()})")
"""What runs TLS (ssl=, start_tls) on kqfast.Loop and for kqfast.Server's protocol
factories: kqfast's engine (records read and written in C through the interpreter's own
OpenSSL, asyncio's SSLProtocol as the state machine), or where it cannot run, asyncio's own
SSLProtocol over a core stream, with the reason.  (The native handlers' TLS needs no
SSLProtocol: they serve it wherever kqfast reaches the interpreter's OpenSSL.)"""


def __getattr__(name: str) -> type[asyncio.AbstractEventLoopPolicy]:
    if name == "EventLoopPolicy":  # made on first use: see kqfast.loop
        from kqfast import loop
        return loop.event_loop_policy(stacklevel=2)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    # The asyncio event loop: what asyncio, uvicorn, aiohttp and websockets code runs on.
    "Loop", "new_event_loop", "run", "EventLoopPolicy", "Transport",
    # The server: native handlers (never take the GIL) or any asyncio.Protocol.
    "Server", "serve", "ECHO", "LINE_ECHO", "NativeHandler", "LineProtocol", "ServerAddress",
    "ServerStats", "LoopStats",
    # What this build is.
    "BACKEND", "TLS_ENGINE", "__version__",
    # The tutorial's level: a listening Socket and its poller (not an asyncio event loop).
    "listen", "Socket", "EventLoop",
]


def __dir__() -> list[str]:
    """The public API only: the modules behind it are kqfast's own business."""
    return list(__all__)
