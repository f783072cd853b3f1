# The cycle, all without the GIL: wait, handle the batch's events, serve the listeners and
# inboxes, expire timers.  A native server repeats it until Python has work (a thread-safe
# call, a signal, the stop); an asyncio loop runs it once per iteration.


cdef int poll_once(LoopCore *L, int timeout_ms) noexcept nogil:
    """One wait and what it brought; returns the number of events, or -1 when the wait
    failed (errno says why).  An asyncio loop calls it only at or under the records' soft
    cap (Reactor.wait), so the reserve above it holds a whole batch's."""
    return serve_wakes(L, timeout_ms, False)


cdef void run_native(LoopCore *L) noexcept nogil:
    """Serves until there is work for Python or the loop is done."""
    cdef int n
    # Python has run since the last wake, for as long as it liked: L.now may be more than a
    # tick behind, so the next wake reads the clock (and ticks start again).
    L.ticking = L.clock_stale = 0
    while True:
        if kq_load(&L.stop_requested) and not L.stopping:
            begin_stop(L)
        if L.stopping and (L.n_current == 0 or L.now >= L.stop_deadline):
            L.finished = 1
            return
        # Callbacks already scheduled must not wait for I/O: poll without blocking.  In the
        # steady state, wake after wake brings only native streams' plain input (or nothing:
        # a deadline), and none of these checks can have changed in between: what changes
        # them comes as another event (a stop or a thread-safe call with the poller's
        # wake-up, a signal on its socket) or as a failed wait.
        if kq_load(&L.calls_pending):
            n = serve_wakes(L, 0, False)
        else:
            n = serve_wakes(L, -1, not L.stopping)
        if n < 0:
            if errno != EINTR:
                L.wait_errno = errno
                L.wait_failures += 1
            L.signal_pending = 1
            return
        L.wait_failures = 0
        if L.signal_pending or kq_load(&L.calls_pending):
            return


cdef int serve_wakes(LoopCore *L, int timeout_ms, bint while_plain) noexcept nogil:
    """Waits up to timeout_ms (-1: no limit; the poller's timer ends it at the nearest
    deadline) and handles what came; while_plain: again and again, until a wake brings
    anything but native streams' plain input.  Returns the last wake's number of events, or
    -1 when its wait failed (errno says why).  The one frame of a native server's steady
    state: the wait, the poller's decoder and the events' handling are all inline here,
    and a wake of plain input reads no clock once ticking (timers.pxi)."""
    cdef int n
    while True:
        n = kq_poller_poll(L.poller, EVENT_CAP, timeout_ms)
        if not L.ticking:
            set_clock(L)
            if while_plain:
                start_ticking(L)
        if n < 0:
            read_clock_for_wake(L)
            return -1
        if not (handle_events(L, n) and while_plain):
            return n


cdef inline bint handle_events(LoopCore *L, int n) noexcept nogil:
    """The poll's n events, each decoded where the kernel wrote it.  Inline, with the
    poller's wait and decoder: one frame for the whole wake.  True when every event was a
    native stream's plain input, each read at once; from the first other event on, the rest
    of the batch goes through handle_others."""
    cdef kq_poller *p = L.poller
    cdef kq_event ev
    cdef Conn *c
    cdef int i
    for i in range(n):
        ev = kq_poller_event(p, i)
        c = plain_input(L, ev)
        if c is NULL or c.flags & C_NOT_PLAIN:
            handle_others(L, i, n)
            return False
        read_native(L, c, ev.fd)
    return True


cdef inline Conn *plain_input(LoopCore *L, kq_event ev) noexcept nogil:
    """The entry of the stream when ev is its plain input (the hot path: tested first so
    that the compiler can merge the test into the decoder's own), else NULL.  In its
    ordinary state (no C_NOT_PLAIN flag) a native stream reads at once; so does a Python
    one with C_PY alone, for the Python pass."""
    cdef Conn *c
    if ev.mask == KQ_READABLE and ev.err == 0 and <unsigned int>ev.fd < <unsigned int>L.nconns:
        c = &L.conns[<unsigned int>ev.fd]
        if c.kind == K_STREAM:
            return c
    return NULL


cdef void handle_others(LoopCore *L, int i, int n) noexcept nogil:
    """Events i to n-1 of a batch that is not all native plain input, event i the first
    that is not, then the batch's end; the clock is read first."""
    cdef kq_poller *p = L.poller
    cdef kq_event ev
    cdef Conn *c
    read_clock_for_wake(L)
    for i in range(i, n):
        ev = kq_poller_event(p, i)
        c = plain_input(L, ev)
        if c is not NULL and not (c.flags & C_NOT_PLAIN):
            read_native(L, c, ev.fd)
        elif c is not NULL and c.flags & C_NOT_PLAIN == C_PY:
            read_for_python(L, ev.fd)
        else:
            # Decoded again: the common cases above then keep no copy of the event.
            handle_event(L, kq_poller_event(p, i))
    end_batch(L)
    L.clock_stale = L.ticking  # (the next wake's own)


cdef void handle_event(LoopCore *L, kq_event ev) noexcept nogil:
    """Routes one event by its table entry's kind."""
    # One unsigned comparison drops the poller's own entries (fd -1: a wake-up, its timer)
    # and fds off the table.
    if <unsigned int>ev.fd >= <unsigned int>L.nconns:
        if ev.fd < 0:
            kq_poller_wake_seen(L.poller)  # before run_native looks for the work
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
    """After a batch that was not all plain input (only other events bring sources, and
    the poller's timer firing is one)."""
    # Accept after the batch: a fd closed above may come back at once as a new client, and
    # the batch's stale events for the old one must not reach it.
    if L.nsources:
        serve_sources(L)
    if L.now >= L.timer_at or L.now >= L.next_expiry:
        time_is_up(L)


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
    read_clock_for_wake(L)
    stop_ticking(L)  # (which sets the timer)
    close_sources(L)
    for fd in range(L.top):
        if L.conns[fd].kind == K_STREAM and not (L.conns[fd].flags & C_CLOSING):
            if owes_nothing(L, fd):
                close_now(L, fd, False)
            else:
                begin_close(L, fd)
