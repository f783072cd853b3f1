# The Python pass: after each nogil cycle, the batch's records become protocol callbacks
# under one GIL acquisition.  A record whose connection closed meanwhile (an older
# generation) is skipped; a callback's exception closes its connection only.


cdef dispatch(Loop loop):
    cdef LoopCore *L = &loop.core
    cdef int i
    cdef Record *r
    cdef Conn *c
    cdef Transport t
    if L.signal_pending:
        L.signal_pending = 0
        try:
            PyErr_CheckSignals()
        except BaseException as exc:
            loop.pending_exc = exc
            return
    for i in range(L.nrecords):
        r = &L.records[i]
        c = live(L, r.fd, r.gen)
        if c is NULL:
            continue  # closed by an earlier callback of this batch
        if r.kind == R_MADE:
            made(loop, r.fd)
            continue
        if c.transport is NULL:
            continue
        t = <Transport>c.transport
        try:
            if r.kind == R_DATA:
                t.deliver(PyBytes_FromStringAndSize(L.arena + r.off, r.length))
            elif r.kind == R_EOF:
                t.eof()
            elif r.kind == R_RESUME:
                t.protocol.resume_writing()
            elif r.kind == R_CLOSED:
                detach(loop, r.fd, None)
            elif r.kind == R_LOST:
                lose(loop, r.fd, _errno_exception(r.err), False)
        except BaseException as exc:
            callback_failed(loop, t, exc)
    L.nrecords = 0
    L.arena_used = 0
    if L.stopping and L.handler == H_PROTOCOL and L.listen_fd < 0:
        close_transports(loop)
    run_ready(loop)


cdef made(Loop loop, int fd):
    cdef Conn *c = &loop.core.conns[fd]
    cdef Transport t = Transport.__new__(Transport)
    t.loop, t.fd, t.gen = loop, fd, c.gen
    t.high_water, t.low_water = loop.core.high_water, loop.core.low_water
    c.low_water = <uint32_t>min(t.low_water, 0xFFFFFFFF)
    try:
        t.protocol = loop.factory()
    except BaseException as exc:
        close_now(&loop.core, fd, True)
        callback_failed(loop, None, exc)
        return
    Py_INCREF(t)
    c.transport = <PyObject *>t
    if isinstance(t.protocol, LineProtocol):
        c.flags |= C_LINE
    try:
        t.protocol.connection_made(t)
    except BaseException as exc:
        callback_failed(loop, t, exc)


cdef detach(Loop loop, int fd, exc):
    """The protocol is done with a connection that closed cleanly: the C side finishes the
    close (shut down, linger) on its own, and connection_lost(None) follows."""
    cdef Conn *c = &loop.core.conns[fd]
    cdef Transport t = <Transport>c.transport
    c.transport = NULL
    c.flags &= ~(C_PY | C_LINE)
    Py_DECREF(t)
    loop.ready.append((t.protocol.connection_lost, (exc,)))
    timer_push(&loop.core, fd, T_CLOSING)
    finish_write_side(&loop.core, fd)


cdef lose(Loop loop, int fd, exc, bint reset):
    """Closes at once (a failure, an abort) and reports connection_lost(exc)."""
    cdef Conn *c = &loop.core.conns[fd]
    cdef Transport t = <Transport>c.transport
    c.transport = NULL
    c.flags &= ~(C_PY | C_LINE)
    Py_DECREF(t)
    close_now(&loop.core, fd, reset)
    loop.ready.append((t.protocol.connection_lost, (exc,)))


cdef callback_failed(Loop loop, Transport t, BaseException exc):
    """A handler raised: KeyboardInterrupt/SystemExit stop the loop and are re-raised by
    run(); anything else is logged and closes that connection only."""
    if isinstance(exc, (KeyboardInterrupt, SystemExit)):
        if loop.pending_exc is None:
            loop.pending_exc = exc
        return
    _log.error("kqfast: protocol callback failed; closing its connection", exc_info=exc)
    if t is not None and t.conn() is not NULL:
        lose(loop, t.fd, exc, True)


cdef close_transports(Loop loop):
    cdef LoopCore *L = &loop.core
    cdef int fd
    cdef Transport t
    for fd in range(L.nconns):
        if L.conns[fd].transport is not NULL and not (L.conns[fd].flags & C_CLOSING):
            t = <Transport>L.conns[fd].transport
            try:
                t.close()
            except BaseException as exc:
                callback_failed(loop, t, exc)


cdef run_ready(Loop loop):
    """Runs what was scheduled: connection_lost calls and call_soon_threadsafe()."""
    kq_store(&loop.core.calls_pending, 0)
    for _ in range(len(loop.ready)):
        callback, args = loop.ready.popleft()
        try:
            callback(*args)
        except BaseException as exc:
            callback_failed(loop, None, exc)
    if loop.ready:
        kq_store(&loop.core.calls_pending, 1)  # scheduled by the callbacks just run
