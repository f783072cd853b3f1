# Python protocols on the nogil loop: the Transport handed to connection_made (asyncio's
# transport interface over one C connection) and LineProtocol, whose lines are framed in C.
import asyncio as _asyncio


class LineProtocol(_asyncio.Protocol):
    """An asyncio.Protocol whose input is framed into lines in C: line_received(line) gets
    each complete line with its b"\\n" (and a last line without one at EOF).  A line longer
    than the server's max_line closes the connection."""

    def line_received(self, line):
        pass


cdef object _errno_exception(int err):
    return OSError(err, _os.strerror(err))


@cython.final
cdef class Transport:
    """asyncio's transport interface over one C connection of a Loop."""
    cdef Loop loop
    cdef int fd
    cdef uint32_t gen
    cdef readonly object protocol
    cdef size_t high_water, low_water
    cdef list stash  # data that arrived while reading was paused

    def __init__(self):
        raise TypeError("transports are made by the server")

    cdef inline Conn *conn(self) noexcept:
        """The connection while this transport is attached to it; NULL once closed (a
        closed connection may linger in C, detached, until the peer finishes)."""
        cdef Conn *c = live(&self.loop.core, self.fd, self.gen)
        if c is NULL or c.transport != <PyObject *>self:
            return NULL
        return c

    # -- writing --

    def write(self, data):
        """Sends at once what the socket takes; queues the rest."""
        cdef Conn *c = self.conn()
        cdef Py_buffer view
        cdef ssize_t sent = 0
        cdef size_t size
        if c is NULL or c.flags & (C_CLOSING | C_LOST):
            return
        if c.flags & C_WRITE_EOF:
            raise RuntimeError("cannot call write() after write_eof()")
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            if view.len == 0:
                return
            if c.out is NULL:
                sent = kq_send(self.fd, view.buf, view.len)
                if sent < 0:
                    if not kq_retry_later(errno):
                        lose(self.loop, self.fd, _errno_exception(errno), True)
                        return
                    sent = 0
                self.loop.core.bytes_out += sent
                if sent == view.len:
                    return
            c.out = buf_append(c.out, <char *>view.buf + sent, view.len - sent)
        finally:
            PyBuffer_Release(&view)
        if c.out is NULL or set_mask(&self.loop.core, self.fd, c.mask | KQ_WRITABLE) < 0:
            lose(self.loop, self.fd, _errno_exception(ENOMEM if c.out is NULL else errno), True)
            return
        size = c.out.end - c.out.start
        if size > self.loop.core.max_output:
            lose(self.loop, self.fd, OSError(ENOBUFS, f"output buffer over max_output "
                                               f"({self.loop.core.max_output} bytes): the peer "
                                               f"does not read"), True)
        elif size >= self.high_water and not (c.flags & C_WRITE_PAUSED):
            c.flags |= C_WRITE_PAUSED
            self.protocol.pause_writing()

    def writelines(self, list_of_data):
        self.write(b"".join(list_of_data))

    def write_eof(self):
        """Shuts down the write side once the queued output has been sent."""
        cdef Conn *c = self.conn()
        if c is NULL or c.flags & (C_CLOSING | C_WRITE_EOF):
            return
        c.flags |= C_WRITE_EOF
        if c.out is NULL:
            shutdown(self.fd, SHUT_WR)
            c.flags |= C_WRITE_SHUT

    def can_write_eof(self):
        return True

    def get_write_buffer_size(self):
        cdef Conn *c = self.conn()
        return 0 if c is NULL else buf_len(c.out)

    def set_write_buffer_limits(self, high=None, low=None):
        if high is None:
            high = 64 * 1024 if low is None else 4 * low
        if low is None:
            low = high // 4
        if not high >= low >= 0:
            raise ValueError(f"high ({high!r}) must be >= low ({low!r}) must be >= 0")
        self.high_water, self.low_water = high, low
        cdef Conn *c = self.conn()
        if c is not NULL:
            c.low_water = <uint32_t>min(low, 0xFFFFFFFF)

    def get_write_buffer_limits(self):
        return (self.low_water, self.high_water)

    # -- reading --

    def pause_reading(self):
        cdef Conn *c = self.conn()
        if c is NULL or c.flags & (C_READ_PAUSED | C_CLOSING):
            return
        c.flags |= C_READ_PAUSED
        set_mask(&self.loop.core, self.fd, c.mask & ~KQ_READABLE)

    def resume_reading(self):
        cdef Conn *c = self.conn()
        if c is NULL or not (c.flags & C_READ_PAUSED):
            return
        c.flags &= ~C_READ_PAUSED
        if not (c.flags & (C_EOF | C_CLOSING)):
            set_mask(&self.loop.core, self.fd, c.mask | KQ_READABLE)
        if self.stash:
            stash, self.stash = self.stash, None
            for data in stash:
                self.loop.ready.append((self.deliver, (data,)))
            kq_store(&self.loop.core.calls_pending, 1)

    def is_reading(self):
        cdef Conn *c = self.conn()
        return c is not NULL and not (c.flags & (C_READ_PAUSED | C_CLOSING | C_EOF))

    # -- closing --

    def close(self):
        """Stops reading, flushes the queued output, then closes; connection_lost(None)
        follows."""
        cdef Conn *c = self.conn()
        if c is NULL or c.flags & C_CLOSING:
            return
        c.flags |= C_CLOSING
        timer_push(&self.loop.core, self.fd, T_CLOSING)
        if c.out is NULL:
            detach(self.loop, self.fd, None)
        else:
            set_mask(&self.loop.core, self.fd, KQ_WRITABLE)

    def abort(self):
        """Closes at once with a reset, dropping queued output."""
        if self.conn() is not NULL:
            lose(self.loop, self.fd, None, True)

    def is_closing(self):
        cdef Conn *c = self.conn()
        return c is NULL or bool(c.flags & (C_CLOSING | C_LOST))

    def get_extra_info(self, name, default=None):
        import socket
        if self.conn() is NULL or name not in ("peername", "sockname", "socket"):
            return default
        if name == "socket":
            # A duplicate: the caller owns it, and closing it leaves the connection alone.
            return socket.fromfd(self.fd, self.loop.core.listen_family, socket.SOCK_STREAM)
        s = socket.socket(fileno=self.fd)
        try:
            return s.getpeername() if name == "peername" else s.getsockname()
        finally:
            s.detach()

    # -- inbound dispatch, called by the Loop's Python pass --

    cdef deliver(self, bytes data):
        cdef Conn *c = self.conn()
        if c is NULL or c.flags & C_CLOSING:
            return
        if c.flags & C_READ_PAUSED:
            if self.stash is None:
                self.stash = []
            self.stash.append(data)
        elif c.flags & C_LINE:
            self.frame_lines(data)
        else:
            self.protocol.data_received(data)

    cdef frame_lines(self, bytes data):
        """Calls line_received for each complete line; keeps an incomplete one in C."""
        cdef Conn *c = self.conn()
        cdef LineCursor cur
        cdef const char *line
        cdef size_t length
        cdef int found
        line_cursor_init(&cur, PyBytes_AS_STRING(data), len(data))
        while True:
            found = next_line(c, &cur, self.loop.core.max_line, &line, &length)
            if found == LINE_TOO_LONG:
                self.close()
            elif found == LINE_NOMEM:
                lose(self.loop, self.fd, _errno_exception(ENOMEM), True)
            if found != LINE_FOUND:
                return
            obj = PyBytes_FromStringAndSize(line, length)
            free(cur.joined)
            cur.joined = NULL
            self.protocol.line_received(obj)
            c = self.conn()
            if c is NULL or c.flags & C_CLOSING:
                return
            if c.flags & C_READ_PAUSED and cur.pos < cur.n:
                self.stash = [data[cur.pos:]]
                return

    cdef eof(self):
        cdef Conn *c = self.conn()
        cdef Buffer *p
        if c is NULL:
            return
        p = c.partial
        if p is not NULL and c.flags & C_LINE:
            c.partial = NULL
            line = PyBytes_FromStringAndSize(buf_data(p) + p.start, p.end - p.start)
            free(p)
            self.protocol.line_received(line)
            if self.conn() is NULL:
                return
        if not self.protocol.eof_received():
            self.close()
