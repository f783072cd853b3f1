# Output and the close state machine: send at once what the socket takes, queue the rest
# behind write interest; a graceful close flushes, shuts the write side down, then lets the
# peer finish (lingers) before the fd is closed.  A close stays graceful for as long as the
# peer reads: the idle timeout, which counts its reading as activity, is what gives up on a
# peer that does not; once the peer has everything it has linger_timeout to close.  Only
# output still in our buffer is ever cut, with a reset; what the kernel took is never reset
# away.  Failures end here too.
from posix.unistd cimport close as c_close


cdef int flush(LoopCore *L, int fd) noexcept nogil:
    """Writes queued output; returns 0, or an errno when the connection failed."""
    cdef Conn *c = &L.conns[fd]
    cdef Buffer *b = c.out
    cdef ssize_t n
    while b is not NULL and b.end > b.start:
        n = kq_send(fd, buf_data(b) + b.start, b.end - b.start)
        if n < 0:
            if kq_retry_later(errno):
                break
            return errno
        b.start += n
        L.bytes_out += n
        touch(L, fd)
    if b is not NULL and b.end == b.start:
        free(b)
        c.out = NULL
    return 0


# What emit() did, when it did not fail (it then returns the errno, > 0).
cdef enum:
    SENT = 0            # all of it went out (or there was nothing): nothing is queued
    QUEUED = -1         # what the socket did not take waits in c.out


cdef inline int emit(LoopCore *L, Conn *c, int fd, const char *data, size_t n) noexcept nogil:
    """A native handler's output: sent or queued (encrypted first on a TLS stream); returns
    SENT, QUEUED or an errno (the connection failed).  c: fd's entry."""
    if c.tls is not NULL:
        return emit_tls(L, c, fd, data, n)
    return send_or_queue(L, c, fd, data, n)


cdef inline int send_or_queue(LoopCore *L, Conn *c, int fd, const char *data,
                              size_t n) noexcept nogil:
    """Sends at once when nothing is queued, queues the rest and asks for write readiness;
    returns SENT, QUEUED or an errno (the connection failed)."""
    cdef ssize_t sent
    if n == 0:
        return SENT
    if c.out is not NULL:
        return queue_output(L, c, fd, data, n, 0)
    sent = kq_send(fd, data, n)
    if sent == <ssize_t>n:
        L.bytes_out += n
        return SENT
    return queue_output(L, c, fd, data, n, sent)


cdef int queue_output(LoopCore *L, Conn *c, int fd, const char *data, size_t n,
                      ssize_t sent) noexcept nogil:
    """What the socket did not take of data waits in c.out behind write interest (sent:
    what send() returned, 0 when it was not called); returns QUEUED, or an errno."""
    if sent < 0:
        if not kq_retry_later(errno):
            return errno
        sent = 0
    L.bytes_out += sent
    c.out = buf_append(c.out, data + sent, n - sent)
    if c.out is NULL:
        return ENOMEM
    if set_conn_mask(L, c, fd, c.mask | KQ_WRITABLE) < 0:
        return errno
    return QUEUED


cdef void begin_close(LoopCore *L, int fd) noexcept nogil:
    """Graceful close of a native stream: stop taking input, flush, shut down the write
    side, then let the peer finish (closing with unread input would reset the connection
    and lose the output still in flight)."""
    cdef Conn *c = &L.conns[fd]
    if c.tls is not NULL:
        close_notify(L, c, fd)
        if c.kind != K_STREAM:
            return  # it failed
    c.flags |= C_CLOSING
    timer_push(L, fd, T_IDLE)  # the close has an idle period of its own
    if c.out is not NULL:
        set_mask(L, fd, KQ_WRITABLE)
    elif not shut_write_side(L, fd):
        close_now(L, fd, False)


cdef bint shut_write_side(LoopCore *L, int fd) noexcept nogil:
    """A closing stream's output is all with the kernel: shut the write side down and
    linger (input is discarded) while the peer takes what is owed; False when there is
    nothing to wait for (the peer has finished already) or no way to (the fd cannot be
    watched): the caller closes it (a FIN).  A Python stream is detached first: its
    protocol has had connection_lost(None), as asyncio's does once the socket has it all."""
    cdef Conn *c = &L.conns[fd]
    if c.flags & C_EOF:
        return False
    shutdown(fd, SHUT_WR)
    c.flags |= C_LINGER | C_WRITE_SHUT
    if set_mask(L, fd, KQ_READABLE) < 0:
        return False
    watch_unsent(L, fd)
    return True


cdef void watch_unsent(LoopCore *L, int fd) noexcept nogil:
    """A lingering stream's progress: the bytes the peer has yet to take, kept to compare
    with at its next deadline (in low_water, a Python transport's resume mark, which means
    nothing once the write side is shut).  None left: linger_timeout for the peer's close;
    else an idle period (none when the idle timeout is off: the peer's close ends it)."""
    cdef Conn *c = &L.conns[fd]
    cdef int unsent = kq_unsent(fd)
    if unsent <= 0:  # everything taken (or the system cannot tell)
        timer_push(L, fd, T_CLOSING)
    else:
        c.low_water = unsent
        timer_push(L, fd, T_IDLE)


cdef void closing_expired(LoopCore *L, int fd) noexcept nogil:
    """A closing stream's idle deadline.  With output still in our buffer, the peer took
    nothing for the idle timeout: the last resort is a reset (a Python protocol hears of it
    as connection_lost(TimeoutError)), or it would take the cut reply for a whole one.
    Lingering, it may have taken some from the kernel's meanwhile: then it lingers on; if
    not, it is closed (a FIN after what the kernel still holds: nothing is cut)."""
    cdef Conn *c = &L.conns[fd]
    if not (c.flags & C_LINGER):
        fail(L, fd, ETIMEDOUT)
    elif kq_unsent(fd) < <int>c.low_water:
        watch_unsent(L, fd)
    else:
        L.n_timeouts += 1
        close_now(L, fd, False)


cdef void fail(LoopCore *L, int fd, int err) noexcept nogil:
    """The connection failed (reset, broken pipe, out of memory)."""
    cdef Conn *c = &L.conns[fd]
    L.n_errors += 1
    if c.flags & C_PY:
        # The Python pass reports it with connection_lost(exc) and frees it.
        set_mask(L, fd, 0)
        timer_unlink(L, fd)
        c.flags |= C_LOST
        c.error = err
        record(L, fd, R_LOST, err, 0, 0)
    else:
        close_now(L, fd, True)


cdef void on_writable(LoopCore *L, int fd) noexcept nogil:
    cdef Conn *c = &L.conns[fd]
    cdef int err, mask
    if c.flags & C_LOST:
        return
    err = flush(L, fd)
    if err:
        fail(L, fd, err)
        return
    if c.flags & C_PY and c.flags & C_WRITE_PAUSED and buf_len(c.out) <= c.low_water:
        c.flags &= ~C_WRITE_PAUSED
        record(L, fd, R_RESUME, 0, 0, 0)
    if c.out is not NULL:
        return
    # Drained.  The interest moves to what comes next in one change, never through 0 (a
    # removal, then an add).
    if c.flags & C_CLOSING and not (c.flags & C_PY):
        if not shut_write_side(L, fd):
            close_now(L, fd, False)
        return
    mask = c.mask & ~KQ_WRITABLE
    if (c.flags & (C_READ_PAUSED | C_PY)) == C_READ_PAUSED:
        c.flags &= ~C_READ_PAUSED  # a native echo's backpressure is over
        mask |= KQ_READABLE
    if set_mask(L, fd, mask) < 0:
        fail(L, fd, errno)
    elif c.tls is not NULL and mask & KQ_READABLE and not (c.flags & C_PY):
        decrypt_native(L, c, fd)  # records read before the pause wait in OpenSSL, not the socket
    elif c.flags & C_CLOSING:
        record(L, fd, R_CLOSED, 0, 0, 0)
    elif c.flags & C_WRITE_EOF and not (c.flags & C_WRITE_SHUT):
        shutdown(fd, SHUT_WR)
        c.flags |= C_WRITE_SHUT
