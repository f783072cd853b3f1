# The core's vocabulary: tunables, the flags a connection carries, and the C structs the loop
# works on.  Everything in core/ is a free function over one LoopCore (Redis ae style): no
# Python object is touched without the GIL.
from libc.stdint cimport uint8_t, uint32_t, uint64_t
from cpython.ref cimport PyObject, Py_INCREF, Py_DECREF, Py_XDECREF

cdef enum:
    READ_CHUNK = 65536
    EVENT_CAP = 256
    ACCEPT_PER_WAKE = 128       # fairness: a connect storm cannot starve served clients
    ARENA_SIZE = 1 << 20        # bytes read for Python handlers in one batch
    ARENA_MIN_ROOM = 16384
    RECORD_CAP = 4096
    # Reads, accepts and timers, whose count per batch is unbounded, stop here; the rest of
    # the array is kept for the at most 4 records that one event can add (a data, EOF or
    # loss on the read side, or a TLS stream's plaintext and its next step; resume plus
    # closed or loss on the write side).  A poll takes events only at or under it (see
    # Reactor.poll), so no order of input can overflow.
    RECORD_SOFT_CAP = RECORD_CAP - 4 * EVENT_CAP

# Handler kinds: what runs a connection's bytes.
cdef enum:
    H_ECHO = 1
    H_LINE_ECHO = 2
    H_PROTOCOL = 3

# What a table entry is.  Only streams are the loop's own fds; the others belong to Python
# objects (listening sockets, pipes, the selector's watched fds), which close them.
cdef enum:
    K_FREE = 0
    K_STREAM = 1        # a connection
    K_LISTENER = 2      # accepted from in C
    K_INBOX = 3         # a hand-off pipe: accepted fds from another loop
    K_WATCHED = 4       # registered through the selector (add_reader/add_writer): Python's
    K_SIGNAL = 5        # Python's signal wakeup socket

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
    C_SERVED = 2048     # kqfast.Server's limits apply: idle timeout, max_output, lingering
    C_BUFFERED = 4096   # asyncio.BufferedProtocol: the Python pass reads into get_buffer()
    C_UNIX = 8192       # a listener of Unix sockets (no TCP_NODELAY on what it accepts)
    C_TLS = 16384       # its bytes go through an OpenSSL connection (Conn.tls)
    # Any of these takes a stream's input off the hot path (read_native) to on_readable.
    C_NOT_PLAIN = C_PY | C_LINGER | C_CLOSING | C_READ_PAUSED | C_LOST | C_BUFFERED | C_TLS

# Timer lists: each open connection is on one, ordered by last activity because every
# connection on a list has the same timeout.  Moving to the tail on activity is O(1).
cdef enum:
    T_NONE = 0
    T_IDLE = 1
    T_CLOSING = 2
    T_BACKOFF = 3       # listeners that ran out of fds, re-armed after ACCEPT_BACKOFF
    TIMER_LISTS = 4

# What the nogil pass leaves for the Python pass.
cdef enum:
    R_MADE = 1
    R_DATA = 2
    R_EOF = 3
    R_LOST = 4
    R_RESUME = 5
    R_CLOSED = 6
    R_READABLE = 7      # a BufferedProtocol's socket has input
    R_TLS_DATA = 8      # a TLS stream's plaintext, for its app protocol
    R_TLS_INPUT = 9     # a TLS stream's records, for asyncio's SSLProtocol to take a step on
    R_TLS_FAILED = 10   # a TLS stream's records failed to decrypt (kq_tls.fail_* say why)

ctypedef struct Buffer:
    size_t start
    size_t end
    size_t cap

# 64 bytes: the table holds one per possible fd, so idle memory is what connections use.
ctypedef struct Conn:
    uint32_t flags
    uint32_t gen        # bumped on close: a record for an older gen is stale
    int prev            # neighbours on the connection's timer list
    int next
    uint8_t mask        # interest registered with the poller
    uint8_t timer
    uint8_t error       # an errno to report: a hang-up's (once input ends), or a C_LOST one's
    uint8_t kind
    uint32_t low_water  # a Python transport's resume_writing() mark
    double active       # last progress, for the timer lists
    Buffer *out         # bytes the socket did not take yet
    Buffer *partial     # an incomplete line
    kq_tls *tls         # a TLS stream's OpenSSL connection (C_TLS)
    PyObject *transport # a stream's StreamHandle; what a listener or inbox makes streams for

ctypedef struct Record:
    int fd
    uint32_t gen
    int kind
    int err
    size_t off
    size_t length
    int origin          # R_MADE: the listener or inbox the stream came from, and its gen
    uint32_t origin_gen

ctypedef struct TimerList:
    int head
    int tail
    double timeout
    # Activity moves a connection to the tail only when its stamp is at least this old, so a
    # busy connection costs a list move per granule, not per read: a deadline may come
    # early by at most 1/64 of the timeout (the idle list's granule is half that, as its
    # stamps may be judged on a clock a tick behind).
    double granule

ctypedef struct LoopCore:
    # The native handlers read here and echo from here.  First in the struct, not malloc'ed:
    # its address is then L's own, which the hot path has in a register anyway (one fewer
    # value to keep across recv() and send()).
    char rbuf[READ_CHUNK]
    kq_poller *poller
    Conn *conns
    int nconns
    # Sources of new streams that were readable in this batch, served after it.
    int sources[EVENT_CAP]
    int nsources
    # The selector's fds that were ready in this batch, for the Python pass.
    kq_event watched[EVENT_CAP]
    int nwatched
    # Hand-off (where SO_REUSEPORT does not balance): the accepting loop writes each new fd
    # into one loop's inbox pipe, round-robin; -1 in handoff_fds stands for itself.
    int *handoff_fds
    int nhandoff, next_handoff
    int handler                 # what serves the streams kqfast.Server accepts
    SSL_CTX *tls_ctx            # and over TLS, the context they are accepted with
    char *tls_out               # TLS records on their way from OpenSSL to a socket
    size_t max_line, high_water, low_water, max_output
    int max_connections
    double now, stop_deadline
    TimerList timers[TIMER_LISTS]
    # No deadline comes before this (INFINITY: none): the poller's timer is set at it, and a
    # wake with nothing due skips the expiry.  It may come early (the head it was taken from
    # moved on): that wake expires nothing and takes the exact one.
    double next_expiry
    # Where the poller's timer is set (INFINITY: nowhere, or it has fired).
    double timer_at
    # A native server's steady state (timers.pxi): ticking, L.now may be up to a tick
    # behind (clock_stale: ticking, and the current wake has not read the clock); the tick
    # (the idle granule; INFINITY without an idle timeout), the next one, and bytes_in at
    # the last one.
    int ticking, clock_stale
    double tick, tick_at
    uint64_t tick_input
    # Set by other threads (kq_store), read by the loop's (kq_load).
    int stop_requested, calls_pending
    int stopping, finished, wait_errno, wait_failures, signal_pending
    uint64_t n_current, n_total, n_rejected, n_timeouts, n_errors, bytes_in, bytes_out
    int reserve_fd              # freed at the fd limit to accept and shed a client
    int top                     # 1 + the highest fd ever entered: where walks of conns stop
    int inherited               # this is a forked child's copy (see Reactor.forked)
    # The Python pass: records (dispatched from next_record on), the arena their data is in.
    Record *records
    int nrecords, next_record
    char *arena
    size_t arena_used
