# The connection loop: an fd-indexed table of C structs, the wait/accept/read/write cycle run
# without the GIL, the native echo handlers, and one timer structure for idle and closing
# connections.  Python protocols are served by transport.pxi through the records this loop
# leaves for it; everything here runs without Python objects per event.
import logging as _logging
import threading as _threading
from collections import deque as _deque

cimport cython
from libc.stdint cimport uint32_t, uint64_t
from libc.stdlib cimport malloc, calloc, realloc, free
from libc.math cimport INFINITY
from libc.string cimport memcpy, memmove
from cpython.ref cimport PyObject, Py_INCREF, Py_DECREF
from posix.resource cimport getrlimit, rlimit, RLIMIT_NOFILE

_log = _logging.getLogger("kqfast")

cdef class Transport

cdef class NativeHandler:
    """A handler that runs entirely in C, never taking the GIL."""
    cdef readonly str name

    def __cinit__(self, str name):
        self.name = name

    def __repr__(self):
        return f"kqfast.{self.name.upper()}"


ECHO = NativeHandler("echo")
LINE_ECHO = NativeHandler("line_echo")

cdef enum:
    READ_CHUNK = 65536
    EVENT_CAP = 256
    ACCEPT_PER_WAKE = 128       # fairness: a connect storm cannot starve served clients
    ARENA_SIZE = 1 << 20        # bytes read for Python handlers in one batch
    ARENA_MIN_ROOM = 16384
    RECORD_CAP = 4096
    # Reads, accepts and timers, whose count per batch is unbounded, stop here; the rest of
    # the array is kept for the at most 3 records that one event can add (a data, EOF or
    # loss on the read side; resume plus closed or loss on the write side).
    RECORD_SOFT_CAP = RECORD_CAP - 3 * EVENT_CAP

# Handler kinds: what runs a connection's bytes.
cdef enum:
    H_ECHO = 1
    H_LINE_ECHO = 2
    H_PROTOCOL = 3

# Connection flags.
cdef enum:
    C_OPEN = 1
    C_PY = 2            # a Python transport is attached
    C_EOF = 4           # the peer has finished sending
    C_CLOSING = 8       # no more input is processed; flush, then shut down the write side
    C_LINGER = 16       # write side shut; input is discarded until EOF or the timer fires
    C_READ_PAUSED = 32  # pause_reading(), or a native echo whose output is over high water
    C_WRITE_PAUSED = 64 # pause_writing() was called and resume_writing() is owed
    C_WRITE_EOF = 128   # shutdown(SHUT_WR) is owed once the output drains
    C_WRITE_SHUT = 256
    C_LOST = 512        # failed in the nogil pass; the Python pass reports and frees it
    C_LINE = 1024       # LineProtocol: the loop frames lines in C

# Timer lists: each open connection is on one, ordered by last activity because every
# connection on a list has the same timeout.  Moving to the tail on activity is O(1).
cdef enum:
    T_NONE = 0
    T_IDLE = 1
    T_CLOSING = 2

# What the nogil pass leaves for the Python pass.
cdef enum:
    R_MADE = 1
    R_DATA = 2
    R_EOF = 3
    R_LOST = 4
    R_RESUME = 5
    R_CLOSED = 6

ctypedef struct Buffer:
    size_t start
    size_t end
    size_t cap

ctypedef struct Conn:
    uint32_t flags
    uint32_t gen        # bumped on close: a record for an older gen is stale
    int prev
    int next
    unsigned short mask # interest registered with the poller
    unsigned char timer
    int hangup_err      # a socket error that came with a hang-up, reported when input ends
    double active       # last progress, for the timer lists
    Buffer *out         # bytes the socket did not take yet
    Buffer *partial     # an incomplete line
    PyObject *transport

ctypedef struct Record:
    int fd
    uint32_t gen
    int kind
    int err
    size_t off
    size_t length

ctypedef struct TimerList:
    int head
    int tail
    double timeout
    # Activity moves a connection to the tail only when its stamp is at least this old, so a
    # busy connection costs a list move per granule, not per read: a deadline may come
    # early by at most one granule (1/64 of the timeout).
    double granule


cdef inline char *buf_data(Buffer *b) noexcept nogil:
    return <char *>(b + 1)


cdef inline size_t buf_len(Buffer *b) noexcept nogil:
    return 0 if b is NULL else b.end - b.start


cdef Buffer *buf_append(Buffer *b, const char *src, size_t n) noexcept nogil:
    """Appends n bytes, growing or compacting the buffer; NULL when memory runs out (the old
    buffer is then freed)."""
    cdef size_t live, cap
    cdef Buffer *grown
    if b is NULL:
        cap = n if n > 4096 else 4096
        b = <Buffer *>malloc(sizeof(Buffer) + cap)
        if b is NULL:
            return NULL
        b.start = b.end = 0
        b.cap = cap
    elif b.end + n > b.cap:
        live = b.end - b.start
        if b.start:
            memmove(buf_data(b), buf_data(b) + b.start, live)
            b.start, b.end = 0, live
        if live + n > b.cap:
            cap = b.cap * 2
            if cap < live + n:
                cap = live + n
            grown = <Buffer *>realloc(b, sizeof(Buffer) + cap)
            if grown is NULL:
                free(b)
                return NULL
            b = grown
            b.cap = cap
    memcpy(buf_data(b) + b.end, src, n)
    b.end += n
    return b


cdef inline bint is_blank(const char *s, size_t n) noexcept nogil:
    """True when the line holds only ASCII whitespace (Go's strings.TrimSpace leaves "")."""
    cdef size_t i
    cdef char c
    for i in range(n):
        c = s[i]
        if c != b' ' and c != b'\t' and c != b'\n' and c != b'\r' and c != b'\v' and c != b'\f':
            return False
    return True


cdef int fd_table_size() noexcept:
    cdef rlimit lim
    if getrlimit(RLIMIT_NOFILE, &lim) < 0 or lim.rlim_cur > (1 << 20):
        return 1 << 20
    return <int>lim.rlim_cur


# final: the nogil methods are called directly (no vtable), so the C compiler can inline
# the hot path's small steps.
@cython.final
cdef class Loop:
    """One event loop: a poller, a listening socket and the connections it accepted."""
    cdef kq_poller *poller
    cdef Conn *conns
    cdef int nconns
    cdef char *rbuf
    cdef kq_event events[EVENT_CAP]
    cdef int listen_fd, listen_family, signal_fd
    # Hand-off (where SO_REUSEPORT does not balance): the accepting loop writes each new fd
    # into one loop's inbox pipe, round-robin; -1 in handoff_fds stands for itself.
    cdef int inbox_r, inbox_w
    cdef int *handoff_fds
    cdef int nhandoff, next_handoff
    cdef bint configured
    cdef int handler
    cdef size_t max_line, high_water, low_water, max_output
    cdef int max_connections
    cdef double now, accept_resume_at, stop_deadline
    cdef TimerList timers[3]
    cdef int stop_requested, stopping, finished, wait_errno, wait_failures
    cdef int calls_pending, signal_pending
    cdef uint64_t n_current, n_total, n_rejected, n_timeouts, n_errors, bytes_in, bytes_out
    cdef int reserve_fd
    cdef long owner_pid
    # the Python pass
    cdef Record *records
    cdef int nrecords
    cdef char *arena
    cdef size_t arena_used
    cdef object factory
    cdef object ready
    cdef object pending_exc

    def __cinit__(self):
        self.listen_fd = self.signal_fd = self.reserve_fd = self.inbox_r = self.inbox_w = -1
        self.poller = kq_poller_create()
        if self.poller is NULL:
            PyErr_SetFromErrno(OSError)
        self.nconns = fd_table_size()
        # The table is touched only where fds land, so idle memory is what connections use.
        self.conns = <Conn *>calloc(self.nconns, sizeof(Conn))
        self.rbuf = <char *>malloc(READ_CHUNK)
        self.records = <Record *>malloc(RECORD_CAP * sizeof(Record))
        if self.conns is NULL or self.rbuf is NULL or self.records is NULL:
            raise MemoryError()
        for i in range(3):
            self.timers[i].head = self.timers[i].tail = -1
        self.timers[T_NONE].granule = INFINITY  # off every list: activity moves nothing
        self.ready = _deque()
        self.owner_pid = _os.getpid()

    def __dealloc__(self):
        if self.listen_fd >= 0:
            c_close(self.listen_fd)
        if self.reserve_fd >= 0:
            c_close(self.reserve_fd)
        kq_poller_free(self.poller)
        free(self.conns)
        free(self.rbuf)
        free(self.records)
        free(self.arena)
        free(self.handoff_fds)
        for fd in (self.inbox_r, self.inbox_w):
            if fd >= 0:
                c_close(fd)

    def configure(self, int listen_fd, int family, handler, *, max_line, high_water, low_water,
                  max_output, idle_timeout, linger_timeout, max_connections):
        """Takes ownership of listen_fd (-1: a loop fed only through its inbox) and sets what
        serves its connections."""
        self.listen_fd, self.listen_family = listen_fd, family  # close() releases it
        if handler is ECHO:
            self.handler = H_ECHO
        elif handler is LINE_ECHO:
            self.handler = H_LINE_ECHO
        elif callable(handler):
            self.handler = H_PROTOCOL
            self.factory = handler
            self.arena = <char *>malloc(ARENA_SIZE)
            if self.arena is NULL:
                raise MemoryError()
        else:
            raise TypeError(f"handler must be kqfast.ECHO, kqfast.LINE_ECHO or a protocol "
                            f"factory, not {handler!r}")
        self.max_line, self.high_water, self.low_water = max_line, high_water, low_water
        self.max_output = max_output
        self.timers[T_IDLE].timeout = idle_timeout
        self.timers[T_CLOSING].timeout = linger_timeout
        for i in (T_IDLE, T_CLOSING):
            self.timers[i].granule = self.timers[i].timeout / 64
        self.max_connections = max_connections
        # Held so that at the fd limit one slot can be freed to accept and shed a client.
        self.reserve_fd = kq_open_reserve()
        self.configured = True
        if listen_fd >= 0 and kq_poller_set(self.poller, listen_fd, 0, KQ_READABLE) < 0:
            PyErr_SetFromErrno(OSError)

    def open_inbox(self):
        """Makes this loop a hand-off target: connections arrive as fds on a pipe."""
        r, w = _os.pipe()  # close-on-exec, as every fd Python makes
        _os.set_blocking(r, False)
        _os.set_blocking(w, False)
        self.inbox_r, self.inbox_w = r, w
        if kq_poller_set(self.poller, r, 0, KQ_READABLE) < 0:
            PyErr_SetFromErrno(OSError)

    def hand_off_to(self, list loops):
        """This (accepting) loop spreads its new connections over loops, round-robin."""
        cdef Loop loop
        self.handoff_fds = <int *>malloc(len(loops) * sizeof(int))
        if self.handoff_fds is NULL:
            raise MemoryError()
        for i, loop in enumerate(loops):
            self.handoff_fds[i] = -1 if loop is self else loop.inbox_w
        self.nhandoff = len(loops)

    # ---- connection table ------------------------------------------------------------

    cdef inline Conn *live(self, int fd, uint32_t gen) noexcept nogil:
        if fd < 0 or fd >= self.nconns:
            return NULL
        cdef Conn *c = &self.conns[fd]
        if not (c.flags & C_OPEN) or c.gen != gen:
            return NULL
        return c

    cdef inline int set_mask(self, int fd, int mask) noexcept nogil:
        cdef Conn *c = &self.conns[fd]
        if c.mask == mask:
            return 0
        if kq_poller_set(self.poller, fd, c.mask, mask) < 0:
            return -1
        c.mask = mask
        return 0

    cdef void timer_unlink(self, int fd) noexcept nogil:
        cdef Conn *c = &self.conns[fd]
        cdef TimerList *t = &self.timers[c.timer]
        if c.timer == T_NONE:
            return
        if c.prev >= 0:
            self.conns[c.prev].next = c.next
        else:
            t.head = c.next
        if c.next >= 0:
            self.conns[c.next].prev = c.prev
        else:
            t.tail = c.prev
        c.timer = T_NONE

    cdef void timer_push(self, int fd, int which) noexcept nogil:
        """Puts fd at the tail of a timer list: its deadline is the latest."""
        cdef Conn *c = &self.conns[fd]
        cdef TimerList *t = &self.timers[which]
        self.timer_unlink(fd)
        c.active = self.now
        if which == T_IDLE and self.timers[T_IDLE].timeout <= 0:
            return
        c.timer = which
        c.prev, c.next = t.tail, -1
        if t.tail >= 0:
            self.conns[t.tail].next = fd
        else:
            t.head = fd
        t.tail = fd

    cdef inline void touch(self, int fd) noexcept nogil:
        cdef Conn *c = &self.conns[fd]
        if self.now - c.active >= self.timers[c.timer].granule:
            self.timer_push(fd, c.timer)

    cdef void open_conn(self, int fd, uint32_t flags) noexcept nogil:
        cdef Conn *c = &self.conns[fd]
        c.flags = C_OPEN | flags
        c.mask = 0
        c.hangup_err = 0
        c.out = c.partial = NULL
        c.transport = NULL
        c.timer = T_NONE
        self.timer_push(fd, T_IDLE)
        self.n_current += 1
        self.n_total += 1

    cdef void close_now(self, int fd, bint reset) noexcept nogil:
        """Deregisters, then closes: never the other way round (see poller_epoll.c)."""
        cdef Conn *c = &self.conns[fd]
        self.set_mask(fd, 0)
        self.timer_unlink(fd)
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
        self.n_current -= 1

    # ---- output ----------------------------------------------------------------------

    cdef int flush(self, int fd) noexcept nogil:
        """Writes queued output; returns 0, or an errno when the connection failed."""
        cdef Conn *c = &self.conns[fd]
        cdef Buffer *b = c.out
        cdef ssize_t n
        while b is not NULL and b.end > b.start:
            n = kq_send(fd, buf_data(b) + b.start, b.end - b.start)
            if n < 0:
                if kq_retry_later(errno):
                    break
                return errno
            b.start += n
            self.bytes_out += n
            self.touch(fd)
        if b is not NULL and b.end == b.start:
            free(b)
            c.out = NULL
        return 0

    cdef inline int emit(self, int fd, const char *data, size_t n) noexcept nogil:
        """Sends at once when nothing is queued, queues the rest and asks for write
        readiness; returns 0, or an errno when the connection failed."""
        cdef Conn *c = &self.conns[fd]
        cdef ssize_t sent = 0
        if n == 0:
            return 0
        if c.out is NULL:
            sent = kq_send(fd, data, n)
            if sent < 0:
                if not kq_retry_later(errno):
                    return errno
                sent = 0
            self.bytes_out += sent
            if <size_t>sent == n:
                return 0
        c.out = buf_append(c.out, data + sent, n - sent)
        if c.out is NULL:
            return ENOMEM
        if self.set_mask(fd, c.mask | KQ_WRITABLE) < 0:
            return errno
        return 0

    cdef void begin_close(self, int fd) noexcept nogil:
        """Graceful close: stop taking input, flush, shut down the write side, then let the
        peer finish (closing with unread input would reset the connection and lose the
        output still in flight)."""
        cdef Conn *c = &self.conns[fd]
        c.flags |= C_CLOSING
        self.timer_push(fd, T_CLOSING)
        if c.out is not NULL:
            self.set_mask(fd, KQ_WRITABLE)
        else:
            self.finish_write_side(fd)

    cdef void finish_write_side(self, int fd) noexcept nogil:
        cdef Conn *c = &self.conns[fd]
        if c.flags & C_EOF:
            self.close_now(fd, False)
            return
        shutdown(fd, SHUT_WR)
        c.flags |= C_LINGER | C_WRITE_SHUT
        if self.set_mask(fd, KQ_READABLE) < 0:
            self.close_now(fd, False)

    cdef void fail(self, int fd, int err) noexcept nogil:
        """The connection failed (reset, broken pipe, out of memory)."""
        cdef Conn *c = &self.conns[fd]
        self.n_errors += 1
        if c.flags & C_PY:
            # The Python pass reports it with connection_lost(exc) and frees it.
            self.set_mask(fd, 0)
            self.timer_unlink(fd)
            c.flags |= C_LOST
            self.record(fd, R_LOST, err, 0, 0)
        else:
            self.close_now(fd, True)

    # ---- events ----------------------------------------------------------------------

    cdef inline void record(self, int fd, int kind, int err, size_t off, size_t length) noexcept nogil:
        cdef Record *r = &self.records[self.nrecords]
        r.fd, r.gen, r.kind, r.err, r.off, r.length = fd, self.conns[fd].gen, kind, err, off, length
        self.nrecords += 1

    cdef inline void on_readable(self, int fd, int hangup_err) noexcept nogil:
        """hangup_err: the socket error a kqueue EV_EOF carried.  libkqueue fetches it with
        SO_ERROR, which clears it, so recv() would report a plain EOF for a reset: it is kept
        until the input ends."""
        cdef Conn *c = &self.conns[fd]
        if hangup_err:
            c.hangup_err = hangup_err
        cdef ssize_t n
        cdef char *dst = self.rbuf
        cdef size_t room = READ_CHUNK
        if c.flags & C_LINGER:
            # Discard what the peer still sends until it closes; its data has no reader.
            n = recv(fd, self.rbuf, READ_CHUNK, 0)
            if n == 0 or (n < 0 and not kq_retry_later(errno)):
                self.close_now(fd, False)
            return
        if c.flags & (C_CLOSING | C_READ_PAUSED | C_LOST):
            return
        if c.flags & C_PY:
            if ARENA_SIZE - self.arena_used < ARENA_MIN_ROOM or self.nrecords >= RECORD_SOFT_CAP:
                return  # level-triggered: the rest is read after this batch is dispatched
            dst = self.arena + self.arena_used
            room = ARENA_SIZE - self.arena_used
            if room > READ_CHUNK:
                room = READ_CHUNK
        n = recv(fd, dst, room, 0)
        if n > 0:
            self.bytes_in += n
            self.touch(fd)
            if c.flags & C_PY:
                self.record(fd, R_DATA, 0, self.arena_used, n)
                self.arena_used += n
            elif self.handler == H_ECHO:
                self.echo_bytes(fd, dst, n)
            else:
                self.echo_lines(fd, dst, n)
        elif n == 0 and c.hangup_err:
            self.fail(fd, c.hangup_err)
        elif n == 0:
            self.on_eof(fd)
        elif not kq_retry_later(errno):
            self.fail(fd, errno)

    cdef void on_eof(self, int fd) noexcept nogil:
        cdef Conn *c = &self.conns[fd]
        cdef Buffer *p = c.partial
        cdef int err
        c.flags |= C_EOF
        # Level-triggered EOF stays readable forever: stop listening for it.
        if self.set_mask(fd, c.mask & ~KQ_READABLE) < 0:
            self.fail(fd, errno)
            return
        if c.flags & C_PY:
            self.record(fd, R_EOF, 0, 0, 0)
            return
        if p is not NULL:
            # A last line without its newline is still echoed: no byte is dropped at EOF.
            c.partial = NULL
            if not is_blank(buf_data(p) + p.start, p.end - p.start):
                err = self.emit(fd, buf_data(p) + p.start, p.end - p.start)
                if err:
                    free(p)
                    self.fail(fd, err)
                    return
            free(p)
        self.begin_close(fd)

    cdef inline void after_emit(self, int fd, int err) noexcept nogil:
        """Native echo backpressure: a peer that does not read stops being read from."""
        cdef Conn *c = &self.conns[fd]
        if err:
            self.fail(fd, err)
        elif buf_len(c.out) >= self.high_water and not (c.flags & C_READ_PAUSED):
            c.flags |= C_READ_PAUSED
            if self.set_mask(fd, c.mask & ~KQ_READABLE) < 0:
                self.fail(fd, errno)

    cdef inline void echo_bytes(self, int fd, const char *data, size_t n) noexcept nogil:
        self.after_emit(fd, self.emit(fd, data, n))

    cdef void echo_lines(self, int fd, const char *data, size_t n) noexcept nogil:
        """The tutorial's line echo: complete lines go back byte for byte; a blank line
        closes (after what is owed is flushed); a line over max_line closes."""
        cdef Conn *c = &self.conns[fd]
        cdef const char *nl
        cdef size_t pos = 0, start, length
        cdef int err
        cdef Buffer *p = c.partial
        if p is not NULL:
            # Only the new bytes are scanned: the partial line has no newline by construction.
            nl = <const char *>memchr(data, b'\n', n)
            length = (nl - data + 1) if nl is not NULL else n
            if p.end - p.start + length > self.max_line + (1 if nl is not NULL else 0):
                self.begin_close(fd)
                return
            p = c.partial = buf_append(p, data, length)
            if p is NULL:
                self.fail(fd, ENOMEM)
                return
            if nl is NULL:
                return
            c.partial = NULL
            if is_blank(buf_data(p) + p.start, p.end - p.start):
                free(p)
                self.begin_close(fd)
                return
            err = self.emit(fd, buf_data(p) + p.start, p.end - p.start)
            free(p)
            if err:
                self.fail(fd, err)
                return
            pos = length
        start = pos
        while pos < n:
            nl = <const char *>memchr(data + pos, b'\n', n - pos)
            if nl is NULL:
                break
            length = nl - (data + pos)
            if length > self.max_line or is_blank(data + pos, length + 1):
                err = self.emit(fd, data + start, pos - start)
                if err:
                    self.fail(fd, err)
                else:
                    self.begin_close(fd)
                return
            pos += length + 1
        err = self.emit(fd, data + start, pos - start)
        if err:
            self.fail(fd, err)
            return
        if pos < n:
            if n - pos > self.max_line:
                self.begin_close(fd)
                return
            c.partial = buf_append(NULL, data + pos, n - pos)
            if c.partial is NULL:
                self.fail(fd, ENOMEM)
                return
        self.after_emit(fd, 0)

    cdef void on_writable(self, int fd) noexcept nogil:
        cdef Conn *c = &self.conns[fd]
        cdef int err
        if c.flags & C_LOST:
            return
        err = self.flush(fd)
        if err:
            self.fail(fd, err)
            return
        if c.flags & C_PY and c.flags & C_WRITE_PAUSED and buf_len(c.out) <= self.low_water_of(fd):
            c.flags &= ~C_WRITE_PAUSED
            self.record(fd, R_RESUME, 0, 0, 0)
        if c.out is not NULL:
            return
        if self.set_mask(fd, c.mask & ~KQ_WRITABLE) < 0:
            self.fail(fd, errno)
            return
        if c.flags & C_CLOSING:
            if c.flags & C_PY:
                self.record(fd, R_CLOSED, 0, 0, 0)
            else:
                self.finish_write_side(fd)
        elif c.flags & C_WRITE_EOF and not (c.flags & C_WRITE_SHUT):
            shutdown(fd, SHUT_WR)
            c.flags |= C_WRITE_SHUT
        elif c.flags & C_READ_PAUSED and not (c.flags & C_PY):
            c.flags &= ~C_READ_PAUSED
            if self.set_mask(fd, c.mask | KQ_READABLE) < 0:
                self.fail(fd, errno)

    cdef size_t low_water_of(self, int fd) noexcept nogil:
        return (<Transport>self.conns[fd].transport).low_water

    # ---- accepting -------------------------------------------------------------------

    cdef void accept_batch(self) noexcept nogil:
        cdef int fd, i
        for i in range(ACCEPT_PER_WAKE):
            if self.nrecords >= RECORD_SOFT_CAP:
                return  # the listener stays readable; the rest waits for the next batch
            fd = kq_accept(self.listen_fd)
            if fd < 0:
                if errno == EMFILE or errno == ENFILE or errno == ENOBUFS or errno == ENOMEM:
                    self.shed_at_fd_limit()
                    return
                if kq_retry_later(errno):
                    return
                # ECONNABORTED and errors already pending on the new socket (Linux passes
                # them through accept) concern that one client only.
                continue
            kq_prepare_accepted(fd, self.listen_family != AF_UNIX)
            if self.nhandoff == 0 or not self.hand_off(fd):
                self.admit(fd)

    cdef bint hand_off(self, int fd) noexcept nogil:
        """Passes fd to the next loop's inbox; False when it is this loop's turn (or the
        inbox is full), and this loop serves it."""
        cdef int target = self.handoff_fds[self.next_handoff]
        self.next_handoff = (self.next_handoff + 1) % self.nhandoff
        return target >= 0 and kq_write_fd(target, fd) == 0

    cdef void admit(self, int fd) noexcept nogil:
        """Starts serving an accepted fd, or closes it at once when over the limits."""
        if fd >= self.nconns or <int>self.n_current >= self.max_connections:
            self.n_rejected += 1
            kq_abort_fd(fd)
            return
        self.open_conn(fd, C_PY if self.handler == H_PROTOCOL else 0)
        if self.set_mask(fd, KQ_READABLE) < 0:
            self.n_errors += 1
            self.close_now(fd, True)
            return
        if self.handler == H_PROTOCOL:
            self.record(fd, R_MADE, 0, 0, 0)

    cdef void admit_inbox(self) noexcept nogil:
        cdef int fd
        while self.nrecords < RECORD_SOFT_CAP:
            fd = kq_read_fd(self.inbox_r)
            if fd < 0:
                return
            self.admit(fd)

    cdef void shed_at_fd_limit(self) noexcept nogil:
        """Out of fds: the listener stays readable and a level-triggered loop would spin on
        it.  Free the reserve fd to accept and close the waiting clients (they learn at once
        instead of hanging), then stop accepting for a while."""
        cdef int fd
        if self.reserve_fd >= 0:
            c_close(self.reserve_fd)
            self.reserve_fd = -1
            while True:
                fd = kq_accept(self.listen_fd)
                if fd < 0:
                    break
                self.n_rejected += 1
                kq_abort_fd(fd)
            self.reserve_fd = kq_open_reserve()
        self.accept_resume_at = self.now + 0.1
        kq_poller_set(self.poller, self.listen_fd, KQ_READABLE, 0)

    # ---- timers and the wait ---------------------------------------------------------

    cdef int next_timeout_ms(self) noexcept nogil:
        cdef double deadline = -1, d
        cdef int h
        h = self.timers[T_IDLE].head
        if h >= 0:
            deadline = self.conns[h].active + self.timers[T_IDLE].timeout
        h = self.timers[T_CLOSING].head
        if h >= 0:
            d = self.conns[h].active + self.timers[T_CLOSING].timeout
            if deadline < 0 or d < deadline:
                deadline = d
        if self.accept_resume_at > 0 and (deadline < 0 or self.accept_resume_at < deadline):
            deadline = self.accept_resume_at
        if self.stopping and (deadline < 0 or self.stop_deadline < deadline):
            deadline = self.stop_deadline
        if deadline < 0:
            return -1
        d = (deadline - self.now) * 1000.0 + 1.0
        return 0 if d < 0 else (<int>d if d < 86400000.0 else 86400000)

    cdef void expire_timers(self) noexcept nogil:
        cdef int fd
        cdef Conn *c
        while self.timers[T_IDLE].head >= 0 and self.nrecords < RECORD_SOFT_CAP:
            fd = self.timers[T_IDLE].head
            c = &self.conns[fd]
            if c.active + self.timers[T_IDLE].timeout > self.now:
                break
            self.n_timeouts += 1
            if c.flags & C_PY:
                self.timer_unlink(fd)
                self.record(fd, R_LOST, ETIMEDOUT, 0, 0)
                self.set_mask(fd, 0)
                c.flags |= C_LOST
            else:
                self.begin_close(fd)
        while self.timers[T_CLOSING].head >= 0 and self.nrecords < RECORD_SOFT_CAP:
            fd = self.timers[T_CLOSING].head
            c = &self.conns[fd]
            if c.active + self.timers[T_CLOSING].timeout > self.now:
                break
            # A closing peer that neither reads nor closes: give up on it.
            self.fail(fd, ETIMEDOUT)
        if self.accept_resume_at > 0 and self.accept_resume_at <= self.now and not self.stopping:
            self.accept_resume_at = 0
            kq_poller_set(self.poller, self.listen_fd, 0, KQ_READABLE)

    cdef void begin_stop(self) noexcept nogil:
        """Graceful shutdown: stop accepting, then close every connection gracefully."""
        cdef int fd
        self.stopping = 1
        if self.listen_fd >= 0:
            kq_poller_set(self.poller, self.listen_fd, 0 if self.accept_resume_at > 0 else KQ_READABLE, 0)
            c_close(self.listen_fd)
            self.listen_fd = -1
        for fd in range(self.nconns):
            if self.conns[fd].flags & C_OPEN and not (self.conns[fd].flags & (C_CLOSING | C_PY)):
                self.begin_close(fd)

    cdef void run_native(self) noexcept nogil:
        """Waits and serves until there is work for Python or the loop is done."""
        cdef int n
        while True:
            if kq_load(&self.stop_requested) and not self.stopping:
                self.begin_stop()
                if self.handler == H_PROTOCOL:
                    return  # the Python pass closes the transports
            if self.stopping and (self.n_current == 0 or self.now >= self.stop_deadline):
                self.finished = 1
                return
            # Callbacks already scheduled must not wait for I/O: poll without blocking.
            n = kq_poller_wait(self.poller, self.events, EVENT_CAP,
                               0 if kq_load(&self.calls_pending) else self.next_timeout_ms())
            self.now = kq_monotonic()
            if n < 0:
                if errno != EINTR:
                    self.wait_errno = errno
                    self.wait_failures += 1
                self.signal_pending = 1
                return
            self.wait_failures = 0
            self.handle_events(n)
            if self.nrecords or self.signal_pending or kq_load(&self.calls_pending):
                return

    cdef void handle_events(self, int n) noexcept nogil:
        cdef int i, fd, mask
        cdef bint accept_ready = False, inbox_ready = False
        for i in range(n):
            fd = self.events[i].fd
            mask = self.events[i].mask
            if fd == self.listen_fd:
                accept_ready = True
                continue
            if fd == self.inbox_r:
                inbox_ready = True
                continue
            if fd == self.signal_fd:
                while recv(fd, self.rbuf, READ_CHUNK, 0) > 0:
                    pass
                self.signal_pending = 1
                continue
            if fd < 0 or fd >= self.nconns or not (self.conns[fd].flags & C_OPEN):
                continue  # closed earlier in this batch: its stale events are dropped
            if mask & KQ_ERROR:
                self.fail(fd, self.events[i].err)
                continue
            if mask & KQ_READABLE:
                self.on_readable(fd, self.events[i].err)
            if mask & KQ_WRITABLE and self.conns[fd].flags & C_OPEN and self.conns[fd].mask & KQ_WRITABLE:
                self.on_writable(fd)
        # Accept after the batch: a fd closed above may come back at once as a new client,
        # and the batch's stale events for the old one must not reach it.
        if accept_ready and self.listen_fd >= 0:
            self.accept_batch()
        if inbox_ready:
            self.admit_inbox()
        self.expire_timers()

    def _feed_events(self, list events):
        """Test hook: handles [(fd, mask, err)] as if the poller had returned them, then
        runs the Python pass.  Lets the fuzz tests send what a kernel rarely does."""
        cdef int n = min(len(events), EVENT_CAP)
        for i in range(n):
            self.events[i].fd, self.events[i].mask, self.events[i].err = events[i]
        self.now = kq_monotonic()
        self.handle_events(n)
        self.dispatch()

    # ---- Python side -----------------------------------------------------------------

    def run(self):
        """Serves until stop(); re-raises KeyboardInterrupt/SystemExit from handlers or
        signals after closing everything."""
        if _os.getpid() != self.owner_pid:
            raise RuntimeError("this kqfast loop was created in another process (before "
                               "fork); create the server in the process that serves")
        if not self.configured or self.finished:
            raise RuntimeError("the loop is not configured or has already run")
        old_wakeup = self.watch_signals()
        self.now = kq_monotonic()
        try:
            while not self.finished:
                with nogil:
                    self.run_native()
                self.dispatch()
                if self.wait_errno:
                    self.report_wait_error()
                if self.pending_exc is not None:
                    break
        finally:
            self.teardown(old_wakeup)
        if self.pending_exc is not None:
            exc, self.pending_exc = self.pending_exc, None
            raise exc

    cdef report_wait_error(self):
        """A failed wait is logged and retried: kernels report errnos their manuals do not
        list (Darwin's ETIMEDOUT).  Only a wait that keeps failing stops the loop."""
        err, self.wait_errno = self.wait_errno, 0
        if self.wait_failures >= 100:
            raise OSError(err, f"the poller keeps failing: {_os.strerror(err)}")
        _log.warning("kqfast: poller wait failed (%s); retrying", _os.strerror(err))

    cdef object watch_signals(self):
        """In the main thread, Python's signal wakeup fd joins the poll set, so Ctrl-C wakes
        the nogil wait even when it arrives just before it (no EINTR then)."""
        import signal
        if _threading.current_thread() is not _threading.main_thread():
            return None
        import socket
        rsock, wsock = socket.socketpair()
        rsock.setblocking(False)
        wsock.setblocking(False)
        old = signal.set_wakeup_fd(wsock.fileno(), warn_on_full_buffer=False)
        self.signal_fd = rsock.detach()
        kq_poller_set(self.poller, self.signal_fd, 0, KQ_READABLE)
        return (old, wsock)

    cdef teardown(self, old_wakeup):
        cdef int fd
        self.stopping = 1
        if self.listen_fd >= 0:
            kq_poller_set(self.poller, self.listen_fd, 0 if self.accept_resume_at > 0 else KQ_READABLE, 0)
            c_close(self.listen_fd)
            self.listen_fd = -1
        for fd in range(self.nconns):
            if self.conns[fd].flags & C_OPEN:
                if self.conns[fd].transport is not NULL:
                    self.lose(fd, None, True)
                else:
                    self.close_now(fd, True)
        self.run_ready()
        if self.inbox_r >= 0:
            while (fd := kq_read_fd(self.inbox_r)) >= 0:
                kq_abort_fd(fd)
        if self.reserve_fd >= 0:
            c_close(self.reserve_fd)
            self.reserve_fd = -1
        if old_wakeup is not None:
            import signal
            signal.set_wakeup_fd(old_wakeup[0])
            old_wakeup[1].close()
            kq_poller_set(self.poller, self.signal_fd, KQ_READABLE, 0)
            c_close(self.signal_fd)
            self.signal_fd = -1
        self.finished = 1

    def close(self):
        """Releases the listener and fds of a loop that will not run (again)."""
        if self.finished:
            return
        if _os.getpid() != self.owner_pid:
            # A forked child shares the parent's epoll instance: deregistering anything would
            # deregister it for the parent.  Closing the child's copies of the fds is enough.
            for fd in (self.listen_fd, self.reserve_fd):
                if fd >= 0:
                    c_close(fd)
            self.listen_fd = self.reserve_fd = -1
            self.finished = 1
            return
        self.teardown(None)

    def request_stop(self, double timeout):
        """Thread-safe: stop accepting, let output flush for up to timeout seconds, close."""
        if not kq_load(&self.stop_requested):
            self.stop_deadline = kq_monotonic() + timeout
            kq_store(&self.stop_requested, 1)
        kq_poller_wake(self.poller)

    def call_soon_threadsafe(self, callback, *args):
        """Runs callback(*args) on the loop's thread, soon."""
        self.ready.append((callback, args))
        kq_store(&self.calls_pending, 1)
        kq_poller_wake(self.poller)

    def stats(self):
        return {
            "connections_current": self.n_current,
            "connections_total": self.n_total,
            "connections_rejected": self.n_rejected,
            "timeouts": self.n_timeouts,
            "errors": self.n_errors,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
        }

    @property
    def listen_fileno(self):
        return self.listen_fd

    # ---- the Python pass: one GIL acquisition per batch ------------------------------

    cdef dispatch(self):
        cdef int i
        cdef Record *r
        cdef Conn *c
        cdef Transport t
        if self.signal_pending:
            self.signal_pending = 0
            try:
                PyErr_CheckSignals()
            except BaseException as exc:
                self.pending_exc = exc
                return
        for i in range(self.nrecords):
            r = &self.records[i]
            c = self.live(r.fd, r.gen)
            if c is NULL:
                continue  # closed by an earlier callback of this batch
            if r.kind == R_MADE:
                self.made(r.fd)
                continue
            if c.transport is NULL:
                continue
            t = <Transport>c.transport
            try:
                if r.kind == R_DATA:
                    t.deliver(PyBytes_FromStringAndSize(self.arena + r.off, r.length))
                elif r.kind == R_EOF:
                    t.eof()
                elif r.kind == R_RESUME:
                    t.protocol.resume_writing()
                elif r.kind == R_CLOSED:
                    self.detach(r.fd, None)
                elif r.kind == R_LOST:
                    self.lose(r.fd, _errno_exception(r.err), False)
            except BaseException as exc:
                self.callback_failed(t, exc)
        self.nrecords = 0
        self.arena_used = 0
        if self.stopping and self.handler == H_PROTOCOL and self.listen_fd < 0:
            self.close_transports()
        self.run_ready()

    cdef made(self, int fd):
        cdef Conn *c = &self.conns[fd]
        cdef Transport t = Transport.__new__(Transport)
        t.loop, t.fd, t.gen = self, fd, c.gen
        t.high_water, t.low_water = self.high_water, self.low_water
        try:
            t.protocol = self.factory()
        except BaseException as exc:
            self.close_now(fd, True)
            self.callback_failed(None, exc)
            return
        Py_INCREF(t)
        c.transport = <PyObject *>t
        if isinstance(t.protocol, LineProtocol):
            c.flags |= C_LINE
        try:
            t.protocol.connection_made(t)
        except BaseException as exc:
            self.callback_failed(t, exc)

    cdef detach(self, int fd, exc):
        """The protocol is done with a connection that closed cleanly: the C side finishes
        the close (shut down, linger) on its own, and connection_lost(None) follows."""
        cdef Conn *c = &self.conns[fd]
        cdef Transport t = <Transport>c.transport
        c.transport = NULL
        c.flags &= ~(C_PY | C_LINE)
        Py_DECREF(t)
        self.ready.append((t.protocol.connection_lost, (exc,)))
        self.timer_push(fd, T_CLOSING)
        self.finish_write_side(fd)

    cdef lose(self, int fd, exc, bint reset):
        """Closes at once (a failure, an abort) and reports connection_lost(exc)."""
        cdef Conn *c = &self.conns[fd]
        cdef Transport t = <Transport>c.transport
        c.transport = NULL
        c.flags &= ~(C_PY | C_LINE)
        Py_DECREF(t)
        self.close_now(fd, reset)
        self.ready.append((t.protocol.connection_lost, (exc,)))

    cdef callback_failed(self, Transport t, BaseException exc):
        """A handler raised: KeyboardInterrupt/SystemExit stop the loop and are re-raised
        by run(); anything else is logged and closes that connection only."""
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            if self.pending_exc is None:
                self.pending_exc = exc
            return
        _log.error("kqfast: protocol callback failed; closing its connection", exc_info=exc)
        if t is not None and t.conn() is not NULL:
            self.lose(t.fd, exc, True)

    cdef close_transports(self):
        cdef int fd
        cdef Transport t
        for fd in range(self.nconns):
            if self.conns[fd].transport is not NULL and not (self.conns[fd].flags & C_CLOSING):
                t = <Transport>self.conns[fd].transport
                try:
                    t.close()
                except BaseException as exc:
                    self.callback_failed(t, exc)

    cdef run_ready(self):
        """Runs what was scheduled: connection_lost calls and call_soon_threadsafe()."""
        kq_store(&self.calls_pending, 0)
        for _ in range(len(self.ready)):
            callback, args = self.ready.popleft()
            try:
                callback(*args)
            except BaseException as exc:
                self.callback_failed(None, exc)
        if self.ready:
            kq_store(&self.calls_pending, 1)  # scheduled by the callbacks just run

