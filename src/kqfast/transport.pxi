# The transport protocols see: a real asyncio.Transport (isinstance holds), each method one
# call into its stream's StreamHandle (handle.pxi).  How a stream is born: accepted in C
# from a listener (made), or adopted from a socket asyncio connected (adopt).
import socket as _socket
from asyncio import constants as _aio_constants
from asyncio import futures as _aio_futures
from asyncio import transports as _aio_transports

from cpython.contextvars cimport (PyContext_Copy, PyContext_CopyCurrent, PyContext_Enter,
                                  PyContext_Exit)
from cpython.object cimport PyCFunction, PyMethodDef, PyTypeObject

cdef extern from "Python.h":
    object PyDescr_NewMethod(PyTypeObject *cls, PyMethodDef *method)
    enum:
        METH_NOARGS
        METH_FASTCALL
        METH_KEYWORDS


# The stream's handle is kept in the first of _FlowControlMixin's slots (_loop), which holds
# nothing else here: Transport's properties read the mixin's state from the stream.  A slot
# of Transport's own for it would cost 8 bytes a transport, and 16 on Python 3.11, whose
# layout pymalloc would then round up to 112 bytes instead of 96.
# A mixin without that slot (the "streams" hook then names it) leaves Transport its own.
_HANDLE_IN_MIXIN = type(vars(_aio_transports._FlowControlMixin).get("_loop")).__name__ == (
    "member_descriptor")


# _FlowControlMixin: what loop.sendfile()'s fallback checks for (and reads the state of).
class Transport(_aio_transports._FlowControlMixin):
    """asyncio's transport over one kqfast stream; made by the loop, never by hand."""
    # A __dict__ as asyncio's transports have: code sets attributes on transports, tests
    # patch their methods (CPython's test_ssl patches write() with unittest.mock).
    __slots__ = ("__weakref__", "__dict__") + (() if _HANDLE_IN_MIXIN else ("_h",))
    _start_tls_compatible = True
    # loop.sendfile() writes through the transport (its native path needs a selector
    # transport's internals).
    _sendfile_compatible = _aio_constants._SendfileMode.FALLBACK

    def __init__(self, *args, **kwargs):
        raise TypeError("kqfast transports are made by the event loop")

    # write() and is_closing(): C methods, set below.

    def writelines(self, list_of_data):
        handle_of(self).write(b"".join(list_of_data))

    def write_eof(self):
        handle_of(self).write_eof()

    def can_write_eof(self):
        return True

    def get_write_buffer_size(self):
        return handle_of(self).write_buffer_size()

    def get_write_buffer_limits(self):
        return handle_of(self).write_buffer_limits()

    def set_write_buffer_limits(self, high=None, low=None):
        handle_of(self).set_write_buffer_limits(high, low)

    def pause_reading(self):
        handle_of(self).pause_reading()

    def resume_reading(self):
        handle_of(self).resume_reading()

    def is_reading(self):
        cdef StreamHandle h = handle_of(self)
        h.check_thread()
        return h.is_reading()

    def close(self):
        handle_of(self).close()

    def abort(self):
        """Closes at once, dropping queued output (with a reset on kqfast.Server's streams,
        whose peers must not take a cut reply for a whole one)."""
        cdef StreamHandle h = handle_of(self)
        h.check_thread()
        h.force_close(None, h.served())

    def _force_close(self, exc):
        """asyncio's private abort-with-an-error, which its SSLProtocol calls."""
        cdef StreamHandle h = handle_of(self)
        h.check_thread()
        h.force_close(exc, False)

    # _FlowControlMixin's state, read from the stream (its slots hold none of it).
    @property
    def _loop(self):
        return handle_of(self).reactor.loop

    @property
    def _protocol_paused(self):
        return bool(handle_of(self).protocol_paused)

    @property
    def _high_water(self):
        return handle_of(self).write_buffer_limits()[1]

    @property
    def _low_water(self):
        return handle_of(self).write_buffer_limits()[0]

    @property
    def _paused(self):
        """asyncio's selector transports' reading-paused flag, which code reads (CPython's
        own test_server_context among it)."""
        cdef Conn *c = handle_of(self).conn()
        return c is not NULL and bool(c.flags & C_READ_PAUSED)

    # What asyncio's selector transports keep and code outside them reads (CPython's own
    # test_ssl among it): the socket (here asyncio's safe TransportSocket over the stream's;
    # a socket set here is kept and read back, the core does not use it), and the read
    # callback, None once the transport is closing (here resume_reading: the core reads by
    # itself, and calling it lets reading go on, as calling asyncio's reads what is there).
    @property
    def _sock(self):
        sock = self.__dict__.get("_sock")
        return sock if sock is not None else extra_info(handle_of(self), "socket", None)

    @_sock.setter
    def _sock(self, sock):
        self.__dict__["_sock"] = sock

    @property
    def _read_ready_cb(self):
        cdef StreamHandle h = handle_of(self)
        return None if h.closing or h.ended else self.resume_reading

    def get_protocol(self):
        return handle_of(self).protocol

    def set_protocol(self, protocol):
        cdef StreamHandle h = handle_of(self)
        h.check_thread()
        h.set_protocol(protocol)

    def get_extra_info(self, name, default=None):
        cdef StreamHandle h = handle_of(self)
        h.check_thread()
        return extra_info(h, name, default)

    def __repr__(self):
        cdef StreamHandle h = handle_of(self)
        state = "closed" if h.ended else ("closing" if h.closing else "open")
        return f"<kqfast.Transport fd={h.fd} {state}>"


cdef Py_ssize_t T_HANDLE = (slot_offset(_aio_transports._FlowControlMixin, "_loop")
                            if _HANDLE_IN_MIXIN else slot_offset(Transport, "_h"))


# The two methods every protocol and stream calls all the time, as C methods of the class
# (method descriptors, as the built-in types' are): Python calls them without the generic
# call path a Cython function takes.
cdef object transport_write(object self, PyObject **args, Py_ssize_t nargs, PyObject *kwnames):
    # The common case (one bytes argument) without a reference of its own to the handle:
    # the transport, which the caller holds, holds it in its slot for good.
    cdef PyObject *h = slot_get(self, T_HANDLE)
    if h is not NULL and nargs == 1 and kwnames is NULL and is_exact_bytes(args[0]):
        (<StreamHandle>h).write_bytes(bytes_data(args[0]), bytes_size(args[0]))
        return None
    return transport_write_other(self, args, nargs, kwnames)


cdef object transport_write_other(object self, PyObject **args, Py_ssize_t nargs,
                                  PyObject *kwnames):
    cdef StreamHandle h = handle_in(self)
    if nargs == 1 and kwnames is NULL:
        h.write(<object>args[0])
    else:
        h.write(_one_argument("write", "data", args, nargs, kwnames))
    return None


cdef extern from "Python.h":
    # The bytes calls on a borrowed argument.
    bint is_exact_bytes "PyBytes_CheckExact"(PyObject *o)
    char *bytes_data "PyBytes_AS_STRING"(PyObject *o)
    Py_ssize_t bytes_size "PyBytes_GET_SIZE"(PyObject *o)


cdef object _one_argument(str method, str name, PyObject **args, Py_ssize_t nargs,
                          PyObject *kwnames):
    """The argument name of Transport.method(name), given by position or keyword."""
    cdef tuple keywords = () if kwnames is NULL else <tuple>kwnames
    if nargs + len(keywords) == 1 and (nargs == 1 or keywords[0] == name):
        return <object>args[0]
    raise TypeError(f"Transport.{method}() takes exactly one argument ({name})")


cdef object transport_is_closing(object self, object unused):
    return bool(handle_in(self).closing)


cdef PyMethodDef _WRITE = PyMethodDef(
    ml_name="write", ml_meth=<PyCFunction>transport_write, ml_flags=METH_FASTCALL | METH_KEYWORDS,
    ml_doc="write($self, data)\n--\n\nWrites data (bytes-like) to the stream; what the "
           "socket does not take at once is buffered and sent as it drains.")
cdef PyMethodDef _IS_CLOSING = PyMethodDef(
    ml_name="is_closing", ml_meth=<PyCFunction>transport_is_closing, ml_flags=METH_NOARGS,
    ml_doc="is_closing($self, /)\n--\n\nWhether the transport is closing or closed.")
Transport.write = PyDescr_NewMethod(<PyTypeObject *>Transport, &_WRITE)
Transport.is_closing = PyDescr_NewMethod(<PyTypeObject *>Transport, &_IS_CLOSING)


cdef inline StreamHandle handle_of(transport):
    """The stream behind a Transport, read from its slot (the hot path skips the attribute
    machinery); a Transport the loop did not make has none."""
    if type(transport) is not Transport and not isinstance(transport, Transport):
        raise TypeError(f"expected a kqfast.Transport, not {type(transport).__name__}")
    return handle_in(transport)


cdef inline StreamHandle handle_in(transport):
    """handle_of for a transport known to be a Transport (a method descriptor checked)."""
    cdef PyObject *h = slot_get(transport, T_HANDLE)
    if h is NULL:
        raise TypeError("kqfast transports are made by the event loop")
    return <StreamHandle>h


cdef StreamHandle new_handle(Reactor R, int fd, protocol, server, dict extra, context):
    """The handle of a stream just entered in the table, owned by the table from now on; its
    callbacks run in context.  Its asyncio Server counts it first: should that raise, the
    table has taken nothing."""
    cdef StreamHandle h = StreamHandle.__new__(StreamHandle)
    cdef Conn *c
    # As Transport's tp_alloc makes it (zeroed, GC-tracked: handles.pxi makes asyncio's
    # Handles so), without object.__new__'s eager values for the __dict__ (3.11, 3.12): the
    # dict is made when first used, and most transports never have one.
    t = <object>PyType_GenericAlloc(<PyTypeObject *>Transport, 0)
    Py_DECREF(t)  # the allocation's reference, now held by the variable
    slot_set(t, T_HANDLE, h)
    h.transport = t
    h.reactor, h.fd, h.server = R, fd, server
    if extra is not None:
        h.rare_state().extra = extra
    h.context = context
    if server is not None:
        if _ATTACH_TAKES_TRANSPORT:
            server._attach(t)
        else:
            server._attach()
    c = &R.core.conns[fd]
    h.gen = c.gen
    h.high_water = R.core.high_water
    c.low_water = <uint32_t>min(R.core.low_water, 0xFFFFFFFF)
    if R.holds_handles:
        Py_INCREF(h)
    c.transport = <PyObject *>h
    h.set_protocol(protocol)
    return h


cdef made(Reactor R, Record *r):
    """A stream accepted in C: its source's protocol, then connection_made(), both in the
    stream's own copy of the server's context."""
    cdef LoopCore *L = &R.core
    cdef Source source = None
    if L.conns[r.origin].gen == r.origin_gen:
        source = R.sources.get(r.origin)
    if source is None:  # its listener was removed since (see Reactor.remove_listener)
        close_now(L, r.fd, True)
        return
    context = PyContext_Copy(source.context)
    PyContext_Enter(context)
    try:
        start_made(R, r, source, context)
    finally:
        PyContext_Exit(context)


cdef start_made(Reactor R, Record *r, Source source, context):
    cdef LoopCore *L = &R.core
    cdef StreamHandle h
    try:
        protocol = source.protocol_factory()
        stream_protocol = protocol if source.tls is None else tls_server_protocol(
            R.loop, protocol, source.tls)
        if source.tls is not None and isinstance(protocol, LineProtocol):
            protocol.max_line = L.max_line  # (it frames a TLS stream's lines itself)
        h = new_handle(R, r.fd, stream_protocol, source.server, None, context)
    except (SystemExit, KeyboardInterrupt):
        close_now(L, r.fd, True)
        raise
    except BaseException as exc:
        report = {"message": "Error on transport creation for incoming connection",
                  "exception": exc}
        if source.served:  # kqfast.Server logs the peer (asyncio's context has none)
            report["peername"] = _peername(r.fd)
        close_now(L, r.fd, False)  # a FIN, as asyncio's socket object closes it
        if source.served or R.loop.get_debug():
            R.loop.call_exception_handler(report)
        return
    try:
        stream_protocol.connection_made(h.transport)
    except (SystemExit, KeyboardInterrupt):
        raise
    except BaseException as exc:
        h.fatal_error(exc, "Fatal error: protocol.connection_made() call failed.")


cdef object _peername(int fd):
    """The peer's address of a stream that has no socket object (yet), or None."""
    sock = _socket.socket(fileno=fd)
    try:
        return sock.getpeername()
    except OSError:
        return None
    finally:
        sock.detach()


def adopt(Reactor R, sock, protocol, waiter, extra, server, context):
    """A socket asyncio connected or accepted becomes a stream of this reactor; as asyncio's
    transport does, connection_made() runs soon, then reading starts, then waiter is set.
    The stream's callbacks run in context (None: a copy of the current one)."""
    cdef int fd = sock.fileno()
    cdef StreamHandle h
    R.check_free(fd)
    if sock.family != AF_UNIX:
        kq_prepare_accepted(fd, 1)  # TCP_NODELAY, as asyncio sets it
    open_conn(&R.core, fd, C_PY)
    if context is None:
        context = PyContext_CopyCurrent()
    try:
        h = new_handle(R, fd, protocol, server, dict(extra) if extra else None, context)
    except BaseException:
        # (A closed server's assertion, say.)  The socket stays its owner's, who closes it:
        # the table forgets the fd, or its number would stay "in use" after.
        close_entry(&R.core, fd)
        R.core.n_current -= 1
        raise
    h.rare_state().sock = sock
    extra_info(h, "sockname", None)  # asyncio's transports learn their names at once
    extra_info(h, "peername", None)
    R.loop.call_soon(_start_adopted, h, waiter, context=context)
    return h.transport


def _start_adopted(StreamHandle h, waiter):
    try:
        if h.protocol is not None:
            h.protocol.connection_made(h.transport)
    finally:
        h.start_reading()
        if waiter is not None:
            _aio_futures._set_result_unless_cancelled(waiter, None)
