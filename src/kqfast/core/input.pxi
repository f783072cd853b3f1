# Input: one read per readiness event, into the loop's buffer for the native handlers or into
# the batch's arena for Python (a record says where; a BufferedProtocol's read waits for the
# Python pass and its get_buffer()); EOF is acted on only once the socket has nothing more
# to read.


cdef void on_readable(LoopCore *L, int fd, int hangup_err) noexcept nogil:
    """Input in general (the cycle takes plain input of a native stream to read_native
    directly).  hangup_err: the socket error a kqueue EV_EOF carried.  libkqueue fetches it
    with SO_ERROR, which clears it, so recv() would report a plain EOF for a reset: it is
    kept until the input ends."""
    cdef Conn *c = &L.conns[fd]
    cdef ssize_t n
    if hangup_err:
        c.error = hangup_err
    if c.flags & C_LINGER:
        # Discard what the peer still sends until it closes; its data has no reader.
        n = kq_recv(fd, L.rbuf, READ_CHUNK)
        if n == 0 or (n < 0 and not kq_retry_later(errno)):
            close_now(L, fd, False)
        return
    if c.flags & (C_CLOSING | C_READ_PAUSED | C_LOST):
        return
    if c.flags & C_TLS:
        read_tls(L, c, fd)
        return
    if c.flags & C_BUFFERED:
        # The protocol's own buffer is the destination: the Python pass reads.
        if L.nrecords < RECORD_SOFT_CAP:
            record(L, fd, R_READABLE, 0, 0, 0)
        return
    if not (c.flags & C_PY):
        read_native(L, c, fd)
        return
    read_for_python(L, fd)


cdef void read_for_python(LoopCore *L, int fd) noexcept nogil:
    """One read into the batch's arena, for the Python pass (a data record)."""
    cdef ssize_t n
    cdef size_t room
    if ARENA_SIZE - L.arena_used < ARENA_MIN_ROOM or L.nrecords >= RECORD_SOFT_CAP:
        return  # level-triggered: the rest is read after this batch is dispatched
    room = ARENA_SIZE - L.arena_used
    if room > READ_CHUNK:
        room = READ_CHUNK
    n = kq_recv(fd, L.arena + L.arena_used, room)
    if n > 0:
        L.bytes_in += n
        touch(L, fd)
        record(L, fd, R_DATA, 0, L.arena_used, n)
        L.arena_used += n
    else:
        read_ended(L, fd, n)


cdef inline void read_native(LoopCore *L, Conn *c, int fd) noexcept nogil:
    """One read into the loop's buffer, for the native handler to echo from.  c: fd's entry
    (passed along the hot path: after each call into libc it would be looked up again), on
    the idle list or on none: no native stream is on another before it closes."""
    cdef ssize_t n = kq_recv(fd, L.rbuf, READ_CHUNK)
    if n > 0:
        L.bytes_in += n
        touch_idle(L, c, fd)
        if L.handler == H_ECHO:
            echo_bytes(L, c, fd, L.rbuf, n)
        else:
            echo_lines(L, fd, L.rbuf, n)
    else:
        read_ended(L, fd, n)


cdef void read_ended(LoopCore *L, int fd, ssize_t n) noexcept nogil:
    """recv() gave n <= 0: the end of the input (a reset when the hang-up said so), or not
    yet, or a failure."""
    cdef Conn *c = &L.conns[fd]
    if n == 0 and c.error:
        fail(L, fd, c.error)
    elif n == 0:
        on_eof(L, fd)
    elif not kq_retry_later(errno):
        fail(L, fd, errno)


cdef void on_eof(LoopCore *L, int fd) noexcept nogil:
    cdef Conn *c = &L.conns[fd]
    cdef Buffer *p = c.partial
    cdef int err
    c.flags |= C_EOF
    if c.flags & C_PY:
        # Level-triggered EOF stays readable forever: stop listening for it.
        if set_mask(L, fd, c.mask & ~KQ_READABLE) < 0:
            fail(L, fd, errno)
            return
        record(L, fd, R_EOF, 0, 0, 0)
        return
    # A native stream stops reading in begin_close, which leaves write interest only, or
    # none: interest changes once, not through a removal and an add.
    if p is not NULL:
        # A last line without its newline is still echoed: no byte is dropped at EOF.
        c.partial = NULL
        if not is_blank(buf_data(p) + p.start, p.end - p.start):
            err = emit(L, c, fd, buf_data(p) + p.start, p.end - p.start)
            if err > 0:
                free(p)
                fail(L, fd, err)
                return
        free(p)
    begin_close(L, fd)
