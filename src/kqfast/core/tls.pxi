# TLS streams in the nogil pass: a read of ciphertext goes into the stream's OpenSSL
# connection, complete records come out as plaintext (for the native handlers, or for the
# Python pass as a record), and the records OpenSSL makes (handshake flights, tickets,
# replies, close_notify) go to the socket through the stream's ordinary output path.  The
# OpenSSL calls themselves are in tls.c.  A native server's streams do everything here; an
# asyncio stream's TLS state machine is asyncio's own (tls_link.pxi), which lets this pass
# decrypt only while it says so (KQ_TLS_DECRYPT).

cdef enum:
    TLS_OUT_CHUNK = 65536       # L.tls_out's size: records leave wbio through it


cdef void read_tls(LoopCore *L, Conn *c, int fd) noexcept nogil:
    """One read of a TLS stream's ciphertext (EOF and errors as a plain stream's), fed to
    its OpenSSL connection, then decrypted for whoever serves the stream."""
    cdef ssize_t n
    if c.flags & C_PY and (ARENA_SIZE - L.arena_used < ARENA_MIN_ROOM or
                           L.nrecords >= RECORD_SOFT_CAP):
        return  # level-triggered: the rest is read after this batch is dispatched
    n = kq_recv(fd, L.rbuf, READ_CHUNK)
    if n <= 0:
        read_ended(L, fd, n)
        return
    L.bytes_in += n
    touch(L, fd)
    if kq_tls_feed(c.tls, L.rbuf, n) < 0:
        fail(L, fd, ENOMEM)
    elif c.flags & C_PY:
        decrypt_for_python(L, c, fd)
    else:
        decrypt_native(L, c, fd)


cdef void decrypt_for_python(LoopCore *L, Conn *c, int fd) noexcept nogil:
    """While asyncio's state machine allows it, the plaintext goes straight to the batch's
    arena for the app protocol (a TLS data record); anything else (the handshake, a
    close_notify, a failure, no room) is a record for the Python pass, where asyncio's
    SSLProtocol takes the step itself, on the same OpenSSL connection."""
    cdef kq_tls *t = c.tls
    cdef size_t got = 0
    cdef int result, err
    if not (t.flags & KQ_TLS_DECRYPT):
        record(L, fd, R_TLS_INPUT, 0, 0, 0)
        return
    result = kq_tls_read(t, L.arena + L.arena_used, ARENA_SIZE - L.arena_used, &got)
    if t.flags & KQ_TLS_SEND:  # what reading made (a key update's answer, say) goes now
        err = send_records(L, c, fd)
        if err > 0:
            fail(L, fd, err)
            return
    if result == KQ_TLS_FAILED:
        # As asyncio's read loop, which raises before it delivers what it read.
        record(L, fd, R_TLS_FAILED, 0, 0, 0)
        return
    if got:
        record(L, fd, R_TLS_DATA, 0, L.arena_used, got)
        L.arena_used += got
    if result != KQ_TLS_DONE:
        record(L, fd, R_TLS_INPUT, 0, 0, 0)


cdef void decrypt_native(LoopCore *L, Conn *c, int fd) noexcept nogil:
    """A native server's TLS stream: handshake, then plaintext for the echo handlers, from
    the loop's read buffer (the ciphertext in it has been fed already).  A close_notify is
    the peer's EOF; a failure (a bad handshake, a corrupt record) sends OpenSSL's alert and
    closes."""
    cdef size_t got
    cdef int result, err
    cdef uint32_t gen = c.gen
    while True:
        got = 0
        result = kq_tls_read(c.tls, L.rbuf, READ_CHUNK, &got)
        err = send_records(L, c, fd)
        if err > 0:
            fail(L, fd, err)
            return
        if got:
            if L.handler == H_ECHO:
                echo_bytes(L, c, fd, L.rbuf, got)
            else:
                echo_lines(L, fd, L.rbuf, got)
            if c.gen != gen or c.flags & (C_CLOSING | C_READ_PAUSED):
                return  # closed, closing, or over high water: the rest waits in OpenSSL
        if result != KQ_TLS_FULL:
            break
    if result == KQ_TLS_CLOSED:
        on_eof(L, fd)
    elif result == KQ_TLS_FAILED:
        L.n_errors += 1
        close_now(L, fd, False)  # the alert is sent or queued: a FIN after it


cdef int emit_tls(LoopCore *L, Conn *c, int fd, const char *data, size_t n) noexcept nogil:
    """emit() for a TLS stream: data encrypted, then its records sent or queued."""
    if kq_tls_write(c.tls, data, n) != KQ_TLS_DONE:
        # (A native stream's handshake is done before it has plaintext to echo, and Python's
        # ssl refuses renegotiation: only a broken connection lands here.)
        return EPROTO
    return send_records(L, c, fd)


cdef int send_records(LoopCore *L, Conn *c, int fd) noexcept nogil:
    """Sends (or queues) every record OpenSSL has made for the peer; returns SENT, QUEUED or
    an errno."""
    cdef size_t n
    cdef int result = SENT
    while True:
        n = kq_tls_take_out(c.tls, L.tls_out, TLS_OUT_CHUNK)
        if n:
            result = send_or_queue(L, c, fd, L.tls_out, n)
            if result > 0:
                return result
        if n < TLS_OUT_CHUNK:
            return result  # a memory BIO gives all it has


cdef void close_notify(LoopCore *L, Conn *c, int fd) noexcept nogil:
    """A native TLS stream's graceful close begins with close_notify, queued behind what is
    owed."""
    cdef int err
    kq_tls_close_notify(c.tls)
    err = send_records(L, c, fd)
    if err > 0:
        fail(L, fd, err)


cdef void tls_forget(Conn *c) noexcept nogil:
    """The stream closes: a native server's OpenSSL connection is freed; an asyncio stream's
    belongs to Python's ssl objects, which stay."""
    if c.tls.flags & KQ_TLS_OWNED:
        kq_tls_release(c.tls)
        free(c.tls)
    c.tls = NULL
    c.flags &= ~C_TLS


cdef int accept_tls(LoopCore *L, int fd) noexcept nogil:
    """A native TLS server's new stream gets its OpenSSL connection; -1 when out of memory."""
    cdef Conn *c = &L.conns[fd]
    c.tls = <kq_tls *>malloc(sizeof(kq_tls))
    if c.tls is NULL:
        return -1
    if kq_tls_accept(c.tls, L.tls_ctx) < 0:
        free(c.tls)
        c.tls = NULL
        return -1
    c.flags |= C_TLS
    return 0
