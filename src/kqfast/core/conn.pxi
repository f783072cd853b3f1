# The connection table: one Conn per possible fd, found by its number.  A stream is live while
# C_OPEN is set and its generation matches; close bumps the generation, so records and
# transports that outlive it find nothing.  Listeners, inboxes and the selector's fds have
# entries too (their kind says which), so one lookup routes every event.
from libc.stdlib cimport calloc
from posix.resource cimport getrlimit, rlimit, RLIMIT_NOFILE


cdef int fd_table_size() noexcept:
    cdef rlimit lim
    if getrlimit(RLIMIT_NOFILE, &lim) < 0 or lim.rlim_cur > (1 << 20):
        return 1 << 20
    return <int>lim.rlim_cur


cdef inline Conn *live(LoopCore *L, int fd, uint32_t gen) noexcept nogil:
    """The stream fd while it is open and of this generation, else NULL."""
    if fd < 0 or fd >= L.nconns:
        return NULL
    cdef Conn *c = &L.conns[fd]
    if not (c.flags & C_OPEN) or c.gen != gen or c.kind != K_STREAM:
        return NULL
    return c


cdef inline int set_mask(LoopCore *L, int fd, int mask) noexcept nogil:
    return set_conn_mask(L, &L.conns[fd], fd, mask)


cdef inline int set_conn_mask(LoopCore *L, Conn *c, int fd, int mask) noexcept nogil:
    """set_mask when the caller has fd's entry c at hand."""
    if c.mask == mask:
        return 0
    if kq_poller_set(L.poller, fd, c.mask, mask) < 0:
        return -1
    c.mask = mask
    return 0


cdef void forget_stale(LoopCore *L, int fd) noexcept nogil:
    """A watched fd that Python closed without unregistering left its interest behind (the
    BSD kernels drop it at close, libkqueue and a dup'ed epoll entry do not): drop it before
    the number serves anything new."""
    cdef Conn *c = &L.conns[fd]
    if c.kind == K_WATCHED and c.mask:
        kq_poller_set(L.poller, fd, c.mask, 0)
    c.mask = 0


cdef void open_conn(LoopCore *L, int fd, uint32_t flags) noexcept nogil:
    cdef Conn *c = &L.conns[fd]
    forget_stale(L, fd)
    c.kind = K_STREAM
    c.flags = C_OPEN | flags
    c.error = 0
    c.low_water = 0
    c.out = c.partial = NULL
    c.transport = NULL
    c.timer = T_NONE
    timer_push(L, fd, T_IDLE if flags & C_SERVED else T_NONE)
    L.n_current += 1
    L.n_total += 1


cdef int open_entry(LoopCore *L, int fd, int kind, uint32_t flags, int mask,
                    PyObject *obj) noexcept nogil:
    """Enters a fd that Python owns (a listener, an inbox, a watched or signal fd); -1 with
    errno set when the poller refuses it."""
    cdef Conn *c = &L.conns[fd]
    forget_stale(L, fd)
    if kq_poller_set(L.poller, fd, 0, mask) < 0:
        return -1
    c.kind = kind
    c.error = 0
    c.flags = C_OPEN | flags
    c.mask = mask
    c.transport = obj
    c.timer = T_NONE
    return 0


cdef void close_entry(LoopCore *L, int fd) noexcept nogil:
    """Removes a fd that Python owns from the poller and the table; Python closes it."""
    cdef Conn *c = &L.conns[fd]
    set_mask(L, fd, 0)
    timer_unlink(L, fd)
    c.kind = K_FREE
    c.flags = 0
    c.transport = NULL
    c.gen += 1


cdef void close_now(LoopCore *L, int fd, bint reset) noexcept nogil:
    """Deregisters, then closes a stream: never the other way round (see poller_epoll.c)."""
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
    c.kind = K_FREE
    c.flags = 0
    c.gen += 1
    L.n_current -= 1


cdef inline Record *record(LoopCore *L, int fd, int kind, int err, size_t off,
                           size_t length) noexcept nogil:
    """Leaves an event for the Python pass, stamped with the stream's generation."""
    cdef Record *r = &L.records[L.nrecords]
    r.fd, r.gen, r.kind, r.err, r.off, r.length = fd, L.conns[fd].gen, kind, err, off, length
    L.nrecords += 1
    return r
