# The connection table: one Conn per possible fd, found by its number.  A connection is live
# while C_OPEN is set and its generation matches; close bumps the generation, so records and
# transports that outlive it find nothing.
from libc.stdlib cimport calloc
from posix.resource cimport getrlimit, rlimit, RLIMIT_NOFILE


cdef int fd_table_size() noexcept:
    cdef rlimit lim
    if getrlimit(RLIMIT_NOFILE, &lim) < 0 or lim.rlim_cur > (1 << 20):
        return 1 << 20
    return <int>lim.rlim_cur


cdef inline Conn *live(LoopCore *L, int fd, uint32_t gen) noexcept nogil:
    if fd < 0 or fd >= L.nconns:
        return NULL
    cdef Conn *c = &L.conns[fd]
    if not (c.flags & C_OPEN) or c.gen != gen:
        return NULL
    return c


cdef inline int set_mask(LoopCore *L, int fd, int mask) noexcept nogil:
    cdef Conn *c = &L.conns[fd]
    if c.mask == mask:
        return 0
    if kq_poller_set(L.poller, fd, c.mask, mask) < 0:
        return -1
    c.mask = mask
    return 0


cdef void open_conn(LoopCore *L, int fd, uint32_t flags) noexcept nogil:
    cdef Conn *c = &L.conns[fd]
    c.flags = C_OPEN | flags
    c.mask = 0
    c.hangup_err = 0
    c.low_water = 0
    c.out = c.partial = NULL
    c.transport = NULL
    c.timer = T_NONE
    timer_push(L, fd, T_IDLE)
    L.n_current += 1
    L.n_total += 1


cdef void close_now(LoopCore *L, int fd, bint reset) noexcept nogil:
    """Deregisters, then closes: never the other way round (see poller_epoll.c)."""
    cdef Conn *c = &L.conns[fd]
    set_mask(L, fd, 0)
    timer_unlink(L, fd)
    if reset:
        kq_abort_fd(fd)
    else:
        c_close(fd)
    free(c.out)
    free(c.partial)
    c.out = c.partial = NULL
    c.flags = 0
    c.mask = 0
    c.gen += 1
    L.n_current -= 1


cdef inline void record(LoopCore *L, int fd, int kind, int err, size_t off,
                        size_t length) noexcept nogil:
    """Leaves an event for the Python pass, stamped with the connection's generation."""
    cdef Record *r = &L.records[L.nrecords]
    r.fd, r.gen, r.kind, r.err, r.off, r.length = fd, L.conns[fd].gen, kind, err, off, length
    L.nrecords += 1
