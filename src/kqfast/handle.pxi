# StreamHandle: the Python side of one stream in the core's table.  It holds what asyncio's
# socket transport holds (protocol, flow control, the server; the socket object and the rest
# of what only some streams need in its RareState, rare_state.pxi) and does what the
# transport does for that stream under the GIL; the Transport that protocols see
# (transport.pxi) is a thin asyncio.Transport over it.  Everything here follows asyncio's
# selector transport (Lib/asyncio/selector_events.py) rule for rule, so protocols written for
# the standard loop see the same calls in the same order.
import warnings as _warnings
from asyncio.base_events import Server as _AioServer

from cpython.buffer cimport PyBUF_WRITABLE
from cpython.bytearray cimport PyByteArray_AS_STRING
from cpython.bytes cimport PyBytes_CheckExact, PyBytes_GET_SIZE
from cpython.contextvars cimport PyContext_Enter, PyContext_Exit

# Python 3.13's Server tracks its transports (_attach(transport)); older ones count them.
cdef bint _ATTACH_TAKES_TRANSPORT = _AioServer._attach.__code__.co_argcount == 2
cdef int _LOG_THRESHOLD_FOR_CONNLOST_WRITES = 5
_aio_log = _logging.getLogger("asyncio")


cdef size_t _whole_bytes(mark) except? 0:
    """A water mark (any non-negative number, inf included) as a whole byte count."""
    return int(min(mark, 1 << 62))


cdef object _errno_exception(int err):
    return OSError(err, _os.strerror(err))


@cython.final
cdef class StreamHandle:
    cdef Reactor reactor
    cdef int fd
    cdef uint32_t gen
    cdef object protocol
    cdef object data_received       # its class's function, looked up once (as uvloop does)
    cdef object transport           # the Transport protocols see; None once the stream ended
    cdef object server              # the asyncio Server that accepted it, if any
    cdef TlsLink tls                # an SSLProtocol's link to the core (tls_link.pxi)
    # The contextvars.Context every protocol callback of this stream runs in: a copy of the
    # one current where its server or connection was made (Python 3.15's rule), so nothing
    # a callback sets reaches another stream or the code that runs the loop.
    cdef object context
    cdef RareState rare             # what only some streams need, made on first use
    # The low-water mark is the Conn's (and, until set_write_buffer_limits(), the reactor's).
    cdef size_t high_water
    # Flags and a count, a byte each: the handle is one object per stream, its size is idle
    # memory (112 bytes, 128 with the GC's header; pymalloc rounds up to 16, so one pointer
    # more would cost 16).
    cdef uint8_t closing            # close() was called or the stream failed
    cdef uint8_t ended              # the fd is no longer this stream's
    cdef uint8_t eof_written
    cdef uint8_t protocol_connected
    cdef uint8_t protocol_paused
    cdef uint8_t input_held         # rare.held holds input (what deliver() checks)
    cdef uint8_t held_eof
    cdef uint8_t lost_writes        # writes after a loss, counted until they are warned of

    cdef inline RareState rare_state(self):
        if self.rare is None:
            self.rare = RareState.__new__(RareState)
        return self.rare

    cdef inline Conn *conn(self) noexcept:
        """The stream while it is this handle's; NULL once it ended (a closed stream may
        linger in C, detached, until the peer finishes)."""
        cdef Conn *c = live(&self.reactor.core, self.fd, self.gen)
        if c is NULL or c.transport != <PyObject *>self:
            return NULL
        return c

    cdef inline int check_thread(self) except -1:
        """A stream belongs to its loop's thread: from another one, a call could race the
        loop's nogil pass over the same buffers.  And to its loop's process: in a forked
        child its socket and poller are the parent's too.  (The running thread's state is
        compared first: one load, where its id is a call.)"""
        if self.reactor.core.inherited:
            self.reactor.check_process()
        if (self.reactor.thread_id == 0 or
                <void *>current_thread_state() == self.reactor.thread_state):
            return 0
        if self.reactor.thread_id != PyThread_get_thread_ident():
            raise RuntimeError("a kqfast transport was used from a thread other than its "
                               "loop's: use loop.call_soon_threadsafe()")
        return 0

    cdef bint served(self):
        cdef Conn *c = self.conn()
        return c is not NULL and bool(c.flags & C_SERVED)

    cdef bint set_protocol(self, protocol) except -1:
        cdef Conn *c = self.conn()
        if self.tls is not None:
            self.tls.detach()
        upgrade_tls(protocol)
        self.protocol = protocol
        self.protocol_connected = True
        self.data_received = _protocol_method(protocol, "data_received")
        if c is not NULL:
            c.flags &= ~(C_LINE | C_BUFFERED)
            if isinstance(protocol, _BufferedProtocol):
                c.flags |= C_BUFFERED
            elif isinstance(protocol, LineProtocol):
                c.flags |= C_LINE
        return True

    # ---- writing ----------------------------------------------------------------------

    cdef int write(self, data) except -1:
        cdef Py_buffer view
        if PyBytes_CheckExact(data):  # the common case, without the buffer protocol
            return self.write_bytes(PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data))
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"data argument must be a bytes-like object, not "
                            f"{type(data).__name__!r}")
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            self.write_bytes(<const char *>view.buf, view.len)
        finally:
            PyBuffer_Release(&view)
        return 0

    cdef inline int write_bytes(self, const char *data, Py_ssize_t n) except -1:
        """asyncio's write(): send at once what the socket takes, queue the rest, pause the
        protocol over the high-water mark.  Inline, its common case only (all of it sent):
        every protocol write comes here."""
        cdef Conn *c
        cdef ssize_t sent
        self.check_thread()
        c = self.conn()
        if self.eof_written or n == 0 or c is NULL or c.flags & C_LOST or c.out is not NULL:
            return self.write_later(c, data, n)
        sent = kq_send(self.fd, data, n)
        if sent != n:
            return self.write_rest(c, data, n, sent)
        self.reactor.core.bytes_out += n
        touch_conn(&self.reactor.core, c, self.fd)
        return 0

    cdef int write_later(self, Conn *c, const char *data, Py_ssize_t n) except -1:
        """write_bytes when it sends nothing now, in asyncio's order: after write_eof(),
        nothing to write, a lost stream, output queued already (c: self.conn())."""
        if self.eof_written:
            raise RuntimeError("Cannot call write() after write_eof()")
        if n == 0:
            return 0
        if c is NULL or c.flags & C_LOST:
            if self.lost_writes <= _LOG_THRESHOLD_FOR_CONNLOST_WRITES:
                self.lost_writes += 1
            if self.lost_writes > _LOG_THRESHOLD_FOR_CONNLOST_WRITES:
                _aio_log.warning("socket.send() raised exception.")
            return 0
        return self.buffer_output(c, data, n)

    cdef int write_rest(self, Conn *c, const char *data, Py_ssize_t n,
                        ssize_t sent) except -1:
        """write_bytes when the socket took less than all of it (sent: what send() gave)."""
        if sent < 0:
            if not kq_retry_later(errno):
                self.force_close(_errno_exception(errno), False)
                return 0
            sent = 0
        self.reactor.core.bytes_out += sent
        touch_conn(&self.reactor.core, c, self.fd)
        return self.buffer_output(c, data + sent, n - sent)

    cdef int buffer_output(self, Conn *c, const char *data, size_t n) except -1:
        """What the socket did not take waits in c.out behind write interest."""
        cdef size_t size
        c.out = buf_append(c.out, data, n)
        if c.out is NULL or set_mask(&self.reactor.core, self.fd, c.mask | KQ_WRITABLE) < 0:
            self.force_close(_errno_exception(ENOMEM if c.out is NULL else errno), True)
            return 0
        size = c.out.end - c.out.start
        if c.flags & C_SERVED and size > self.reactor.core.max_output:
            self.force_close(OSError(ENOBUFS, f"output buffer over max_output "
                                              f"({self.reactor.core.max_output} bytes): the "
                                              f"peer does not read"), True)
        elif size > self.high_water:
            self.pause_protocol()
        return 0

    cdef pause_protocol(self):
        cdef Conn *c = self.conn()
        if self.protocol_paused:
            return
        self.protocol_paused = True
        if c is not NULL:
            c.flags |= C_WRITE_PAUSED
        self.tell_flow(True)

    cdef resume_protocol(self):
        if not self.protocol_paused:
            return
        self.protocol_paused = False
        self.tell_flow(False)

    cdef tell_flow(self, bint pause):
        """pause_writing() or resume_writing(), in the stream's own context: write() and
        close() may come from any task or another stream's callback."""
        cdef bint enter
        context = self.context
        enter = current_thread_state().context != <PyObject *>context
        if enter:
            PyContext_Enter(context)
        try:
            if pause:
                self.protocol.pause_writing()
            else:
                self.protocol.resume_writing()
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self.report(exc, f"protocol.{'pause' if pause else 'resume'}_writing() failed")
        finally:
            if enter:
                PyContext_Exit(context)

    cdef write_eof(self):
        cdef Conn *c
        self.check_thread()
        if self.closing or self.eof_written:
            return
        self.eof_written = True
        c = self.conn()
        if c is NULL:
            return
        c.flags |= C_WRITE_EOF
        if c.out is NULL:
            shutdown(self.fd, SHUT_WR)
            c.flags |= C_WRITE_SHUT

    cdef set_write_buffer_limits(self, high, low):
        cdef Conn *c
        cdef size_t low_water
        self.check_thread()
        if high is None:
            high = 64 * 1024 if low is None else 4 * low
        if low is None:
            low = high // 4
        if not high >= low >= 0:
            raise ValueError(f"high ({high!r}) must be >= low ({low!r}) must be >= 0")
        # Buffer sizes are whole, so whole marks compare the same (size > 1000.5 exactly
        # when size > 1000); the values given are what get_write_buffer_limits() tells.
        self.rare_state().limits = (low, high)
        self.high_water, low_water = _whole_bytes(high), _whole_bytes(low)
        c = self.conn()
        if c is not NULL:
            c.low_water = <uint32_t>min(low_water, 0xFFFFFFFF)
            if buf_len(c.out) > self.high_water:
                self.pause_protocol()

    cdef tuple write_buffer_limits(self):
        if self.rare is not None and self.rare.limits is not None:
            return self.rare.limits
        return (self.reactor.core.low_water, self.high_water)  # the marks the stream began with

    cdef size_t write_buffer_size(self) except? 0:
        cdef Conn *c
        self.check_thread()
        c = self.conn()
        return 0 if c is NULL else buf_len(c.out)

    # ---- reading ----------------------------------------------------------------------

    cdef bint is_reading(self):
        cdef Conn *c = self.conn()
        return c is not NULL and not self.closing and not (c.flags & C_READ_PAUSED)

    cdef pause_reading(self):
        cdef Conn *c
        self.check_thread()
        if not self.is_reading():
            return
        c = self.conn()
        c.flags |= C_READ_PAUSED
        set_mask(&self.reactor.core, self.fd, c.mask & ~KQ_READABLE)

    cdef resume_reading(self):
        cdef Conn *c
        self.check_thread()
        c = self.conn()
        if self.closing or c is NULL or not (c.flags & C_READ_PAUSED):
            return
        c.flags &= ~C_READ_PAUSED
        if self.input_held:
            # What was read before the pause goes first: reading resumes once it is out.
            self.reactor.loop.call_soon(self.deliver_held, context=self.context)
        else:
            self.start_reading()

    cdef start_reading(self):
        cdef Conn *c = self.conn()
        if c is not NULL and not (c.flags & (C_EOF | C_CLOSING | C_READ_PAUSED)):
            if set_mask(&self.reactor.core, self.fd, c.mask | KQ_READABLE) < 0:
                self.force_close(_errno_exception(errno), True)

    def deliver_held(self):
        cdef Conn *c = self.conn()
        if c is NULL or not self.input_held or c.flags & C_READ_PAUSED:
            return
        data, self.rare.held = self.rare.held, None
        self.input_held = False
        if data:
            self.deliver(self.conn(), PyByteArray_AS_STRING(data), len(data))
        if self.input_held:
            return  # paused again on the way
        if self.held_eof:
            self.held_eof = False
            self.eof()
        else:
            self.start_reading()

    cdef inline int deliver(self, Conn *c, const char *data, size_t n) except -1:
        """Input for the protocol: held while reading is paused, framed into lines for a
        LineProtocol, copied into a BufferedProtocol's buffers, or data_received.  c: the
        stream's entry, self.conn() (inline: the Python pass calls this for every read)."""
        if c is NULL or self.closing:
            return 0
        cdef PyObject *result
        if self.input_held or c.flags & (C_READ_PAUSED | C_LINE | C_BUFFERED):
            self.deliver_framed(c, data, n)
            return 0
        result = call_with_bytes(self.data_received, self.protocol, data, n)
        if result is NULL:
            return self.data_received_failed()
        drop_reference(result)
        return 0

    cdef int data_received_failed(self) except -1:
        """deliver's error path, apart: the hot path then keeps no exception state."""
        try:
            pending_error()
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self.fatal_error(exc, "Fatal error: protocol.data_received() call failed.")
        return 0

    cdef deliver_framed(self, Conn *c, const char *data, size_t n):
        """deliver's other cases: held while reading is paused, lines, buffers."""
        if self.input_held or c.flags & C_READ_PAUSED:
            self.hold(data, n)
            return
        try:
            if c.flags & C_LINE:
                self.frame_lines(data, n)
            else:
                _feed_buffered(self.protocol, PyBytes_FromStringAndSize(data, n))
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self.fatal_error(exc, "Fatal error: protocol.data_received() call failed.")

    cdef hold(self, const char *data, size_t n):
        held = self.held_input()
        held += PyBytes_FromStringAndSize(data, n)

    cdef bytearray held_input(self):
        """The input held while reading is paused, made (empty) when there is none yet."""
        cdef RareState rare = self.rare_state()
        if rare.held is None:
            rare.held = bytearray()
            self.input_held = True
        return rare.held

    cdef frame_lines(self, const char *data, size_t n):
        """Calls line_received for each complete line; keeps an incomplete one in C."""
        cdef Conn *c = self.conn()
        cdef LineCursor cur
        cdef const char *line
        cdef size_t length
        cdef int found
        line_cursor_init(&cur, data, n)
        while True:
            found = next_line(c, &cur, self.reactor.core.max_line, &line, &length)
            if found == LINE_TOO_LONG:
                self.close()
            elif found == LINE_NOMEM:
                self.force_close(_errno_exception(ENOMEM), True)
            if found != LINE_FOUND:
                return
            obj = PyBytes_FromStringAndSize(line, length)
            free(cur.joined)
            cur.joined = NULL
            self.protocol.line_received(obj)
            c = self.conn()
            if c is NULL or self.closing:
                return
            if c.flags & C_READ_PAUSED and cur.pos < cur.n:
                self.hold(data + cur.pos, n - cur.pos)
                return

    cdef read_into_buffer(self):
        """A BufferedProtocol's input: the socket is read straight into get_buffer()."""
        cdef Conn *c = self.conn()
        cdef Py_buffer view
        cdef ssize_t n
        if c is NULL or self.closing or c.flags & C_READ_PAUSED:
            return
        try:
            buf = self.protocol.get_buffer(-1)
            if not len(buf):
                raise RuntimeError("get_buffer() returned an empty buffer")
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self.fatal_error(exc, "Fatal error: protocol.get_buffer() call failed.")
            return
        # get_buffer() may have closed or paused the stream, and a closed fd's number may
        # be another socket's by now: read only from this stream, still open and reading.
        c = self.conn()
        if c is NULL or self.closing or c.flags & C_READ_PAUSED:
            return
        try:
            PyObject_GetBuffer(buf, &view, PyBUF_WRITABLE)
        except BaseException as exc:  # read-only or not contiguous: as asyncio's recv_into()
            self.fatal_error(exc, "Fatal read error on socket transport")
            return
        n = kq_recv(self.fd, view.buf, view.len)
        PyBuffer_Release(&view)
        if n > 0:
            self.reactor.core.bytes_in += n
            touch(&self.reactor.core, self.fd)
            try:
                self.protocol.buffer_updated(n)
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:
                self.fatal_error(exc, "Fatal error: protocol.buffer_updated() call failed.")
        elif n == 0 and c.error:
            self.force_close(_errno_exception(c.error), True)
        elif n == 0:
            c.flags |= C_EOF
            set_mask(&self.reactor.core, self.fd, c.mask & ~KQ_READABLE)
            self.eof()
        elif not kq_retry_later(errno):
            self.force_close(_errno_exception(errno), True)

    cdef eof(self):
        """The peer finished sending: a LineProtocol's last line without a newline first,
        then eof_received(); a false answer closes, as asyncio does."""
        cdef Conn *c = self.conn()
        cdef Buffer *p
        if c is NULL or self.closing:
            return
        if self.input_held or c.flags & C_READ_PAUSED:
            self.held_eof = True
            self.held_input()  # what deliver_held() waits for, even with no bytes held
            return
        try:
            p = c.partial
            if p is not NULL and c.flags & C_LINE:
                c.partial = NULL
                line = PyBytes_FromStringAndSize(buf_data(p) + p.start, p.end - p.start)
                free(p)
                self.protocol.line_received(line)
                if self.conn() is NULL or self.closing:
                    return
            keep_open = self.protocol.eof_received()
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self.fatal_error(exc, "Fatal error: protocol.eof_received() call failed.")
            return
        if not keep_open:
            self.close()

    # ---- closing ----------------------------------------------------------------------

    cdef close(self):
        """Stops reading, flushes what is queued, then closes; connection_lost(None)
        follows."""
        cdef Conn *c
        self.check_thread()
        if self.closing:
            return
        c = self.conn()
        if c is not NULL and c.flags & C_LOST:
            self.force_close(None, False)  # it failed in this batch: that is what it reports
            return
        if c is not NULL and self.protocol_paused and not (c.flags & C_WRITE_PAUSED):
            # This iteration's nogil pass drained the buffer under the low-water mark and the
            # resume_writing() it owes is still in the batch.  asyncio flushes in a callback,
            # so there the protocol hears it before this close(), and may write its last
            # bytes then (a TLS close_notify): so here too.
            self.resume_protocol()
            if self.closing:
                return
            c = self.conn()
        self.closing = True
        if c is NULL:
            return
        c.flags |= C_CLOSING
        if c.flags & C_SERVED:
            # kqfast.Server's streams close as its native ones do (core/output.pxi): the
            # flush has an idle period of its own, then the core lingers on its own.
            timer_push(&self.reactor.core, self.fd, T_IDLE)
        if c.out is NULL:
            self.end(True, False)
            self.reactor.loop.call_soon(self.call_connection_lost, None, context=self.context)
        elif set_mask(&self.reactor.core, self.fd, KQ_WRITABLE) < 0:
            self.force_close(_errno_exception(errno), True)

    cdef flushed_after_close(self):
        """The output queued before close() is out; unless more was written since (asyncio
        takes writes until the flush ends), which the next drain ends with.
        connection_lost(None) follows, as a callback of its own (as asyncio's, an error in it
        goes to the exception handler)."""
        cdef Conn *c = self.conn()
        if c is not NULL and c.out is not NULL:
            return
        self.end(True, False)
        self.reactor.loop.call_soon(self.call_connection_lost, None, context=self.context)

    cdef bint loses_output(self):
        """A kqfast.Server stream ending now would cut output still in our buffer: it ends
        with a reset, or the peer could take a cut reply for a whole one."""
        cdef Conn *c = self.conn()
        return c is not NULL and c.flags & C_SERVED and c.out is not NULL

    cdef fatal_error(self, exc, message):
        """A protocol callback raised: reported, then the stream closes at once, queued
        output dropped, as asyncio's transport does (a close, not a reset)."""
        if not isinstance(exc, OSError):
            self.report(exc, message)
        self.force_close(exc, False)

    cdef report(self, exc, message):
        self.reactor.loop.call_exception_handler({"message": message, "exception": exc,
                                          "transport": self.transport,
                                          "protocol": self.protocol})

    cdef force_close(self, exc, bint reset):
        """Ends the stream now, dropping queued output; connection_lost(exc) follows (a
        stream that failed in the nogil pass reports that failure, whatever ends it)."""
        cdef Conn *c = self.conn()
        if self.ended:
            return
        if c is not NULL and c.flags & C_LOST:
            exc = _errno_exception(c.error)
        self.closing = True
        self.end(False, reset)
        self.reactor.loop.call_soon(self.call_connection_lost, exc, context=self.context)

    cdef end(self, bint graceful, bint reset):
        """The fd stops being this stream's: closed (with a reset if asked), or for
        kqfast.Server's streams closed gracefully by the core on its own (shut down,
        linger)."""
        cdef Conn *c
        if self.conn() is NULL:
            self.ended = True
            return
        # Names stay known after the close, as asyncio's transports know them.
        extra_info(self, "sockname", None)
        extra_info(self, "peername", None)
        self.ended = True
        if self.tls is not None:
            self.tls.detach()
        if self.rare is not None and self.rare.sock is not None:
            self.rare.sock.detach()  # the socket object must never close a number it lost
        c = self.conn()
        c.transport = NULL
        c.flags &= ~(C_PY | C_LINE | C_BUFFERED)
        if not (graceful and c.flags & C_SERVED and shut_write_side(&self.reactor.core, self.fd)):
            close_now(&self.reactor.core, self.fd, reset)
        if self.reactor.holds_handles:
            Py_DECREF(self)  # the table's reference

    def __del__(self):
        """Collected with its stream open (its loop closed, or dropped, without closing it):
        a ResourceWarning, and the fd closes with a FIN, as asyncio's transport closes its
        socket.  What was still in kqfast's buffer is dropped, as asyncio drops its own."""
        if self.reactor is None or self.conn() is NULL:
            return
        _warnings.warn(f"unclosed transport <kqfast.Transport fd={self.fd}>",
                       ResourceWarning, source=self.transport)
        self.closing = True
        self.end(False, False)

    def call_connection_lost(self, exc):
        try:
            if self.protocol_connected:
                self.protocol.connection_lost(exc)
        finally:
            self.protocol = self.data_received = None
            if self.server is not None:
                if _ATTACH_TAKES_TRANSPORT:
                    self.server._detach(self.transport)
                else:
                    self.server._detach()
                self.server = None
