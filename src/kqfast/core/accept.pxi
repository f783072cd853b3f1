# Accepting: up to a cap per wake (a connect storm cannot starve served clients), over the
# limits a client is accepted and closed at once, at the fd limit a reserve fd sheds the
# waiting clients and the listener rests; where SO_REUSEPORT does not balance, new fds are
# handed to other loops.  Listeners and inboxes are served after each batch of events.

cdef enum:
    SHED_CAP = 1024     # clients one shed closes: a flood cannot hold the loop here


cdef void serve_sources(LoopCore *L) noexcept nogil:
    """Accepts from the listeners and reads the inboxes that were ready in this batch."""
    cdef int i, fd
    for i in range(L.nsources):
        fd = L.sources[i]
        if L.conns[fd].kind == K_LISTENER:
            accept_batch(L, fd)
        elif L.conns[fd].kind == K_INBOX:
            admit_inbox(L, fd)
    L.nsources = 0


cdef void accept_batch(LoopCore *L, int lfd) noexcept nogil:
    cdef int fd, i
    cdef bint tcp = not (L.conns[lfd].flags & C_UNIX)
    for i in range(ACCEPT_PER_WAKE):
        if L.nrecords >= RECORD_SOFT_CAP:
            return  # the listener stays readable; the rest waits for the next batch
        fd = kq_accept(lfd)
        if fd < 0:
            if errno == EMFILE or errno == ENFILE or errno == ENOBUFS or errno == ENOMEM:
                shed_at_fd_limit(L, lfd)
                return
            if kq_retry_later(errno):
                return
            # ECONNABORTED and errors already pending on the new socket (Linux passes them
            # through accept) concern that one client only.
            continue
        kq_prepare_accepted(fd, tcp)
        if L.nhandoff == 0 or not hand_off(L, fd):
            admit(L, fd, lfd)


cdef bint hand_off(LoopCore *L, int fd) noexcept nogil:
    """Passes fd to the next loop's inbox; False when it is this loop's turn (or the inbox is
    full), and this loop serves it."""
    cdef int target = L.handoff_fds[L.next_handoff]
    L.next_handoff = (L.next_handoff + 1) % L.nhandoff
    return target >= 0 and kq_write_fd(target, fd) == 0


cdef void admit(LoopCore *L, int fd, int origin) noexcept nogil:
    """Starts serving fd, accepted by (or handed to) origin, or closes it at once when over
    the limits."""
    cdef uint32_t served = L.conns[origin].flags & C_SERVED
    cdef Record *r
    if not fits_table(L, fd) or (served and <int>L.n_current >= L.max_connections):
        L.n_rejected += 1
        kq_abort_fd(fd)
        return
    open_conn(L, fd, served | (C_PY if L.handler == H_PROTOCOL else 0))
    # Just accepted, so open: the poller need not check it (kqueue would, with a syscall).
    if kq_poller_add(L.poller, fd, KQ_READABLE) < 0:
        L.n_errors += 1
        close_now(L, fd, True)
        return
    L.conns[fd].mask = KQ_READABLE
    if L.tls_ctx is not NULL and L.handler != H_PROTOCOL and accept_tls(L, fd) < 0:
        L.n_errors += 1
        close_now(L, fd, True)
        return
    if L.handler == H_PROTOCOL:
        r = record(L, fd, R_MADE, 0, 0, 0)
        r.origin, r.origin_gen = origin, L.conns[origin].gen


cdef void admit_inbox(LoopCore *L, int ifd) noexcept nogil:
    cdef int fd
    while L.nrecords < RECORD_SOFT_CAP:
        fd = kq_read_fd(ifd)
        if fd < 0:
            return
        admit(L, fd, ifd)


cdef void shed_at_fd_limit(LoopCore *L, int lfd) noexcept nogil:
    """Out of fds: the listener stays readable and a level-triggered loop would spin on it.
    Free the reserve fd to accept and close the waiting clients (they learn at once instead
    of hanging), then let the listener rest for a while."""
    cdef int fd, i
    if L.reserve_fd >= 0:
        c_close(L.reserve_fd)
        L.reserve_fd = -1
        for i in range(SHED_CAP):
            fd = kq_accept(lfd)
            if fd < 0:
                break
            L.n_rejected += 1
            kq_abort_fd(fd)
        L.reserve_fd = kq_open_reserve()
    set_mask(L, lfd, 0)
    timer_push(L, lfd, T_BACKOFF)


cdef void close_sources(LoopCore *L) noexcept nogil:
    """Stops accepting for good: every listener and inbox leaves the poller (Python closes
    their fds)."""
    cdef int fd
    for fd in range(L.top):
        if L.conns[fd].kind == K_LISTENER or L.conns[fd].kind == K_INBOX:
            close_entry(L, fd)
