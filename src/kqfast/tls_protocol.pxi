# asyncio's SSLProtocol on a core stream.  asyncio makes its SSLProtocol itself (in
# create_connection, connect_accepted_socket, start_tls, the servers' accept); when one
# becomes a core stream's protocol, it is upgraded in place to CoreSSLProtocol, a subclass that
# adds methods and no state (the class of an instance whose state is all in its __dict__ can
# be changed), and its app transport likewise to CoreSSLTransport.  The added methods are
# asyncio's own, each followed by a sync of the link (tls_link.pxi) where that step may
# change what the core needs to know; the per-record work is the link's.
import inspect as _inspect
from functools import partial as _partial

cdef object _SSLProtocol = _sslproto.SSLProtocol
cdef object _SSLProtocolTransport = _sslproto._SSLProtocolTransport


cdef inline _sync(protocol):
    link = protocol.__dict__.get("_kq_link")
    if link is not None:
        (<TlsLink>link).sync(protocol)


class CoreSSLProtocol(_SSLProtocol):
    """asyncio's SSLProtocol, its records read and written by kqfast's core."""

    def connection_made(self, transport):
        # On a core stream, the link attaches (else it stays idle: asyncio does it all).
        link = self.__dict__.get("_kq_link")
        if link is not None and type(transport) is Transport:
            (<TlsLink>link).attach(handle_in(transport), self)
        _SSLProtocol.connection_made(self, transport)

    def connection_lost(self, exc):
        _SSLProtocol.connection_lost(self, exc)
        _sync(self)

    def _set_state(self, new_state):
        _SSLProtocol._set_state(self, new_state)
        _sync(self)

    def _set_app_protocol(self, app_protocol):
        _SSLProtocol._set_app_protocol(self, app_protocol)
        _sync(self)

    def _pause_reading(self):
        _SSLProtocol._pause_reading(self)
        _sync(self)

    def _resume_reading(self):
        _SSLProtocol._resume_reading(self)
        _sync(self)

    def pause_writing(self):
        _SSLProtocol.pause_writing(self)
        _sync(self)

    def resume_writing(self):
        _SSLProtocol.resume_writing(self)
        _sync(self)

    def _control_app_writing(self):
        _SSLProtocol._control_app_writing(self)
        _sync(self)

    def _control_ssl_reading(self):
        _SSLProtocol._control_ssl_reading(self)
        _sync(self)

    def _set_write_buffer_limits(self, high=None, low=None):
        _SSLProtocol._set_write_buffer_limits(self, high, low)
        _sync(self)

    def _set_read_buffer_limits(self, high=None, low=None):
        _SSLProtocol._set_read_buffer_limits(self, high, low)
        _sync(self)

    def _write_appdata(self, list_of_data):
        _SSLProtocol._write_appdata(self, list_of_data)
        _sync(self)

    def _do_write(self):
        _SSLProtocol._do_write(self)
        _sync(self)

    def _call_eof_received(self):
        # A LineProtocol's last line without a newline comes before its eof_received().
        if isinstance(self._app_protocol, LineProtocol):
            try:
                self._app_protocol._kq_end_of_input()
            except Exception as exc:
                self._fatal_error(exc, "Error calling eof_received()")
                return
        _SSLProtocol._call_eof_received(self)

    def _do_read(self):
        # Plaintext the core decrypted before the app paused reading goes first.
        link = self.__dict__.get("_kq_link")
        if link is not None and self._state in (_WRAPPED, _FLUSHING):
            try:
                (<TlsLink>link).deliver_held(self)
            except Exception as exc:
                self._fatal_error(exc, "Fatal error on SSL protocol")
                return
        _SSLProtocol._do_read(self)


class LoopThreadSSLTransport(_SSLProtocolTransport):
    """asyncio's SSL app transport over a core stream, whose methods refuse other threads
    than the loop's (RuntimeError), as the core stream's own do: where the engine does not
    run, asyncio's SSLProtocol works the core stream from whichever thread calls."""


class CoreSSLTransport(LoopThreadSSLTransport):
    """The engine's SSL app transport: write() encrypts in C (set below); the SSL object
    its methods work on is the core's too."""

    def _test__append_write_backlog(self, data):
        _SSLProtocolTransport._test__append_write_backlog(self, data)
        _sync(self._ssl_protocol)


def _loop_thread_only(name):
    method = getattr(_SSLProtocolTransport, name)

    def guarded(self, *args, **kwargs):
        link = self.__dict__.get("_kq_link")
        if link is not None:
            (<TlsLink>link).check_thread()
        elif type(self._ssl_protocol._transport) is Transport:
            handle_in(self._ssl_protocol._transport).check_thread()
        return method(self, *args, **kwargs)
    guarded.__name__, guarded.__qualname__ = name, f"LoopThreadSSLTransport.{name}"
    guarded.__doc__ = method.__doc__
    guarded.__signature__ = _inspect.signature(method)  # asyncio's, for help() and checkers
    return guarded


for _name in ("write", "writelines", "close", "abort", "pause_reading", "resume_reading",
              "set_write_buffer_limits", "get_write_buffer_size", "set_read_buffer_limits",
              "get_read_buffer_size", "set_protocol"):
    if hasattr(_SSLProtocolTransport, _name):  # (3.10's has no read-buffer limits)
        setattr(LoopThreadSSLTransport, _name, _loop_thread_only(_name))


cdef PyMethodDef _TLS_WRITE = PyMethodDef(
    ml_name="write", ml_meth=<PyCFunction>tls_transport_write,
    ml_flags=METH_FASTCALL | METH_KEYWORDS,
    ml_doc="write($self, data)\n--\n\nEncrypts data (bytes-like) and sends the records; "
           "what the socket does not take at once is buffered and sent as it drains.")
CoreSSLTransport.write = PyDescr_NewMethod(<PyTypeObject *>CoreSSLTransport, &_TLS_WRITE)
_WRAPPED = getattr(getattr(_sslproto, "SSLProtocolState", None), "WRAPPED", None)
_FLUSHING = getattr(getattr(_sslproto, "SSLProtocolState", None), "FLUSHING", None)


cdef upgrade_tls(protocol):
    """asyncio's SSLProtocol becomes a core stream's protocol: it and its app transport
    take the engine's classes, and a link that attaches at connection_made() (where the
    engine does not run, the app transport still refuses other threads)."""
    if type(protocol) is not _SSLProtocol:
        return
    app = protocol._app_transport
    if type(app) is not _SSLProtocolTransport:
        return
    if tls_engine() is not None:
        app.__class__ = LoopThreadSSLTransport
        return
    protocol.__class__ = CoreSSLProtocol
    app.__class__ = CoreSSLTransport
    protocol._kq_link = app._kq_link = TlsLink.__new__(TlsLink)


cdef object tls_server_protocol(loop, app_protocol, tuple tls):
    """A TLS server's stream accepted in C: asyncio's SSLProtocol over it, as asyncio's own
    accept makes one, and what asyncio's accept task does once the handshake ends."""
    sslcontext, handshake_timeout, shutdown_timeout = tls
    timeouts = {}
    if handshake_timeout is not None:
        timeouts["ssl_handshake_timeout"] = handshake_timeout
    if shutdown_timeout is not None:
        timeouts["ssl_shutdown_timeout"] = shutdown_timeout
    waiter = loop.create_future()
    protocol = _SSLProtocol(loop, app_protocol, sslcontext, waiter, True, None, **timeouts)
    waiter.add_done_callback(_partial(_tls_accepted, loop, app_protocol,
                                      protocol._app_transport))
    return protocol


def _tls_accepted(loop, app_protocol, app_transport, waiter):
    """asyncio's accept task after its handshake: a failure closes the app transport and is
    reported in debug mode only."""
    if waiter.cancelled() or waiter.exception() is None:
        return
    app_transport.close()
    if loop.get_debug():
        loop.call_exception_handler({
            "message": "Error on transport creation for incoming connection",
            "exception": waiter.exception(), "protocol": app_protocol,
            "transport": app_transport})
