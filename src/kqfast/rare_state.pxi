# What only some streams need, kept apart from their StreamHandle (one per stream, so its size
# is idle memory) in a RareState made on first use: a plain idle stream pays one pointer for
# it.  That is what get_extra_info() tells of a stream with asyncio's keys (its socket object,
# its names, what an adopted socket came with), the input held while reading is paused, and
# the write limits as they were set.  The extra info is read here; the rest in handle.pxi.
import socket as _socket
from asyncio import trsock as _trsock


@cython.final
cdef class RareState:
    cdef object sock                # a socket object over the stream's fd
    cdef dict extra                 # extra info: asked for, or given by adopt()
    cdef bytearray held             # input read before pause_reading() took effect
    cdef tuple limits               # (low, high) as set_write_buffer_limits() got them


cdef object stream_socket(StreamHandle h):
    """The socket object over h's fd, made when first asked for (None if it ended first)."""
    cdef RareState rare = h.rare_state()
    if rare.sock is None and not h.ended:
        rare.sock = _socket.socket(fileno=h.fd)
    return rare.sock


cdef object extra_info(StreamHandle h, name, default):
    """get_extra_info(name, default) of h's transport: "socket" as asyncio's TransportSocket
    (which refuses close() and blocking mode), the names read once and kept (they stay known
    after the close, as asyncio's transports know them), the rest as given."""
    cdef RareState rare
    if name == "socket":
        sock = stream_socket(h)
        return None if sock is None else _trsock.TransportSocket(sock)
    rare = h.rare_state()
    if rare.extra is None:
        rare.extra = {}
    if name in ("sockname", "peername"):
        if name not in rare.extra:
            sock = stream_socket(h)
            try:
                rare.extra[name] = (sock.getsockname() if name == "sockname" else
                                    sock.getpeername())
            except (OSError, AttributeError):
                return None  # ended before anyone asked
        return rare.extra[name]
    return rare.extra.get(name, default)
