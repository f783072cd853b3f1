# Accepting: up to a cap per wake (a connect storm cannot starve served clients), over the
# limits a client is accepted and closed at once, at the fd limit a reserve fd sheds the
# waiting clients; where SO_REUSEPORT does not balance, new fds are handed to other loops.


cdef void accept_batch(LoopCore *L) noexcept nogil:
    cdef int fd, i
    for i in range(ACCEPT_PER_WAKE):
        if L.nrecords >= RECORD_SOFT_CAP:
            return  # the listener stays readable; the rest waits for the next batch
        fd = kq_accept(L.listen_fd)
        if fd < 0:
            if errno == EMFILE or errno == ENFILE or errno == ENOBUFS or errno == ENOMEM:
                shed_at_fd_limit(L)
                return
            if kq_retry_later(errno):
                return
            # ECONNABORTED and errors already pending on the new socket (Linux passes them
            # through accept) concern that one client only.
            continue
        kq_prepare_accepted(fd, L.listen_family != AF_UNIX)
        if L.nhandoff == 0 or not hand_off(L, fd):
            admit(L, fd)


cdef bint hand_off(LoopCore *L, int fd) noexcept nogil:
    """Passes fd to the next loop's inbox; False when it is this loop's turn (or the inbox is
    full), and this loop serves it."""
    cdef int target = L.handoff_fds[L.next_handoff]
    L.next_handoff = (L.next_handoff + 1) % L.nhandoff
    return target >= 0 and kq_write_fd(target, fd) == 0


cdef void admit(LoopCore *L, int fd) noexcept nogil:
    """Starts serving an accepted fd, or closes it at once when over the limits."""
    if fd >= L.nconns or <int>L.n_current >= L.max_connections:
        L.n_rejected += 1
        kq_abort_fd(fd)
        return
    open_conn(L, fd, C_PY if L.handler == H_PROTOCOL else 0)
    if set_mask(L, fd, KQ_READABLE) < 0:
        L.n_errors += 1
        close_now(L, fd, True)
        return
    if L.handler == H_PROTOCOL:
        record(L, fd, R_MADE, 0, 0, 0)


cdef void admit_inbox(LoopCore *L) noexcept nogil:
    cdef int fd
    while L.nrecords < RECORD_SOFT_CAP:
        fd = kq_read_fd(L.inbox_r)
        if fd < 0:
            return
        admit(L, fd)


cdef void shed_at_fd_limit(LoopCore *L) noexcept nogil:
    """Out of fds: the listener stays readable and a level-triggered loop would spin on it.
    Free the reserve fd to accept and close the waiting clients (they learn at once instead
    of hanging), then stop accepting for a while."""
    cdef int fd
    if L.reserve_fd >= 0:
        c_close(L.reserve_fd)
        L.reserve_fd = -1
        while True:
            fd = kq_accept(L.listen_fd)
            if fd < 0:
                break
            L.n_rejected += 1
            kq_abort_fd(fd)
        L.reserve_fd = kq_open_reserve()
    L.accept_resume_at = L.now + 0.1
    kq_poller_set(L.poller, L.listen_fd, KQ_READABLE, 0)


cdef void close_listener(LoopCore *L) noexcept nogil:
    """Stops accepting for good (a listener paused by the shed is already deregistered)."""
    if L.listen_fd < 0:
        return
    kq_poller_set(L.poller, L.listen_fd, 0 if L.accept_resume_at > 0 else KQ_READABLE, 0)
    c_close(L.listen_fd)
    L.listen_fd = -1
