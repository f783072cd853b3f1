# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, embedsignature=True
# cython: freethreading_compatible=True
# (one thread runs a load: nothing here is shared between threads)
"""kqfast-bench's load generator: N non-blocking client connections (TCP or a Unix socket) on
kqfast's own poller, each keeping `pipeline` messages in flight, every echoed byte checked
against what was sent, every round trip's latency counted into a log-bucket histogram.  The
loop runs without the GIL, so Python only wakes between slices (once a second) to report.  At
the end each connection stops sending, reads the replies still in flight, and closes cleanly
(a FIN, never a reset a server would log)."""
import os as _os
import resource as _resource

from libc.stdint cimport uint32_t, uint64_t
from libc.stdlib cimport malloc, calloc, free
from libc.string cimport memcmp, memcpy, memset
from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC
from posix.unistd cimport close as c_close
from cpython.exc cimport PyErr_CheckSignals, PyErr_SetFromErrno

from kqfast.sys cimport *

cdef extern from *:
    int __builtin_clzll(unsigned long long x) nogil

cdef enum:
    READ_CHUNK = 65536
    EVENT_CAP = 256
    # Connections started but not yet answered once.  A connect completes when the server's
    # kernel queues it, not when the server accepts it; only the first echo proves that.  So
    # the window bounds the server's accept queue too, which a 10k storm would overflow
    # (SYN cookies, then resets) on a server that accepts slowly while it serves.
    CONNECT_WINDOW = 256
    PATTERN_PERIOD = 26     # messages before a connection's byte pattern repeats

# Latency histogram: exact below 128 ns, then 64 sub-buckets per power of two (<1.6% error).
cdef enum:
    SUB_BITS = 6
    SUB = 64
    HIST_BUCKETS = 44 * SUB
    HIST_MAX_BITS = 47      # ~39 hours in ns: anything longer is clamped

# Connection states.
cdef enum:
    S_WAITING = 0     # not started yet (the connect window is full)
    S_CONNECTING = 1
    S_OPEN = 2
    S_DEAD = 3

# What went wrong, counted by kind.
cdef enum:
    E_CONNECT = 0     # connect failed
    E_MISMATCH = 1    # an echoed byte differs from the one sent, or more came back than sent
    E_CLOSED = 2      # the server closed while messages were in flight
    E_IO = 3          # recv/send failed (reset, ...)
    E_KINDS = 4

ERROR_KINDS = ("connect", "mismatch", "closed", "io")

ctypedef struct Conn:
    int fd
    int state
    int mask
    int answered        # the first echo came back: the server has accepted it
    uint32_t phase      # where this connection's stream starts in the pattern
    uint64_t queued     # bytes of the stream due so far (sent + not yet taken by the kernel)
    uint64_t sent
    uint64_t received
    uint64_t *stamps    # send time of each message in flight, by message number % pipeline

ctypedef struct Histogram:
    uint64_t count
    uint64_t counts[HIST_BUCKETS]


cdef inline uint64_t now_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <uint64_t>ts.tv_sec * 1000000000 + <uint64_t>ts.tv_nsec


cdef inline int bucket_of(uint64_t v) noexcept nogil:
    cdef int e
    if v < 2 * SUB:
        return <int>v
    if v >= (<uint64_t>1 << HIST_MAX_BITS):
        v = (<uint64_t>1 << HIST_MAX_BITS) - 1
    e = 63 - __builtin_clzll(v) - SUB_BITS   # v >> e lands in [SUB, 2 * SUB)
    return (e + 1) * SUB + <int>(v >> e) - SUB


cdef inline uint64_t bucket_middle(int i) noexcept nogil:
    """The value a bucket stands for: the middle of its range."""
    cdef int e
    if i < 2 * SUB:
        return <uint64_t>i
    e = i // SUB - 1
    return ((<uint64_t>(i % SUB + SUB)) << e) + (((<uint64_t>1) << e) - 1) // 2


cdef inline void hist_add(Histogram *h, uint64_t v) noexcept nogil:
    h.counts[bucket_of(v)] += 1
    h.count += 1


cdef uint64_t hist_percentile(Histogram *h, double p) noexcept nogil:
    """The smallest bucket value with at least p percent of the samples at or below it."""
    cdef uint64_t rank, seen = 0
    cdef int i
    if h.count == 0:
        return 0
    rank = <uint64_t>(p / 100.0 * h.count + 0.999999)
    if rank < 1:
        rank = 1
    for i in range(HIST_BUCKETS):
        seen += h.counts[i]
        if seen >= rank:
            return bucket_middle(i)
    return bucket_middle(HIST_BUCKETS - 1)


cdef dict hist_summary(Histogram *h):
    """Latency percentiles in microseconds."""
    cdef int i
    cdef double total = 0
    for i in range(HIST_BUCKETS):
        total += <double>h.counts[i] * bucket_middle(i)
    return {
        "p50": hist_percentile(h, 50) / 1000.0,
        "p90": hist_percentile(h, 90) / 1000.0,
        "p99": hist_percentile(h, 99) / 1000.0,
        "p99.9": hist_percentile(h, 99.9) / 1000.0,
        "max": hist_percentile(h, 100) / 1000.0,
        "mean": total / h.count / 1000.0 if h.count else 0.0,
    }


cdef class LoadClient:
    """Connections to one echo server and the counters of what they saw.  run(seconds) drives
    them without the GIL; counters and histograms are read (and reset) between runs."""
    cdef kq_poller *poller
    cdef Conn *conns
    cdef int *conn_of_fd    # events name fds; this maps them back to connections
    cdef int fd_cap
    cdef uint64_t *stamps
    cdef char *pattern
    cdef char *rbuf
    cdef kq_event events[EVENT_CAP]
    cdef bytes host         # owns the bytes c_host points into
    cdef const char *c_host
    cdef int port, nconns, pipeline
    cdef size_t size, period
    cdef int next_to_start, in_window, open_count, dead_count, ever_opened
    cdef bint draining      # no new messages: only the replies in flight are read
    cdef uint64_t requests
    cdef uint64_t errors[E_KINDS]
    cdef int first_errno, wait_errno
    cdef Histogram total
    cdef Histogram interval

    def __cinit__(self, str host, int port, int connections, int size, int pipeline):
        # host: a numeric address, or a Unix socket path (with a "/"; port unused).
        if connections < 1 or pipeline < 1:
            raise ValueError("connections and pipeline must be at least 1")
        if size < 2:
            raise ValueError("size must be at least 2: some content, then the newline")
        self.host, self.port = host.encode(), port
        self.c_host = self.host
        self.nconns, self.size, self.pipeline = connections, size, pipeline
        self.period = PATTERN_PERIOD * <size_t>size
        self.poller = kq_poller_create()
        if self.poller is NULL:
            PyErr_SetFromErrno(OSError)
        self.conns = <Conn *>calloc(connections, sizeof(Conn))
        # fds above the soft limit cannot exist, so the limit sizes the map.
        soft = _resource.getrlimit(_resource.RLIMIT_NOFILE)[0]
        self.fd_cap = soft if 0 < soft < (1 << 20) else (1 << 20)
        self.conn_of_fd = <int *>calloc(self.fd_cap, sizeof(int))
        self.stamps = <uint64_t *>calloc(<size_t>connections * pipeline, sizeof(uint64_t))
        # The pattern runs on past one period by a full pipeline, so any in-flight stretch of
        # any connection's stream is one contiguous slice of it: one send, one memcmp.
        self.pattern = <char *>malloc(self.period + <size_t>pipeline * size)
        self.rbuf = <char *>malloc(READ_CHUNK)
        if not (self.conns and self.conn_of_fd and self.stamps and self.pattern and self.rbuf):
            raise MemoryError()
        self.fill_pattern()
        for i in range(connections):
            self.conns[i].fd = -1
            self.conns[i].phase = <uint32_t>((i % PATTERN_PERIOD) * size)
            self.conns[i].stamps = self.stamps + <size_t>i * pipeline

    def __dealloc__(self):
        self.abort_all()
        kq_poller_free(self.poller)
        free(self.conns)
        free(self.conn_of_fd)
        free(self.stamps)
        free(self.pattern)
        free(self.rbuf)

    cdef void fill_pattern(self) noexcept:
        """Message m is size-1 letters then a newline: never a blank line, so line echo
        servers echo it like raw ones, and neighbouring messages always differ."""
        cdef size_t i, n = self.period + <size_t>self.pipeline * self.size
        cdef size_t m, j
        for i in range(n):
            m = (i // self.size) % PATTERN_PERIOD
            j = i % self.size
            self.pattern[i] = ord('\n') if j == self.size - 1 else <char>(ord('a') + (m + j) % 26)

    # ---- one connection ----------------------------------------------------------------

    cdef void kill(self, Conn *c, int kind, int err) noexcept nogil:
        self.errors[kind] += 1
        if self.first_errno == 0 and err:
            self.first_errno = err
        if c.state == S_CONNECTING or (c.state == S_OPEN and not c.answered):
            self.in_window -= 1
        if c.state == S_OPEN:
            self.open_count -= 1
        if c.fd >= 0:
            kq_poller_set(self.poller, c.fd, c.mask, 0)  # deregister, then close
            c_close(c.fd)
        c.fd = -1
        c.mask = 0
        c.state = S_DEAD
        self.dead_count += 1

    cdef void abort_all(self) noexcept:
        cdef int i
        if self.conns is NULL or self.poller is NULL:
            return
        for i in range(self.nconns):
            if self.conns[i].fd >= 0:
                kq_poller_set(self.poller, self.conns[i].fd, self.conns[i].mask, 0)
                kq_abort_fd(self.conns[i].fd)
                self.conns[i].fd = -1

    cdef int set_mask(self, Conn *c, int mask) noexcept nogil:
        if c.mask == mask:
            return 0
        if kq_poller_set(self.poller, c.fd, c.mask, mask) < 0:
            return -1
        c.mask = mask
        return 0

    cdef void push(self, Conn *c) noexcept nogil:
        """Hands the kernel what is due; write interest only while it does not take it all."""
        cdef ssize_t n
        cdef size_t due = c.queued - c.sent
        if due:
            n = kq_send(c.fd, self.pattern + (c.phase + c.sent) % self.period, due)
            if n < 0:
                if not kq_retry_later(errno):
                    self.kill(c, E_IO, errno)
                    return
                n = 0
            c.sent += n
            due -= n
        if self.set_mask(c, KQ_READABLE | (KQ_WRITABLE if due else 0)) < 0:
            self.kill(c, E_IO, errno)

    cdef void start(self, int i) noexcept nogil:
        cdef Conn *c = &self.conns[i]
        c.fd = kq_connect(self.c_host, self.port)
        c.state = S_CONNECTING
        self.in_window += 1
        if c.fd >= self.fd_cap:
            c_close(c.fd)
            c.fd = -1
            errno = EMFILE
        if c.fd < 0:
            self.kill(c, E_CONNECT, errno)
            return
        self.conn_of_fd[c.fd] = i
        if self.set_mask(c, KQ_WRITABLE) < 0:
            self.kill(c, E_CONNECT, errno)

    cdef void connected(self, Conn *c, uint64_t now, int event_err) noexcept nogil:
        """event_err: the error the poller saw with the writability (see poller_kqueue.c)."""
        cdef int err = event_err if event_err else kq_socket_error(c.fd), i
        if err:
            self.kill(c, E_CONNECT, err)
            return
        c.state = S_OPEN
        self.open_count += 1
        self.ever_opened += 1
        for i in range(self.pipeline):
            c.stamps[i] = now
        c.queued = <uint64_t>self.pipeline * self.size
        self.push(c)

    cdef void on_readable(self, Conn *c) noexcept nogil:
        cdef ssize_t n = recv(c.fd, self.rbuf, READ_CHUNK, 0)
        cdef uint64_t done, now
        if n <= 0:
            if n == 0:
                self.kill(c, E_CLOSED, 0)
            elif not kq_retry_later(errno):
                self.kill(c, E_IO, errno)
            return
        if c.received + <uint64_t>n > c.sent or memcmp(
                self.rbuf, self.pattern + (c.phase + c.received) % self.period, n) != 0:
            self.kill(c, E_MISMATCH, 0)
            return
        done = c.received // self.size
        c.received += n
        if c.received // self.size == done:
            return
        if not c.answered:
            c.answered = 1
            self.in_window -= 1
        if self.draining:
            return  # the measurement is over: nothing is counted or sent any more
        # Each completed message is a round trip: count it, and send the next in its place.
        now = now_ns()
        while done < c.received // self.size:
            hist_add(&self.total, now - c.stamps[done % self.pipeline])
            hist_add(&self.interval, now - c.stamps[done % self.pipeline])
            c.stamps[done % self.pipeline] = now
            self.requests += 1
            c.queued += self.size
            done += 1
        self.push(c)

    # ---- the loop ----------------------------------------------------------------------

    cdef void fill_connect_window(self) noexcept nogil:
        while self.next_to_start < self.nconns and self.in_window < CONNECT_WINDOW:
            self.start(self.next_to_start)
            self.next_to_start += 1

    cdef void run_until(self, uint64_t deadline) noexcept nogil:
        """Serves the connections until the deadline, or a signal (EINTR) for Python."""
        cdef int n, i, ms
        cdef uint64_t now = now_ns()
        cdef Conn *c
        while now < deadline and self.dead_count < self.nconns:
            if not self.draining:
                self.fill_connect_window()
            ms = <int>((deadline - now + 999999) // 1000000)
            n = kq_poller_wait(self.poller, self.events, EVENT_CAP, ms)
            if n < 0:
                if errno != EINTR:
                    self.wait_errno = errno
                return
            for i in range(n):
                c = &self.conns[self.conn_of_fd[self.events[i].fd]]
                if c.state == S_CONNECTING:
                    self.connected(c, now_ns(), self.events[i].err)
                    continue
                if c.state != S_OPEN:
                    continue  # killed earlier in this batch
                if self.events[i].mask & KQ_READABLE:
                    self.on_readable(c)
                if c.state == S_OPEN and self.events[i].mask & KQ_WRITABLE and c.mask & KQ_WRITABLE:
                    self.push(c)
            now = now_ns()

    # ---- Python side -------------------------------------------------------------------

    def run(self, double seconds):
        """Drives the connections for this long (connecting those not yet started)."""
        cdef uint64_t deadline = now_ns() + <uint64_t>(seconds * 1e9)
        while now_ns() < deadline and self.dead_count < self.nconns:
            with nogil:
                self.run_until(deadline)
            PyErr_CheckSignals()
            if self.wait_errno:
                raise OSError(self.wait_errno, _os.strerror(self.wait_errno))

    def drain(self, double seconds):
        """Stops sending and reads the replies still in flight, for up to this long; returns
        how many connections still await some."""
        cdef uint64_t deadline = now_ns() + <uint64_t>(seconds * 1e9)
        self.draining = True
        while self.awaiting() and now_ns() < deadline:
            self.run(min(0.05, (deadline - now_ns()) / 1e9))
        return self.awaiting()

    cdef int awaiting(self) noexcept:
        """Open connections with replies still in flight."""
        cdef int i, n = 0
        for i in range(self.nconns):
            if self.conns[i].state == S_OPEN and self.conns[i].received < self.conns[i].queued:
                n += 1
        return n

    def close(self):
        """Closes every connection: with a FIN (a clean close, as any client's) when all its
        replies are in, so that no server logs a reset; with a reset (SO_LINGER 0) when some
        are still in flight or it is still connecting.  drain() first, to have them in."""
        cdef Conn *c
        cdef int i
        for i in range(self.nconns):
            c = &self.conns[i]
            if c.fd < 0:
                continue
            kq_poller_set(self.poller, c.fd, c.mask, 0)
            if c.state == S_OPEN and c.received == c.queued:
                c_close(c.fd)
            else:
                kq_abort_fd(c.fd)
            c.fd = -1

    def reset(self):
        """Starts a new measurement: requests and latencies so far are dropped.  Errors are
        not: a wrong byte during the warm-up is as wrong as any other."""
        self.requests = 0
        memset(&self.total, 0, sizeof(Histogram))
        memset(&self.interval, 0, sizeof(Histogram))

    def take_interval(self):
        """Latency percentiles since the previous call (µs), and that window's count."""
        summary = hist_summary(&self.interval)
        summary["requests"] = self.interval.count
        memset(&self.interval, 0, sizeof(Histogram))
        return summary

    def latency(self):
        """Latency percentiles since reset() (µs)."""
        return hist_summary(&self.total)

    @property
    def requests(self):
        return self.requests

    @property
    def errors(self):
        return {ERROR_KINDS[k]: self.errors[k] for k in range(E_KINDS)}

    @property
    def connected(self):
        return self.open_count

    @property
    def opened(self):
        """Connections that were established at some point, open now or not."""
        return self.ever_opened

    @property
    def pending(self):
        """Connections neither open nor failed yet."""
        return self.nconns - self.open_count - self.dead_count

    @property
    def first_error(self):
        """The first errno seen (0 for none): what to tell the user when all fails."""
        return self.first_errno
