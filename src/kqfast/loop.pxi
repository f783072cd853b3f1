# kqfast.Server's event loop as a Python object: it owns one LoopCore and runs the nogil
# cycle (core/cycle.pxi) and the Python pass (dispatch.pxi) in turn.  Everything here is
# set-up, lifecycle and thread-safe requests; the per-event work is in core/.
import logging as _logging
import threading as _threading
from collections import deque as _deque

cimport cython

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


# final: the core is reached through self.core directly (no vtable), so the C compiler can
# inline the hot path's small steps.
@cython.final
cdef class Loop:
    """One event loop: a poller, a listening socket and the connections it accepted."""
    cdef LoopCore core
    cdef bint configured
    cdef long owner_pid
    cdef object factory
    cdef object ready
    cdef object pending_exc

    def __cinit__(self):
        cdef LoopCore *L = &self.core
        L.listen_fd = L.signal_fd = L.reserve_fd = L.inbox_r = L.inbox_w = -1
        L.poller = kq_poller_create()
        if L.poller is NULL:
            PyErr_SetFromErrno(OSError)
        L.nconns = fd_table_size()
        # The table is touched only where fds land, so idle memory is what connections use.
        L.conns = <Conn *>calloc(L.nconns, sizeof(Conn))
        L.rbuf = <char *>malloc(READ_CHUNK)
        L.records = <Record *>malloc(RECORD_CAP * sizeof(Record))
        if L.conns is NULL or L.rbuf is NULL or L.records is NULL:
            raise MemoryError()
        timers_init(L)
        self.ready = _deque()
        self.owner_pid = _os.getpid()

    def __dealloc__(self):
        cdef LoopCore *L = &self.core
        for fd in (L.listen_fd, L.reserve_fd, L.inbox_r, L.inbox_w):
            if fd >= 0:
                c_close(fd)
        kq_poller_free(L.poller)
        free(L.conns)
        free(L.rbuf)
        free(L.records)
        free(L.arena)
        free(L.handoff_fds)

    def configure(self, int listen_fd, int family, handler, *, max_line, high_water, low_water,
                  max_output, idle_timeout, linger_timeout, max_connections):
        """Takes ownership of listen_fd (-1: a loop fed only through its inbox) and sets what
        serves its connections."""
        cdef LoopCore *L = &self.core
        L.listen_fd, L.listen_family = listen_fd, family  # close() releases it
        if handler is ECHO:
            L.handler = H_ECHO
        elif handler is LINE_ECHO:
            L.handler = H_LINE_ECHO
        elif callable(handler):
            L.handler = H_PROTOCOL
            self.factory = handler
            L.arena = <char *>malloc(ARENA_SIZE)
            if L.arena is NULL:
                raise MemoryError()
        else:
            raise TypeError(f"handler must be kqfast.ECHO, kqfast.LINE_ECHO or a protocol "
                            f"factory, not {handler!r}")
        L.max_line, L.high_water, L.low_water = max_line, high_water, low_water
        L.max_output = max_output
        timers_configure(L, idle_timeout, linger_timeout)
        L.max_connections = max_connections
        L.reserve_fd = kq_open_reserve()
        self.configured = True
        if listen_fd >= 0 and kq_poller_set(L.poller, listen_fd, 0, KQ_READABLE) < 0:
            PyErr_SetFromErrno(OSError)

    def open_inbox(self):
        """Makes this loop a hand-off target: connections arrive as fds on a pipe."""
        r, w = _os.pipe()  # close-on-exec, as every fd Python makes
        _os.set_blocking(r, False)
        _os.set_blocking(w, False)
        self.core.inbox_r, self.core.inbox_w = r, w
        if kq_poller_set(self.core.poller, r, 0, KQ_READABLE) < 0:
            PyErr_SetFromErrno(OSError)

    def hand_off_to(self, list loops):
        """This (accepting) loop spreads its new connections over loops, round-robin."""
        cdef Loop loop
        self.core.handoff_fds = <int *>malloc(len(loops) * sizeof(int))
        if self.core.handoff_fds is NULL:
            raise MemoryError()
        for i, loop in enumerate(loops):
            self.core.handoff_fds[i] = -1 if loop is self else loop.core.inbox_w
        self.core.nhandoff = len(loops)

    def run(self):
        """Serves until stop(); re-raises KeyboardInterrupt/SystemExit from handlers or
        signals after closing everything."""
        if _os.getpid() != self.owner_pid:
            raise RuntimeError("this kqfast loop was created in another process (before "
                               "fork); create the server in the process that serves")
        if not self.configured or self.core.finished:
            raise RuntimeError("the loop is not configured or has already run")
        old_wakeup = self.watch_signals()
        self.core.now = kq_monotonic()
        try:
            while not self.core.finished:
                with nogil:
                    run_native(&self.core)
                dispatch(self)
                if self.core.wait_errno:
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
        err, self.core.wait_errno = self.core.wait_errno, 0
        if self.core.wait_failures >= 100:
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
        self.core.signal_fd = rsock.detach()
        kq_poller_set(self.core.poller, self.core.signal_fd, 0, KQ_READABLE)
        return (old, wsock)

    cdef teardown(self, old_wakeup):
        cdef LoopCore *L = &self.core
        cdef int fd
        L.stopping = 1
        close_listener(L)
        for fd in range(L.nconns):
            if L.conns[fd].flags & C_OPEN:
                if L.conns[fd].transport is not NULL:
                    lose(self, fd, None, True)
                else:
                    close_now(L, fd, True)
        run_ready(self)
        if L.inbox_r >= 0:
            while (fd := kq_read_fd(L.inbox_r)) >= 0:
                kq_abort_fd(fd)
        if L.reserve_fd >= 0:
            c_close(L.reserve_fd)
            L.reserve_fd = -1
        if old_wakeup is not None:
            import signal
            signal.set_wakeup_fd(old_wakeup[0])
            old_wakeup[1].close()
            kq_poller_set(L.poller, L.signal_fd, KQ_READABLE, 0)
            c_close(L.signal_fd)
            L.signal_fd = -1
        L.finished = 1

    def close(self):
        """Releases the listener and fds of a loop that will not run (again)."""
        cdef LoopCore *L = &self.core
        if L.finished:
            return
        if _os.getpid() != self.owner_pid:
            # A forked child shares the parent's epoll instance: deregistering anything would
            # deregister it for the parent.  Closing the child's copies of the fds is enough.
            for fd in (L.listen_fd, L.reserve_fd):
                if fd >= 0:
                    c_close(fd)
            L.listen_fd = L.reserve_fd = -1
            L.finished = 1
            return
        self.teardown(None)

    def request_stop(self, double timeout):
        """Thread-safe: stop accepting, let output flush for up to timeout seconds, close."""
        if not kq_load(&self.core.stop_requested):
            self.core.stop_deadline = kq_monotonic() + timeout
            kq_store(&self.core.stop_requested, 1)
        kq_poller_wake(self.core.poller)

    def call_soon_threadsafe(self, callback, *args):
        """Runs callback(*args) on the loop's thread, soon."""
        self.ready.append((callback, args))
        kq_store(&self.core.calls_pending, 1)
        kq_poller_wake(self.core.poller)

    def stats(self):
        cdef LoopCore *L = &self.core
        return {
            "connections_current": L.n_current,
            "connections_total": L.n_total,
            "connections_rejected": L.n_rejected,
            "timeouts": L.n_timeouts,
            "errors": L.n_errors,
            "bytes_in": L.bytes_in,
            "bytes_out": L.bytes_out,
        }

    @property
    def listen_fileno(self):
        return self.core.listen_fd

    def _feed_events(self, list events):
        """Test hook: handles [(fd, mask, err)] as if the poller had returned them, then
        runs the Python pass.  Lets the fuzz tests send what a kernel rarely does."""
        cdef int n = min(len(events), EVENT_CAP)
        for i in range(n):
            self.core.events[i].fd, self.core.events[i].mask, self.core.events[i].err = events[i]
        self.core.now = kq_monotonic()
        handle_events(&self.core, n)
        dispatch(self)
