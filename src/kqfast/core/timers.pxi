# One timer structure for every connection: intrusive lists (idle, closing; and listeners
# backing off at the fd limit) ordered by last activity.  Every entry on a list has the
# list's timeout, so the nearest deadline is always a head and becomes the wait's timeout:
# no heap, no kernel timer per connection.  LoopCore.next_expiry keeps it between wakes.
from libc.math cimport INFINITY

cdef double ACCEPT_BACKOFF = 0.1   # seconds a listener out of fds rests


cdef void timers_init(LoopCore *L) noexcept nogil:
    cdef int i
    for i in range(TIMER_LISTS):
        L.timers[i].head = L.timers[i].tail = -1
    L.timers[T_NONE].granule = INFINITY  # off every list: activity moves nothing
    L.timers[T_BACKOFF].timeout = ACCEPT_BACKOFF
    L.next_expiry = INFINITY
    set_clock(L)


cdef void timers_configure(LoopCore *L, double idle_timeout, double linger_timeout) noexcept nogil:
    L.timers[T_IDLE].timeout = idle_timeout
    L.timers[T_CLOSING].timeout = linger_timeout
    L.timers[T_IDLE].granule = idle_timeout / 64
    L.timers[T_CLOSING].granule = linger_timeout / 64
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
    t.tail = fd


cdef inline void touch(LoopCore *L, int fd) noexcept nogil:
    touch_conn(L, &L.conns[fd], fd)


cdef inline void touch_conn(LoopCore *L, Conn *c, int fd) noexcept nogil:
    """Progress on c, the entry of fd."""
    if c.active <= L.restamp[c.timer]:
        timer_push(L, fd, c.timer)


cdef inline void touch_idle(LoopCore *L, Conn *c, int fd) noexcept nogil:
    """touch_conn for an entry on the idle list or on none, as a native stream's in its
    ordinary state is: one comparison, as one on none is stamped INFINITY."""
    if c.active <= L.restamp[T_IDLE]:
        timer_push(L, fd, T_IDLE)


cdef inline void set_clock(LoopCore *L) noexcept nogil:
    """Reads the clock into L.now, and what touch() compares with."""
    cdef int i
    L.now = kq_monotonic()
    for i in range(TIMER_LISTS):
        L.restamp[i] = L.now - L.timers[i].granule


cdef inline int wait_ms(LoopCore *L) noexcept nogil:
    """The wait's timeout: up to the nearest deadline (-1: none), rounded up."""
    cdef double d
    if L.next_expiry == INFINITY:
        return -1
    d = (L.next_expiry - L.now) * 1000.0 + 1.0
    return 0 if d < 0 else (<int>d if d < 86400000.0 else 86400000)


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
