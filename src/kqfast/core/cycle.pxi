# The cycle, all without the GIL: wait, handle the batch's events, serve the listeners and
# inboxes, expire timers.  A native server repeats it until Python has work (a thread-safe
# call, a signal, the stop); an asyncio loop runs it once per iteration.


cdef int poll_once(LoopCore *L, int timeout_ms) noexcept nogil:
    """One wait and what it brought; returns the wait's result (-1: errno says why)."""
    cdef int n, deadline = next_timeout_ms(L)
    if deadline >= 0 and (timeout_ms < 0 or deadline < timeout_ms):
        timeout_ms = deadline
    n = kq_poller_wait(L.poller, L.events, EVENT_CAP, timeout_ms)
    L.now = kq_monotonic()
    if n < 0:
        return -1
    handle_events(L, n)
    return n


cdef void run_native(LoopCore *L) noexcept nogil:
    """Serves until there is work for Python or the loop is done."""
    while True:
        if kq_load(&L.stop_requested) and not L.stopping:
            begin_stop(L)
        if L.stopping and (L.n_current == 0 or L.now >= L.stop_deadline):
            L.finished = 1
            return
        # Callbacks already scheduled must not wait for I/O: poll without blocking.
        if poll_once(L, 0 if kq_load(&L.calls_pending) else -1) < 0:
            if errno != EINTR:
                L.wait_errno = errno
                L.wait_failures += 1
            L.signal_pending = 1
            return
        L.wait_failures = 0
        if L.signal_pending or kq_load(&L.calls_pending):
            return


cdef void handle_events(LoopCore *L, int n) noexcept nogil:
    cdef int i, fd, mask
    cdef Conn *c
    for i in range(n):
        fd = L.events[i].fd
        mask = L.events[i].mask
        if fd < 0 or fd >= L.nconns:
            continue
        c = &L.conns[fd]
        if c.kind == K_STREAM:
            if mask & KQ_ERROR:
                fail(L, fd, L.events[i].err)
                continue
            if mask & KQ_READABLE:
                on_readable(L, fd, L.events[i].err)
            if mask & KQ_WRITABLE and c.kind == K_STREAM and c.mask & KQ_WRITABLE:
                on_writable(L, fd)
        elif c.kind == K_LISTENER or c.kind == K_INBOX:
            if mask & KQ_ERROR:
                L.n_errors += 1  # a refused change: never readiness
            else:
                L.sources[L.nsources] = fd
                L.nsources += 1
        elif c.kind == K_WATCHED:
            # An error is reported as readiness both ways: the callbacks find it when they
            # read or write, as with the standard library's selectors.
            L.watched[L.nwatched] = L.events[i]
            if mask & KQ_ERROR:
                L.watched[L.nwatched].mask = c.mask
            elif L.events[i].err:
                c.error = L.events[i].err  # see Reactor.take_error
            L.nwatched += 1
        elif c.kind == K_SIGNAL:
            while recv(fd, L.rbuf, READ_CHUNK, 0) > 0:
                pass
            L.signal_pending = 1
        # K_FREE: closed earlier in this batch, its stale events are dropped.
    # Accept after the batch: a fd closed above may come back at once as a new client, and
    # the batch's stale events for the old one must not reach it.
    serve_sources(L)
    expire_timers(L)


cdef void begin_stop(LoopCore *L) noexcept nogil:
    """Graceful shutdown of a native server: stop accepting, then close every connection
    gracefully."""
    cdef int fd
    L.stopping = 1
    close_sources(L)
    for fd in range(L.nconns):
        if L.conns[fd].kind == K_STREAM and not (L.conns[fd].flags & C_CLOSING):
            begin_close(L, fd)
