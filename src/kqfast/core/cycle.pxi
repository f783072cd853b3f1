# The cycle, all without the GIL: wait, handle the batch's events, serve the listeners and
# inboxes, expire timers.  A native server repeats it until Python has work (a thread-safe
# call, a signal, the stop); an asyncio loop runs it once per iteration.


cdef int poll_once(LoopCore *L, int timeout_ms) noexcept nogil:
    """One wait and what it brought; returns the number of events, or -1 when the wait
    failed (errno says why).  An asyncio loop calls it only at or under the records' soft
    cap (Reactor.wait), so the reserve above it holds a whole batch's."""
    cdef int n, due = wait_ms(L)
    if due >= 0 and (timeout_ms < 0 or due < timeout_ms):
        timeout_ms = due
    n = kq_poller_poll(L.poller, EVENT_CAP, timeout_ms)
    set_clock(L)  # the wake's one clock read: every stamp and deadline uses it
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


cdef inline void handle_events(LoopCore *L, int n) noexcept nogil:
    """The poll's n events, each decoded where the kernel wrote it, then the batch's end.
    Inline, with the poller's wait and decoder: one frame for the whole wake."""
    cdef kq_poller *p = L.poller
    cdef kq_event ev
    cdef int i
    for i in range(n):
        ev = kq_poller_event(p, i)
        # The hot path, tested first so that the compiler can merge the test into the
        # decoder's own: plain input.
        if ev.mask == KQ_READABLE and ev.err == 0:
            on_input_event(L, ev.fd)
        else:
            handle_event(L, ev)
    end_batch(L)


cdef inline void on_input_event(LoopCore *L, int fd) noexcept nogil:
    """Plain readability: a native stream in its ordinary state reads at once.  (Kept this
    small: GCC inlines it, and read_native in it, into the wake.)"""
    cdef Conn *c
    if <unsigned int>fd < <unsigned int>L.nconns:
        c = &L.conns[<unsigned int>fd]
        if c.kind == K_STREAM and not (c.flags & C_NOT_PLAIN):
            read_native(L, c, fd)
            return
    on_other_input(L, fd)


cdef void on_other_input(LoopCore *L, int fd) noexcept nogil:
    """Plain readability of anything else: a Python stream in its ordinary state reads
    for the Python pass at once; the rest goes by its entry's kind."""
    cdef kq_event ev
    if (<unsigned int>fd < <unsigned int>L.nconns and L.conns[fd].kind == K_STREAM
            and L.conns[fd].flags & C_NOT_PLAIN == C_PY):
        read_for_python(L, fd)
        return
    ev.fd, ev.mask, ev.err = fd, KQ_READABLE, 0
    handle_event(L, ev)


cdef void handle_event(LoopCore *L, kq_event ev) noexcept nogil:
    """Routes one event by its table entry's kind."""
    # One unsigned comparison drops the poller's own entries (fd -1) and fds off the table.
    if <unsigned int>ev.fd >= <unsigned int>L.nconns:
        return
    if L.conns[ev.fd].kind == K_STREAM:
        on_stream_event(L, ev.fd, ev.mask, ev.err)
    else:
        on_entry_event(L, ev)


cdef void on_stream_event(LoopCore *L, int fd, int mask, int err) noexcept nogil:
    cdef Conn *c = &L.conns[fd]
    if mask & KQ_ERROR:
        fail(L, fd, err)
        return
    if mask & KQ_READABLE:
        on_readable(L, fd, err)
    if mask & KQ_WRITABLE and c.kind == K_STREAM and c.mask & KQ_WRITABLE:
        if err and not (mask & KQ_READABLE) and not (c.flags & C_LOST):
            # kqueue's write filter at EV_EOF with the socket's error: a send now would only
            # answer EPIPE, libkqueue having cleared the error to report it.
            fail(L, fd, err)
        else:
            on_writable(L, fd)


cdef void on_entry_event(LoopCore *L, kq_event ev) noexcept nogil:
    """An event for a fd that is not a stream: a listener, an inbox, one of the selector's,
    the signal socket; or one closed earlier in this batch (K_FREE), whose stale event is
    dropped."""
    cdef Conn *c = &L.conns[ev.fd]
    if c.kind == K_LISTENER or c.kind == K_INBOX:
        if ev.mask & KQ_ERROR:
            L.n_errors += 1  # a refused change: never readiness
        else:
            L.sources[L.nsources] = ev.fd
            L.nsources += 1
    elif c.kind == K_WATCHED:
        # An error is reported as readiness both ways: the callbacks find it when they
        # read or write, as with the standard library's selectors.
        L.watched[L.nwatched] = ev
        if ev.mask & KQ_ERROR:
            L.watched[L.nwatched].mask = c.mask
        elif ev.err:
            c.error = ev.err  # see Reactor.take_error
        L.nwatched += 1
    elif c.kind == K_SIGNAL:
        while recv(ev.fd, L.rbuf, READ_CHUNK, 0) > 0:
            pass
        L.signal_pending = 1


cdef inline void end_batch(LoopCore *L) noexcept nogil:
    # Accept after the batch: a fd closed above may come back at once as a new client, and
    # the batch's stale events for the old one must not reach it.
    if L.nsources:
        serve_sources(L)
    if L.now >= L.next_expiry:
        expire_timers(L)


cdef void end_all(LoopCore *L) noexcept nogil:
    """A stop's deadline: every stream of the core ends now.  A reset is the last resort,
    for those with output still in our buffer, or that were being served; a lingering
    stream's output is all with the kernel, which delivers it after a close (a FIN)."""
    cdef int fd
    for fd in range(L.top):
        if L.conns[fd].kind == K_STREAM:
            close_now(L, fd, not (L.conns[fd].flags & C_LINGER))


cdef inline bint owes_nothing(LoopCore *L, int fd) noexcept nogil:
    """An idle stream at shutdown: nothing queued here, nothing unread, unsent or
    unacknowledged in the kernel.  Closing it at once loses nothing and sends a FIN: there is
    no output to linger for."""
    return L.conns[fd].out is NULL and kq_socket_quiet(fd)


cdef void begin_stop(LoopCore *L) noexcept nogil:
    """Graceful shutdown of a native server: stop accepting, then close every connection,
    at once when it owes its peer nothing, otherwise gracefully."""
    cdef int fd
    L.stopping = 1
    if L.stop_deadline < L.next_expiry:
        L.next_expiry = L.stop_deadline  # the wait must end by then
    close_sources(L)
    for fd in range(L.top):
        if L.conns[fd].kind == K_STREAM and not (L.conns[fd].flags & C_CLOSING):
            if owes_nothing(L, fd):
                close_now(L, fd, False)
            else:
                begin_close(L, fd)
