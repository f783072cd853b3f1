# The connection table: one Conn per possible fd, found by its number.  A stream is live while
# C_OPEN is set and its generation matches; close bumps the generation, so records and
# transports that outlive it find nothing.  Listeners, inboxes and the selector's fds have
# entries too (their kind says which), so one lookup routes every event.
#
# The table covers the fd limit, and follows it when it is raised later (servers raise it at
# start-up): it is address space reserved for MAX_TABLE entries, of which the first nconns
# are usable.  Growing makes more usable in place, so an entry never moves (no address taken
# of one goes stale); pages are touched only where fds land, so idle memory is what
# connections use.
from posix.mman cimport (mmap, mprotect, munmap, MAP_ANON, MAP_FAILED, MAP_PRIVATE,
                         PROT_NONE, PROT_READ, PROT_WRITE)
from posix.resource cimport getrlimit, rlimit, RLIMIT_NOFILE

cdef enum:
    MAX_TABLE = 1 << 20     # fds past this (a limit of millions) are refused
    TABLE_PAGE = 1 << 16    # grown by whole multiples of this (of every system's page size)

cdef size_t TABLE_BYTES = MAX_TABLE * sizeof(Conn)


cdef int fd_limit() noexcept nogil:
    """The soft fd limit: what fd numbers can reach now (at most MAX_TABLE)."""
    cdef rlimit lim
    if getrlimit(RLIMIT_NOFILE, &lim) < 0 or lim.rlim_cur > MAX_TABLE:
        return MAX_TABLE
    return <int>lim.rlim_cur


cdef Conn *table_reserve() noexcept nogil:
    """The table's address space, none of it usable yet; NULL when there is none."""
    cdef void *base = mmap(NULL, TABLE_BYTES, PROT_NONE, MAP_PRIVATE | MAP_ANON, -1, 0)
    return NULL if base == MAP_FAILED else <Conn *>base


cdef void table_release(LoopCore *L) noexcept nogil:
    if L.conns is not NULL:
        munmap(L.conns, TABLE_BYTES)


cdef bint table_grow(LoopCore *L, int size) noexcept nogil:
    """Makes entries [0, size) usable (zeroed, as new mappings are); False when the system
    refuses."""
    cdef size_t length = (<size_t>size * sizeof(Conn) + TABLE_PAGE - 1) & ~(<size_t>TABLE_PAGE - 1)
    if length > TABLE_BYTES:
        length = TABLE_BYTES
    if mprotect(L.conns, length, PROT_READ | PROT_WRITE) < 0:
        return False
    L.nconns = <int>(length // sizeof(Conn))
    return True


cdef bint fits_table(LoopCore *L, int fd) noexcept nogil:
    """True when fd has an entry, once the table has grown to the fd limit if need be."""
    if fd < L.nconns:
        return fd >= 0
    return fd < MAX_TABLE and table_grow(L, fd + 1 if fd_limit() <= fd else fd_limit())


cdef inline void enter(LoopCore *L, int fd) noexcept nogil:
    """fd gets an entry in use: the table's walks stop at the highest ever used."""
    if fd >= L.top:
        L.top = fd + 1


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
    enter(L, fd)
    forget_stale(L, fd)
    c.kind = K_STREAM
    c.flags = C_OPEN | flags
    c.error = 0
    c.low_water = 0
    c.out = c.partial = NULL
    c.tls = NULL
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
    enter(L, fd)
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
    """Deregisters, then closes a stream: never the other way round (see poller_epoll.c).
    In a forked child the fd is a copy of one its parent serves: no reset (SO_LINGER is the
    socket's, not the copy's), and the poller was let go of at the fork."""
    cdef Conn *c = &L.conns[fd]
    set_mask(L, fd, 0)
    timer_unlink(L, fd)
    if reset and not L.inherited:
        kq_abort_fd(fd)
    else:
        c_close(fd)
    free(c.out)
    free(c.partial)
    c.out = c.partial = NULL
    if c.tls is not NULL:
        tls_forget(c)
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
