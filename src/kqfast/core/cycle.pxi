# The cycle, all without the GIL: wait, handle the batch's events, accept, expire timers; it
# returns to the Python pass only when there is work for Python or the loop is done.


cdef void run_native(LoopCore *L) noexcept nogil:
    cdef int n
    while True:
        if kq_load(&L.stop_requested) and not L.stopping:
            begin_stop(L)
            if L.handler == H_PROTOCOL:
                return  # the Python pass closes the transports
        if L.stopping and (L.n_current == 0 or L.now >= L.stop_deadline):
            L.finished = 1
            return
        # Callbacks already scheduled must not wait for I/O: poll without blocking.
        n = kq_poller_wait(L.poller, L.events, EVENT_CAP,
                           0 if kq_load(&L.calls_pending) else next_timeout_ms(L))
        L.now = kq_monotonic()
        if n < 0:
            if errno != EINTR:
                L.wait_errno = errno
                L.wait_failures += 1
            L.signal_pending = 1
            return
        L.wait_failures = 0
        handle_events(L, n)
        if L.nrecords or L.signal_pending or kq_load(&L.calls_pending):
            return


cdef void handle_events(LoopCore *L, int n) noexcept nogil:
    cdef int i, fd, mask
    cdef bint accept_ready = False, inbox_ready = False
    for i in range(n):
        fd = L.events[i].fd
        mask = L.events[i].mask
        if fd == L.listen_fd:
            accept_ready = True
            continue
        if fd == L.inbox_r:
            inbox_ready = True
            continue
        if fd == L.signal_fd:
            while recv(fd, L.rbuf, READ_CHUNK, 0) > 0:
                pass
            L.signal_pending = 1
            continue
        if fd < 0 or fd >= L.nconns or not (L.conns[fd].flags & C_OPEN):
            continue  # closed earlier in this batch: its stale events are dropped
        if mask & KQ_ERROR:
            fail(L, fd, L.events[i].err)
            continue
        if mask & KQ_READABLE:
            on_readable(L, fd, L.events[i].err)
        if mask & KQ_WRITABLE and L.conns[fd].flags & C_OPEN and L.conns[fd].mask & KQ_WRITABLE:
            on_writable(L, fd)
    # Accept after the batch: a fd closed above may come back at once as a new client, and
    # the batch's stale events for the old one must not reach it.
    if accept_ready and L.listen_fd >= 0:
        accept_batch(L)
    if inbox_ready:
        admit_inbox(L)
    expire_timers(L)


cdef void begin_stop(LoopCore *L) noexcept nogil:
    """Graceful shutdown: stop accepting, then close every connection gracefully."""
    cdef int fd
    L.stopping = 1
    close_listener(L)
    for fd in range(L.nconns):
        if L.conns[fd].flags & C_OPEN and not (L.conns[fd].flags & (C_CLOSING | C_PY)):
            begin_close(L, fd)
