# One timer structure for every connection: intrusive lists (idle, closing; and listeners
# backing off at the fd limit) ordered by last activity.  Every entry on a list has the
# list's timeout, so the nearest deadline is always a head, and the poller's one timer is set
# at it: no heap, no kernel timer per connection, no timeout computed for each wait.
# LoopCore.next_expiry keeps it between wakes.
#
# The clock is read once per wake, except in a native server's steady state (see
# serve_wakes): there a wake of plain input reads none, and the poller's timer also fires
# every tick while input keeps coming, each such wake reading it, so L.now is never more
# than a tick behind when a connection's activity is judged.  Whatever stamps or expires
# reads the clock itself.
from libc.math cimport INFINITY

cdef double ACCEPT_BACKOFF = 0.1   # seconds a listener out of fds rests
# Seconds: the poller's timer is set no further ahead (the backends' conversions stay in
# range; a wake a day with nothing due is nothing).
cdef double LONGEST_TIMER = 86400


cdef void timers_init(LoopCore *L) noexcept nogil:
    cdef int i
    for i in range(TIMER_LISTS):
        L.timers[i].head = L.timers[i].tail = -1
    L.timers[T_NONE].granule = INFINITY  # off every list: activity moves nothing
    L.timers[T_BACKOFF].timeout = ACCEPT_BACKOFF
    L.next_expiry = L.timer_at = L.tick = INFINITY
    set_clock(L)


cdef void timers_configure(LoopCore *L, double idle_timeout, double linger_timeout) noexcept nogil:
    L.timers[T_IDLE].timeout = idle_timeout
    L.timers[T_CLOSING].timeout = linger_timeout
    # The idle list's granule is half of 1/64, and so is the tick: a stamp judged on a clock
    # up to a tick behind is still at most 1/64 of the timeout old (see TimerList.granule).
    L.timers[T_IDLE].granule = idle_timeout / 128
    L.timers[T_CLOSING].granule = linger_timeout / 64
    L.tick = L.timers[T_IDLE].granule if idle_timeout > 0 else INFINITY
    set_clock(L)
    timers_rearm(L)


cdef void timers_rearm(LoopCore *L) noexcept nogil:
    """next_expiry exactly: the nearest head's deadline, or a stopping server's own."""
    cdef double deadline = INFINITY, d
    cdef int h, i
    for i in range(T_IDLE, TIMER_LISTS):
        h = L.timers[i].head
        if h >= 0:
            d = L.conns[h].active + L.timers[i].timeout
            if d < deadline:
                deadline = d
    if L.stopping and L.stop_deadline < deadline:
        deadline = L.stop_deadline
    L.next_expiry = deadline
    set_timer(L)


cdef void set_timer(LoopCore *L) noexcept nogil:
    """Sets the poller's timer at the next moment the loop must wake: the nearest deadline
    or, ticking, the next tick.  No system call when that is where it is set already."""
    cdef double at = L.next_expiry
    if L.ticking and L.tick_at < at:
        at = L.tick_at
    if at < INFINITY and at > L.now + LONGEST_TIMER:
        at = L.now + LONGEST_TIMER
    if at != L.timer_at:
        if kq_poller_set_timer(L.poller, at) < 0:
            L.n_errors += 1  # (EBADF only in a forked child, whose poller was let go of)
        else:
            L.timer_at = at


cdef void start_ticking(LoopCore *L) noexcept nogil:
    """A native server's steady state stops reading the clock on wakes of plain input; the
    clock was just read."""
    L.ticking = L.clock_stale = 1
    L.tick_input = L.bytes_in
    L.tick_at = L.now + L.tick
    set_timer(L)


cdef void stop_ticking(LoopCore *L) noexcept nogil:
    L.ticking = L.clock_stale = 0
    set_timer(L)


cdef inline void read_clock_for_wake(LoopCore *L) noexcept nogil:
    """A wake that is not all plain input reads the clock (if ticking has let it fall
    behind) before its first other event, once: L.now then holds still for the rest of it
    (see expire_timers), until the next wake's (handle_others)."""
    if L.clock_stale:
        L.clock_stale = 0
        set_clock(L)


cdef inline void read_clock_to_stamp(LoopCore *L) noexcept nogil:
    """A stamp is taken on the clock, not one a tick behind, except in a wake that read it
    already: as many reads as stamps in a wake of plain input (one per connection and tick
    at most)."""
    if L.clock_stale:
        set_clock(L)


cdef void time_is_up(LoopCore *L) noexcept nogil:
    """The end of a batch that was not all plain input (the poller's timer firing is such
    an event), the clock read, once the timer's time or the nearest deadline has come (a
    tick is never before the timer's time): the deadlines due expire, ticks go on while
    input comes, and the timer is set for what is next.  (Any earlier change of either is
    set on the timer as it is made.)"""
    if L.now >= L.timer_at:
        L.timer_at = INFINITY  # it has fired
    if L.now >= L.next_expiry:
        expire_timers(L)  # (which sets the timer)
    if L.ticking and L.now >= L.tick_at:
        if L.bytes_in == L.tick_input:
            # Nothing came in for a tick: no need to go on.  The next wake of plain input
            # reads the clock and starts them again.
            stop_ticking(L)
            return
        L.tick_input = L.bytes_in
        L.tick_at = L.now + L.tick
    set_timer(L)


cdef void timer_unlink(LoopCore *L, int fd) noexcept nogil:
    cdef Conn *c = &L.conns[fd]
    cdef TimerList *t = &L.timers[c.timer]
    if c.timer == T_NONE:
        return
    if c.prev >= 0:
        L.conns[c.prev].next = c.next
    else:
        t.head = c.next
    if c.next >= 0:
        L.conns[c.next].prev = c.prev
    else:
        t.tail = c.prev
    c.timer = T_NONE


cdef void timer_push(LoopCore *L, int fd, int which) noexcept nogil:
    """Puts fd at the tail of a timer list: its deadline is the latest."""
    cdef Conn *c = &L.conns[fd]
    cdef TimerList *t = &L.timers[which]
    timer_unlink(L, fd)
    if which == T_NONE or (which == T_IDLE and L.timers[T_IDLE].timeout <= 0):
        c.active = INFINITY  # on no list: never expires, and activity never moves it
        return
    read_clock_to_stamp(L)
    c.active = L.now
    c.timer = which
    c.prev, c.next = t.tail, -1
    if t.tail >= 0:
        L.conns[t.tail].next = fd
    else:
        t.head = fd
        # Only a push onto an empty list makes a new head: a later push's deadline is its
        # list's latest, and unlinking only moves deadlines later.
        if L.now + t.timeout < L.next_expiry:
            L.next_expiry = L.now + t.timeout
            set_timer(L)
    t.tail = fd


cdef inline void touch(LoopCore *L, int fd) noexcept nogil:
    touch_conn(L, &L.conns[fd], fd)


cdef inline void touch_conn(LoopCore *L, Conn *c, int fd) noexcept nogil:
    """Progress on c, the entry of fd."""
    if L.now - c.active >= L.timers[c.timer].granule:
        timer_push(L, fd, c.timer)


cdef inline void touch_idle(LoopCore *L, Conn *c, int fd) noexcept nogil:
    """touch_conn for an entry on the idle list or on none, as a native stream's in its
    ordinary state is: one test, as one on none is stamped INFINITY."""
    if L.now - c.active >= L.timers[T_IDLE].granule:
        timer_push(L, fd, T_IDLE)


cdef inline void set_clock(LoopCore *L) noexcept nogil:
    """Reads the clock into L.now."""
    L.now = kq_monotonic()


cdef void expire_timers(LoopCore *L) noexcept nogil:
    cdef int fd
    cdef Conn *c
    while L.timers[T_IDLE].head >= 0 and L.nrecords < RECORD_SOFT_CAP:
        fd = L.timers[T_IDLE].head
        c = &L.conns[fd]
        # (One pushed back in this pass, stamped now, waits for the next however short the
        # timeout.)
        if c.active + L.timers[T_IDLE].timeout > L.now or c.active == L.now:
            break
        if c.flags & C_CLOSING:
            closing_expired(L, fd)
            continue
        L.n_timeouts += 1
        if c.flags & C_PY:
            timer_unlink(L, fd)
            record(L, fd, R_LOST, ETIMEDOUT, 0, 0)
            set_mask(L, fd, 0)
            c.flags |= C_LOST
            c.error = ETIMEDOUT
        else:
            begin_close(L, fd)
    while L.timers[T_CLOSING].head >= 0 and L.nrecords < RECORD_SOFT_CAP:
        fd = L.timers[T_CLOSING].head
        c = &L.conns[fd]
        if c.active + L.timers[T_CLOSING].timeout > L.now:
            break
        # The peer has had everything for linger_timeout and has not closed: nothing is
        # lost by closing now.
        close_now(L, fd, False)
    while L.timers[T_BACKOFF].head >= 0:
        fd = L.timers[T_BACKOFF].head
        if L.conns[fd].active + ACCEPT_BACKOFF > L.now:
            break
        timer_unlink(L, fd)
        set_mask(L, fd, KQ_READABLE)
    timers_rearm(L)
