# What a reactor's listeners and inboxes serve: a native handler, which runs in C and never
# takes the GIL, or a Source, which makes each accepted stream a Python protocol in its own
# copy of a context.
from cpython.contextvars cimport PyContext_CopyCurrent


cdef class NativeHandler:
    """A handler that runs entirely in C, never taking the GIL."""
    cdef readonly str name

    def __cinit__(self, str name):
        self.name = name

    def __repr__(self):
        return f"kqfast.{self.name.upper()}"


ECHO = NativeHandler("echo")
LINE_ECHO = NativeHandler("line_echo")


cdef class Source:
    """What a listener or inbox makes streams for: the socket it accepts from (kept open while
    it serves), the protocol factory, the asyncio Server, if any, the context each of its
    streams gets a copy of (None: a copy of the one current now), and for a TLS server
    (sslcontext, ssl_handshake_timeout, ssl_shutdown_timeout)."""
    cdef readonly object sock
    cdef readonly object protocol_factory
    cdef readonly object server
    cdef readonly bint served
    cdef readonly object context
    cdef readonly tuple tls

    def __cinit__(self, sock, protocol_factory, server, bint served, context=None,
                  tuple tls=None):
        self.sock, self.protocol_factory, self.server = sock, protocol_factory, server
        self.served = served
        self.context = PyContext_CopyCurrent() if context is None else context
        self.tls = tls
